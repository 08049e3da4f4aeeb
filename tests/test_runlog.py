"""The run log: <logdir>/deadwatch.jsonl, a header then one record per report, flushed as written.

Expected figures come from a plain re-computation of each training step's activations
(F.linear + relu on the same weights and inputs), not from deadwatch's own counters.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import deadwatch
from deadwatch import cli
from deadwatch.config import load as load_config
from deadwatch.reporters import runlog
from planted import report_ends, watch_planted

WARN, CRITICAL = 0.01, 0.10
REPORT_FIELDS = {"step", "window", "units", "dead_fraction", "layers", "flagged"}
LAYER_FIELDS = {"name", "kind", "units", "dead_units", "dead_fraction", "zero_fraction", "observations", "status"}


# ---- reference figures for the tiny MLP with planted dead units (tests/planted.py) ---------

def expected_report(history, step, interval_start, window, warn=WARN, critical=CRITICAL):
    """The verdict after `step` steps from the per-step figures, straight from the definitions."""
    layers = {}
    for name in history[0]:
        counts = np.stack([history[s][name][0] for s in range(len(history))])[:step]
        bad = np.stack([history[s][name][1] for s in range(len(history))])[:step]
        obs = np.array([history[s][name][2] for s in range(len(history))])[:step]
        lo = max(step - window, 0)
        fired = counts[lo:step] > 0
        dead = [int(u) for u in range(counts.shape[1]) if not fired[:, u].any()]
        units = counts.shape[1]
        n_obs = int(obs[interval_start:step].sum())
        rate = counts[interval_start:step].sum(0) / n_obs
        frac = len(dead) / units
        status = ("nonfinite" if bad[lo:step].any() else
                  "critical" if frac >= critical else "warn" if frac >= warn else "ok")
        layers[name] = {"units": units, "dead_units": dead, "dead_fraction": frac, "firing_rate": rate,
                        "zero_fraction": float(1.0 - rate.mean()), "observations": n_obs, "status": status}
    return {"step": step, "layers": layers}


def train(logdir, *, sizes=(4, 8, 20), planted=None, steps=23, report_every=5, window=5, batch=16,
          seed=0, reporters=("jsonl", "tensorboard"), on_report=None, **overrides):
    """Forwards (train mode, no optimiser: weights stay put) under deadwatch.watch.
    Returns (expected reports, deadwatch's own Reports taken right after each periodic report)."""
    history, own = watch_planted(logdir, sizes=sizes, planted=planted or {}, steps=steps,
                                 report_every=report_every, window=window, batch=batch, seed=seed,
                                 reporters=reporters, on_report=on_report, **overrides)
    ends = report_ends(steps, report_every)
    expected = [expected_report(history, end, (end - 1) // report_every * report_every, window) for end in ends]
    return expected, own


def lines_of(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def check_record(record, exp):
    assert record["type"] == "report"
    assert record["step"] == exp["step"]
    assert [layer["name"] for layer in record["layers"]] == list(exp["layers"])
    units = sum(e["units"] for e in exp["layers"].values())
    dead = sum(len(e["dead_units"]) for e in exp["layers"].values())
    assert record["units"] == units
    assert record["dead_fraction"] == pytest.approx(dead / units, abs=1e-12)
    for layer in record["layers"]:
        e = exp["layers"][layer["name"]]
        assert LAYER_FIELDS <= set(layer), layer
        assert layer["units"] == e["units"]
        assert layer["dead_units"] == e["dead_units"], layer["name"]
        assert layer["dead_fraction"] == pytest.approx(e["dead_fraction"], abs=1e-12)
        assert layer["observations"] == e["observations"]
        assert layer["zero_fraction"] == pytest.approx(e["zero_fraction"], abs=1e-9)
        assert layer["status"] == e["status"]
        assert np.allclose(record["firing_rate"][layer["name"]], e["firing_rate"], atol=1e-6)
    assert record["flagged"] == [n for n, e in exp["layers"].items() if e["status"] != "ok"]


# ---- the record layout ------------------------------------------------------------------------

def test_header_then_one_flushed_record_per_report(tmp_path):
    path = tmp_path / runlog.FILENAME
    seen_while_running = []

    def on_report(steps):  # read the file from outside while the monitor still holds it open
        text = path.read_text(encoding="utf-8")
        seen_while_running.append((steps, text.endswith("\n"), len(text.splitlines())))

    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    planted = {0: [1, 5], 1: [3]}
    expected, own = train(tmp_path, planted=planted, steps=23, report_every=5, window=5, on_report=on_report,
                          count_subsample=1)
    after = dt.datetime.now(dt.timezone.utc)

    # the set-up is what we think it is: exactly the planted units are dead
    for e in expected:
        assert e["layers"]["act.0"]["dead_units"] == [1, 5]
        assert e["layers"]["act.1"]["dead_units"] == [3]
    assert [e["step"] for e in expected] == [5, 10, 15, 20, 23]

    # flushed after every record: header + k reports, whole lines, while training runs
    assert seen_while_running == [(5, True, 2), (10, True, 3), (15, True, 4), (20, True, 5)]

    lines = lines_of(path)
    assert len(lines) == 1 + len(expected)
    records = [json.loads(line) for line in lines]

    header = records[0]
    assert header["type"] == "header"
    assert header["resumed"] is False
    assert header["deadwatch"] == deadwatch.__version__
    assert header["torch"] == torch.__version__
    started = dt.datetime.fromisoformat(header["started"])
    assert started.tzinfo is not None
    assert before <= started <= after
    cfg = header["config"]
    assert cfg["window"] == 5 and cfg["report_every"] == 5
    assert cfg["thresholds"] == {"warn": WARN, "critical": CRITICAL, "dormant": 0.1, "saturated": 0.1, "rare": 0.1}
    assert cfg["reporters"] == ["jsonl", "tensorboard"]
    # the header's config is the config used: loading it gives the same Config
    assert load_config(cfg) == load_config(None, window=5, report_every=5, reporters=["jsonl", "tensorboard"],
                                           count_subsample=1)

    for record, exp, report in zip(records[1:], expected, own):
        check_record(record, exp)
        dt.datetime.fromisoformat(record["time"])
        assert {k: record[k] for k in REPORT_FIELDS} == report.to_dict()  # the Report.to_dict() fields

    # the reader gives back the same
    log = runlog.read(str(tmp_path))
    assert log.skipped == 0
    assert len(log.headers) == 1
    assert [r.step for r in log.reports] == [5, 10, 15, 20, 23]
    assert [layer.dead_units for layer in log.last.layers] == [[1, 5], [3]]


def test_firing_rates_capped_at_4096_units(tmp_path):
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4096)
            self.act_a = nn.ReLU()
            self.b = nn.Linear(3, 4097)
            self.act_b = nn.ReLU()

        def forward(self, x):
            return self.act_a(self.a(x)).sum() + self.act_b(self.b(x)).sum()

    torch.manual_seed(0)
    net = Wide()
    with torch.no_grad():
        net.a.bias.fill_(100.0)
        net.b.bias.fill_(100.0)
        net.a.bias[[7, 4095]] = -1e4
        net.b.bias[[0, 4096]] = -1e4
    x = torch.randn(4, 3)
    with deadwatch.watch(net, logdir=tmp_path, reporters=["jsonl"], report_every=1, window=5,
                         count_subsample=1) as monitor:
        with torch.no_grad():
            net(x)
        monitor.step()
    assert runlog.FIRING_RATE_CAP == 4096
    record = json.loads(lines_of(tmp_path / runlog.FILENAME)[1])
    layers = {layer["name"]: layer for layer in record["layers"]}
    assert layers["act_a"]["dead_units"] == [7, 4095]
    assert layers["act_b"]["dead_units"] == [0, 4096]  # wider sites keep their dead unit indices
    assert set(record["firing_rate"]) == {"act_a"}
    rates = np.array(record["firing_rate"]["act_a"])
    expected = np.ones(4096)
    expected[[7, 4095]] = 0.0
    assert rates.shape == (4096,)
    assert np.array_equal(rates, expected)


# ---- SIGKILL --------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    import deadwatch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[0].bias.fill_(0.5)
        net[0].bias[[2, 6]] = -1e4          # planted dead units of site "1"
        net[2].weight.abs_()
        net[2].bias.fill_(1.0)              # site "3": inputs >= 0, weights >= 0, bias 1: always fires
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    deadline = time.monotonic() + 120       # never outlive a broken test by long
    with deadwatch.watch(net, logdir=sys.argv[1], reporters=["jsonl", "tensorboard"], report_every=5,
                         window=5) as monitor:
        while time.monotonic() < deadline:
            x = torch.randn(16, 4, generator=g)
            y = torch.randint(0, 3, (16,), generator=g)
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()
            time.sleep(0.01)
""")


def complete_reports(path):
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    return sum(1 for line in text.split("\n")[:-1] if '"type": "report"' in line)


def test_sigkill_keeps_every_report(tmp_path, capsys):
    logdir = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = logdir / runlog.FILENAME
    proc = subprocess.Popen([sys.executable, str(script), str(logdir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while complete_reports(path) < 2:
            assert proc.poll() is None, f"training process exited early: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no 2 reports within 60 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    seen = complete_reports(path)
    assert seen >= 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line (killed mid-write) may be skipped
        log = runlog.read(str(logdir))
    assert len(log.headers) == 1 and log.headers[0]["resumed"] is False
    assert len(log.records) == seen   # every complete report survived
    assert [r.step for r in log.reports] == [5 * (i + 1) for i in range(seen)]
    for report in log.reports:
        assert [layer.name for layer in report.layers] == ["1", "3"]
        assert report.layer("1").dead_units == [2, 6]
        assert report.layer("1").status == "critical"
        assert report.layer("3").dead_units == []

    capsys.readouterr()
    assert cli.main(["summary", str(logdir)]) == 0
    out = capsys.readouterr().out
    assert "critical" in out and "2, 6" in out
    assert cli.main(["summary", str(logdir), "--json"]) == 0
    last = json.loads(capsys.readouterr().out)
    assert last["step"] == 5 * seen
    assert [layer["dead_units"] for layer in last["layers"]] == [[2, 6], []]


# ---- torn and corrupt lines -------------------------------------------------------------------

def test_torn_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    expected, _ = train(tmp_path, planted={0: [2]}, steps=15, report_every=5, reporters=["jsonl"], count_subsample=1)
    path = tmp_path / runlog.FILENAME
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    last_len = len(data) - last_start
    path.write_bytes(data[:last_start + last_len // 2])   # the last record torn halfway

    with pytest.warns(Warning):
        log = runlog.read(str(tmp_path))
    assert log.skipped == 1
    assert [r.step for r in log.reports] == [5, 10]
    for record, exp in zip(log.records, expected):
        check_record(record, exp)

    capsys.readouterr()
    assert cli.main(["summary", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 10
    assert "Traceback" not in captured.err
    assert captured.err.strip()              # the skipped line is reported on stderr


GARBAGE = {
    "text": "this is not JSON at all",
    "binary": "\x00\x01\ufffd\ufffd garbage \x7f",
    "half_record": '{"type": "report", "time": "2025-01-01T00:00:00+00:00", "step": 7, "wind',
    "report_missing_fields": '{"type": "report", "step": 7}',
    "report_bad_layers": '{"type": "report", "step": 7, "window": 5, "layers": [{"name": "x"}]}',
    "not_an_object": "[1, 2, 3]",
    "unknown_type": '{"type": "mystery", "payload": 1}',
}


@pytest.mark.parametrize("where", ["after_header", "between_reports"])
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_corrupt_line_in_the_middle_is_skipped(tmp_path, capsys, kind, where):
    expected, _ = train(tmp_path, planted={0: [2]}, steps=15, report_every=5, reporters=["jsonl"], count_subsample=1)
    path = tmp_path / runlog.FILENAME
    lines = lines_of(path)
    at = 1 if where == "after_header" else 2
    lines.insert(at, GARBAGE[kind])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.warns(Warning):
        log = runlog.read(str(tmp_path))
    assert log.skipped == 1
    assert len(log.headers) == 1
    assert [r.step for r in log.reports] == [5, 10, 15]
    for record, exp in zip(log.records, expected):
        check_record(record, exp)

    capsys.readouterr()
    assert cli.main(["summary", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip()              # the skipped line is reported on stderr
    assert cli.main(["summary", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 15


# ---- restarted runs -------------------------------------------------------------------------

def test_new_run_in_a_used_logdir_appends_a_new_run(tmp_path):
    """A second run (no load_state_dict) in the same logdir: a header that is not `resumed`, a warning
    that TensorBoard will overlay the runs, and readers take the latest run only."""
    first, _ = train(tmp_path, planted={0: [1]}, steps=10, report_every=5, reporters=["jsonl"], count_subsample=1)
    with pytest.warns(RuntimeWarning, match="already holds a run.*TensorBoard will overlay"):
        second, _ = train(tmp_path, planted={0: [1, 2, 3]}, steps=7, report_every=5, reporters=["jsonl"],
                          count_subsample=1)
    records = [json.loads(line) for line in lines_of(tmp_path / runlog.FILENAME)]
    assert [r["type"] for r in records] == ["header", "report", "report", "header", "report", "report"]
    assert records[0]["resumed"] is False
    assert records[3]["resumed"] is False
    for record, exp in zip(records[1:3] + records[4:], first + second):
        check_record(record, exp)

    log = runlog.read(str(tmp_path))
    assert [h["resumed"] for h in log.headers] == [False, False]
    assert [r.step for r in log.reports] == [5, 10, 5, 7]
    assert log.earlier_runs == 1
    assert [r.step for r in log.latest().reports] == [5, 7]
    assert log.last.layer("act.0").dead_units == [1, 2, 3]


def test_restart_after_a_torn_last_line_keeps_the_new_header_and_reports(tmp_path):
    """A run killed mid-write leaves a torn last line without its newline; the restarted run
    must still get its own header and every one of its reports."""
    first, _ = train(tmp_path, planted={0: [1]}, steps=10, report_every=5, reporters=["jsonl"], count_subsample=1)
    path = tmp_path / runlog.FILENAME
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:last_start + (len(data) - last_start) // 2])
    with pytest.warns(RuntimeWarning, match="already holds a run"):
        second, _ = train(tmp_path, planted={0: [4]}, steps=10, report_every=5, reporters=["jsonl"], count_subsample=1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = runlog.read(str(tmp_path))
    assert log.skipped == 1 and len(caught) == 1
    assert [h["resumed"] for h in log.headers] == [False, False]
    assert [r.step for r in log.reports] == [5, 5, 10]
    assert [r.step for r in log.latest().reports] == [5, 10]
    for record, exp in zip(log.records, first[:1] + second):
        check_record(record, exp)
