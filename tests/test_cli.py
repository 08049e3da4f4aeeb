"""The `deadwatch` command: summary, compare, demo; exit codes; the script and `python -m deadwatch`.

Run dirs are made by training tiny MLPs with planted dead units (bias -1e4) under deadwatch.watch;
expected figures come from a plain re-computation of each step's activations.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import deadwatch
from deadwatch import cli
from deadwatch.analysis import HINTS
from deadwatch.reporters import runlog
from planted import make_net, step_figures

BIN = Path(sys.executable).parent
REPORT_FIELDS = {"step", "window", "units", "dead_fraction", "layers", "flagged"}


# ---- tiny MLPs with planted dead units and their reference figures ----------------------------

def set_bias(net, layer, units, value):
    with torch.no_grad():
        net.fc[layer].bias[list(units)] = value


def verdict(history, step, window, warn=0.01, critical=0.10):
    """Per site at `step`: dead units, dead fraction, status, from the definitions."""
    out = {}
    lo = max(step - window, 0)
    for name in history[0]:
        counts = np.stack([h[name][0] for h in history[lo:step]])
        bad = np.stack([h[name][1] for h in history[lo:step]])
        dead = [u for u in range(counts.shape[1]) if not (counts[:, u] > 0).any()]
        frac = len(dead) / counts.shape[1]
        status = ("nonfinite" if bad.any() else
                  "critical" if frac >= critical else "warn" if frac >= warn else "ok")
        out[name] = {"units": counts.shape[1], "dead_units": dead, "dead_fraction": frac, "status": status}
    return out


def train(logdir, sizes, planted=None, changes=None, steps=20, report_every=5, window=5, seed=0):
    """Returns the expected verdict of every report (report steps 5, 10, ...), by report step."""
    net = make_net(sizes, {}, seed)
    with torch.no_grad():
        for fc in net.fc[1:]:  # inputs >= 0, weights >= 0, bias 1: every unit fires unless planted
            fc.weight.abs_()
            fc.bias.fill_(1.0)
    for layer, (units, value) in (planted or {}).items():
        set_bias(net, layer, units, value)
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    with deadwatch.watch(net, logdir=logdir, reporters=["jsonl", "tensorboard"], report_every=report_every,
                         window=window) as monitor:
        for s in range(steps):
            if changes and s in changes:
                changes[s](net)
            x = torch.randn(16, sizes[0], generator=g)
            with torch.no_grad():
                net(x)
                history.append(step_figures(net, x))
            monitor.step()
    return {end: verdict(history, end, window) for end in range(report_every, steps + 1, report_every)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_runs")
    r = {}
    # trend: act.0 dies more at step 10 (25% -> 62.5%, up), act.1 recovers (5% -> 0%, down),
    # act.2 keeps 30 of 40 units dead (75% -> 75%, flat; a long dead-unit list)
    r["trend"] = train(base / "trend", (4, 8, 20, 40),
                       planted={0: ([1, 5], -1e4), 1: ([3], -1e4), 2: (range(30), -1e4)},
                       changes={10: lambda net: (set_bias(net, 0, [0, 2, 4], -1e4), set_bias(net, 1, [3], 5.0))})
    r["warn_only"] = train(base / "warn_only", (4, 8, 20, 12), planted={1: ([3], -1e4)})
    r["clean"] = train(base / "clean", (4, 8, 20, 12))
    r["nonfinite"] = train(base / "nonfinite", (4, 8, 20, 12), planted={2: ([4], float("nan"))})
    r["small"] = train(base / "small", (4, 8))
    # the set-up is what we think it is
    t = r["trend"]
    assert [t[5][s]["dead_units"] for s in ("act.0", "act.1", "act.2")] == [[1, 5], [3], list(range(30))]
    assert [t[20][s]["dead_units"] for s in ("act.0", "act.1", "act.2")] == [[0, 1, 2, 4, 5], [], list(range(30))]
    assert [t[20][s]["status"] for s in ("act.0", "act.1", "act.2")] == ["critical", "ok", "critical"]
    assert [v["status"] for v in r["warn_only"][20].values()] == ["ok", "warn", "ok"]
    assert [v["status"] for v in r["clean"][20].values()] == ["ok", "ok", "ok"]
    assert [v["status"] for v in r["nonfinite"][20].values()] == ["ok", "ok", "nonfinite"]
    assert r["nonfinite"][20]["act.2"]["dead_fraction"] < 0.10      # critical only through the NaN
    return {name: (str(base / name), expected) for name, expected in r.items()}


@pytest.fixture(autouse=True)
def plain_wide_console(monkeypatch):
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "250")


def run_main(capsys, *argv):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def table(text):
    """Header cells and rows (by first cell) of a rich table printed as plain text."""
    header, rows = None, {}
    for line in text.splitlines():
        if line.startswith("┃") and header is None:
            header = [c.strip() for c in line.strip("┃").split("┃")]
        elif line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = dict(zip(header, cells))
    return header, rows


def percents(text):
    return [float(p) for p in re.findall(r"(\d+(?:\.\d+)?)%", text)]


# ---- summary ----------------------------------------------------------------------------------

def test_summary_table_trends_and_flagged_sites(runs, capsys):
    path, expected = runs["trend"]
    first, last = expected[5], expected[20]
    code, out, err = run_main(capsys, "summary", path)
    assert code == 0
    assert err == ""
    header, rows = table(out)
    assert list(rows) == ["act.0", "act.1", "act.2"]
    arrows = {}
    for site, row in rows.items():
        e = last[site]
        assert row["units"] == str(e["units"])
        assert row["status"] == e["status"]
        assert row["dead"].startswith(f"{len(e['dead_units'])} (")
        assert percents(row["dead"]) == [pytest.approx(100 * e["dead_fraction"], abs=0.05)]
        trend = [c for c in row.values() if "->" in c or "→" in c or "↑" in c or "↓" in c]
        assert len(trend) == 1, row
        assert percents(trend[0]) == [pytest.approx(100 * first[site]["dead_fraction"], abs=0.05),
                                      pytest.approx(100 * last[site]["dead_fraction"], abs=0.05)], trend
        arrows[site] = trend[0].split()[-1]
        # the dead fraction of every report of the run, one character each (tests/test_dashboards.py: the mapping)
        assert row["dead per report"] == cli.sparkline([expected[end][site]["dead_fraction"] for end in sorted(expected)])
    assert table(out)[1]["act.0"]["dead per report"] == "▃▃▆▆"     # 2/8, 2/8, 5/8, 5/8
    # growing, shrinking and flat trends get three different arrows
    assert arrows["act.0"] in "↑↗▲⬆" and arrows["act.1"] in "↓↘▼⬇" and arrows["act.2"] in "→=⟶", arrows

    lines = out.splitlines()
    # one hint line per flagged site: the top cause with its evidence, or the generic hint without one
    causes = ("negative_bias (", "lr_spike (", "dead_from_start (", "dead_input (")
    hint_lines = [line for line in lines if any(h in line for h in (*HINTS.values(), *causes))]
    assert len(hint_lines) == 2                                    # act.0 and act.2; act.1 recovered
    assert hint_lines[0].startswith("act.0 (critical): ") and hint_lines[1].startswith("act.2 (critical): ")
    i0, i2 = lines.index(hint_lines[0]), lines.index(hint_lines[1])
    notes0 = " ".join(lines[i0:i2])
    notes2 = " ".join(lines[i2:])
    assert "0, 1, 2, 4, 5" in notes0                                # act.0's dead unit indices
    full = ", ".join(str(u) for u in range(30))
    assert full not in out                                          # act.2's 30 indices: abbreviated
    assert "0, 1, 2" in notes2
    assert "..." in notes2 or "…" in notes2
    assert len(notes2) - len(hint_lines[1]) < len(full)


def test_summary_json(runs, capsys):
    path, expected = runs["trend"]
    code, out, err = run_main(capsys, "summary", path, "--json")
    assert code == 0
    assert len(out.strip().splitlines()) == 1
    d = json.loads(out)
    assert set(d) == REPORT_FIELDS
    assert isinstance(d["layers"], list)
    last = expected[20]
    assert d["step"] == 20 and d["window"] == 5
    assert [layer["name"] for layer in d["layers"]] == list(last)
    for layer in d["layers"]:
        e = last[layer["name"]]
        assert layer["dead_units"] == e["dead_units"]
        assert layer["units"] == e["units"]
        assert layer["status"] == e["status"]
        assert layer["dead_fraction"] == pytest.approx(e["dead_fraction"])
    assert d["units"] == 68
    assert d["dead_fraction"] == pytest.approx(35 / 68)
    assert d["flagged"] == ["act.0", "act.2"]
    record = runlog.read(path).records[-1]
    assert d == {k: record[k] for k in REPORT_FIELDS}


def test_summary_site_filter(runs, capsys):
    path, expected = runs["trend"]
    code, out, _ = run_main(capsys, "summary", path, "--json", "--site", r"act\.[01]$")
    assert code == 0
    d = json.loads(out)
    assert [layer["name"] for layer in d["layers"]] == ["act.0", "act.1"]
    assert d["units"] == 28
    assert d["dead_fraction"] == pytest.approx(5 / 28)
    assert d["flagged"] == ["act.0"]
    code, out, _ = run_main(capsys, "summary", path, "--site", "2")
    assert code == 0
    assert list(table(out)[1]) == ["act.2"]


@pytest.mark.parametrize("run, level, site, code", [
    ("clean", "warn", None, 0),
    ("clean", "critical", None, 0),
    ("warn_only", "warn", None, 1),
    ("warn_only", "critical", None, 0),
    ("trend", "critical", None, 1),
    ("trend", "warn", None, 1),
    ("trend", "critical", r"act\.1", 0),      # only the recovered site
    ("nonfinite", "critical", None, 1),        # nonfinite counts as above critical
    ("nonfinite", "warn", None, 1),
    ("trend", None, None, 0),                  # no --fail-on: 0 whatever the verdict
])
def test_fail_on(runs, capsys, run, level, site, code):
    path, expected = runs[run]
    argv = ["summary", path] + (["--fail-on", level] if level else []) + (["--site", site] if site else [])
    got, out, err = run_main(capsys, *argv)
    assert got == code
    # independent check of the rule itself
    rank = {"ok": 0, "warn": 1, "critical": 2, "nonfinite": 3}
    statuses = [e["status"] for name, e in expected[20].items() if site is None or re.search(site, name)]
    assert code == int(level is not None and any(rank[s] >= rank[level] for s in statuses))


# ---- compare ----------------------------------------------------------------------------------

def dead_cells(row):
    """A compare row's "dead" cells, one per run that has the site."""
    return [c for c in row.values() if re.fullmatch(r"\d+ \(\d+\.\d%\)", c)]


def dead_cell(layer):
    """What the "dead" cell should read for a layer of the reference."""
    return f"{len(layer['dead_units'])} ({100 * layer['dead_fraction']:.1f}%)"


def test_compare(runs, capsys):
    a, ea = runs["trend"]
    b, eb = runs["clean"]
    code, out, err = run_main(capsys, "compare", a, b)
    assert code == 0
    _, rows = table(out)
    assert list(rows) == ["act.0", "act.1", "act.2"]
    for site, row in rows.items():
        la, lb = ea[20][site], eb[20][site]
        assert dead_cells(row) == [dead_cell(la), dead_cell(lb)], row
        statuses = [c for c in row.values() if c in ("ok", "warn", "critical", "nonfinite")]
        assert statuses == [la["status"], lb["status"]]


def test_compare_runs_with_different_sites(runs, capsys):
    a, ea = runs["trend"]
    b, eb = runs["small"]
    code, out, _ = run_main(capsys, "compare", a, b)
    assert code == 0
    _, rows = table(out)
    assert list(rows) == ["act.0", "act.1", "act.2"]
    assert dead_cells(rows["act.0"]) == [dead_cell(e[20]["act.0"]) for e in (ea, eb)]
    for site in ("act.1", "act.2"):   # only in A
        assert dead_cells(rows[site]) == [dead_cell(ea[20][site])]


# ---- usage and input errors ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    (base / "empty_dir").mkdir()
    (base / "empty_log").mkdir()
    (base / "empty_log" / runlog.FILENAME).write_text("")
    (base / "header_only").mkdir()
    (base / "header_only" / runlog.FILENAME).write_text(
        json.dumps({"type": "header", "started": "2025-01-01T00:00:00+00:00", "deadwatch": "0.1.0",
                    "torch": torch.__version__, "config": {}, "resumed": False}) + "\n")
    (base / "binary").mkdir()
    (base / "binary" / runlog.FILENAME).write_bytes(bytes(range(256)) * 8 + b"\n\x89PNG\r\n\x1a\n")
    (base / "log_is_a_dir").mkdir()
    (base / "log_is_a_dir" / runlog.FILENAME).mkdir()
    (base / "parent" / "child").mkdir(parents=True)   # run logs only below it
    (base / "parent" / "child" / runlog.FILENAME).write_text(
        (base / "header_only" / runlog.FILENAME).read_text() + json.dumps(
            {"type": "report", "time": "2025-01-01T00:00:00+00:00", "step": 5, "window": 5, "units": 0,
             "dead_fraction": 0.0, "layers": [], "flagged": [], "firing_rate": {}}) + "\n")
    return base


@pytest.mark.parametrize("argv", [
    [],
    ["summary"],
    ["summary", "{bad}/no_such_dir"],
    ["summary", "{bad}/empty_dir"],
    ["summary", "{bad}/empty_log"],
    ["summary", "{bad}/header_only"],
    ["summary", "{bad}/binary"],
    ["summary", "{bad}/log_is_a_dir"],
    ["summary", "{bad}/parent"],
    ["summary", "{trend}", "--site", "("],
    ["summary", "{trend}", "--site", "[unclosed"],
    ["summary", "{trend}", "--fail-on", "fatal"],
    ["summary", "{trend}", "--bogus"],
    ["frobnicate"],
    ["compare", "{trend}"],
    ["compare", "{trend}", "{bad}/no_such_dir"],
    ["compare", "{bad}/empty_log", "{trend}"],
], ids=lambda argv: " ".join(argv) or "no-args")
def test_usage_and_input_errors_exit_2_with_one_line(runs, bad_dirs, capsys, argv):
    argv = [a.format(bad=bad_dirs, trend=runs["trend"][0]) for a in argv]
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].strip(), err


# ---- the script and python -m -----------------------------------------------------------------

def env():
    e = {k: v for k, v in os.environ.items()
         if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR")}
    e["COLUMNS"] = "250"
    return e


def script(*args, cwd=None, timeout=120):
    exe = BIN / "deadwatch"
    assert exe.exists(), exe
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env(), cwd=cwd,
                          timeout=timeout)


def module(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "deadwatch", *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=cwd, timeout=timeout)


def test_script_and_python_m_behave_the_same(runs, tmp_path):
    path, expected = runs["trend"]
    for args, code in ((["summary", path, "--json", "--fail-on", "critical"], 1),
                       (["summary", str(tmp_path / "no_such_dir")], 2),
                       ([], 2)):
        a, b = script(*args), module(*args)
        assert (a.returncode, b.returncode) == (code, code), (args, a.stderr, b.stderr)
        assert a.stdout == b.stdout
        assert a.stderr == b.stderr
        assert "Traceback" not in a.stderr
        if code == 2:
            assert a.stdout == ""
            assert len(a.stderr.strip("\n").splitlines()) == 1, a.stderr
        else:
            d = json.loads(a.stdout)
            assert [layer["dead_units"] for layer in d["layers"]] == [e["dead_units"] for e in expected[20].values()]


# ---- demo -------------------------------------------------------------------------------------

def check_demo(logdir: Path, out: str):
    healthy, dying = logdir / "healthy", logdir / "dying"
    for d in (healthy, dying):
        assert (d / runlog.FILENAME).is_file()
        assert any(p.name.startswith("events.out.tfevents") for p in d.iterdir())
    h = runlog.read(str(healthy)).last
    y = runlog.read(str(dying)).last
    assert h.flagged == []
    assert h.dead_fraction < 0.01
    assert any(layer.status == "critical" for layer in y.layers)
    # both summaries printed: each site row twice, the dying run's critical site among them
    site_rows = [line for line in out.splitlines() if line.startswith("│")]
    names = [layer.name for layer in h.layers]
    for name in names:
        assert sum(1 for line in site_rows if line.strip("│").split("│")[0].strip() == name) == 2, out
    assert "critical" in out
    # the dying run's hint: the large-update cause with its score, share and evidence
    flat = " ".join(out.split())
    assert re.search(r"large_update \(score (0\.9\d|1\.00), \d+ of \d+ dead units\): hidden2\.weight: updates "
                     r"\|\|dW\|\|/\|\|W\|\| up to 0\.\d+ around steps \d+–\d+", flat), out
    # and the tensorboard command
    assert re.search(r"tensorboard --logdir \S*" + re.escape(logdir.name), out), out


@pytest.mark.slow
def test_demo_with_logdir(tmp_path):
    logdir = tmp_path / "demo_runs"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    p = script("demo", "--logdir", logdir, cwd=tmp_path, timeout=300)
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    check_demo(logdir, p.stdout)
    # sanity bounds only: CPU seconds (60 s on 2 cores = 120 CPU s), much less sensitive to other load on the machine,
    # and a wall-clock bound that only catches a hang
    assert cpu < 120, f"demo used {cpu:.0f} CPU seconds"
    assert elapsed < 240, f"demo took {elapsed:.0f} s"
