"""What the console, TensorBoard and the `deadwatch` command show (issue 9): idle sites, a run that ended
in an error, full site names in pipes, `--fail-on nonfinite`, a CLI that never imports torch, and a
vanished logdir that fails quietly.

Reports are built by hand (LayerReport(...)) and run logs written by hand where that is enough.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from tensorboard.backend.event_processing import event_accumulator as ea

import deadwatch
from deadwatch import cli
from deadwatch.analysis import HINTS, LayerReport, Report
from deadwatch.reporters import runlog
from deadwatch.reporters import tensorboard as tb
from deadwatch.reporters.console import ConsoleReporter, render

ROOT = Path(__file__).resolve().parents[1]
LONG = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
LONGER = "model.transformer.blocks.11.feed_forward.activation_checkpoint_wrapper.act_fn"


def layer(name, status, units=8, dead=(), zero_fraction=0.5, kind="ReLU", observations=64):
    dead = list(dead)
    return LayerReport(name=name, kind=kind, units=units, dead_units=[] if status == "idle" else dead,
                       dead_fraction=None if status == "idle" else len(dead) / units,
                       zero_fraction=None if status == "idle" else zero_fraction,
                       observations=0 if status == "idle" else observations, status=status)


def write_log(run_dir: Path, *reports: Report) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"type": "header", "started": "2025-01-01T00:00:00+00:00", "deadwatch": "0.1.0", "torch": "2.0",
              "config": {}, "resumed": False}]
    lines += [{"type": "report", "time": "2025-01-01T00:00:00+00:00", **r.to_dict(), "firing_rate": {}}
              for r in reports]
    (run_dir / runlog.FILENAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(run_dir)


@pytest.fixture(autouse=True)
def plain_console(monkeypatch):
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "NO_COLOR", "COLUMNS",
                "LINES"):
        monkeypatch.delenv(var, raising=False)


def env():
    e = {k: v for k, v in os.environ.items()
         if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "COLUMNS", "LINES")}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def python(*args, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env(), cwd=ROOT, timeout=timeout)


def run_main(capsys, *argv):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def rows(text: str) -> dict[str, list[str]]:
    """Table rows by first cell (the cells between the vertical bars of a rich table)."""
    header, out = None, {}
    for line in text.splitlines():
        if line.startswith("┃") and header is None:
            header = [c.strip() for c in line.strip("┃").split("┃")]
        elif line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            out[cells[0]] = dict(zip(header, cells)) if header else cells
    return out


def flat(text: str) -> str:
    return " ".join(text.split())


def console_text(report: Report) -> str:
    buf = io.StringIO()
    ConsoleReporter(file=buf).emit(report)
    return buf.getvalue()


# ---- idle sites ---------------------------------------------------------------------------------

def idle_report(step=20, error=None) -> Report:
    return Report(step=step, window=10, error=error, layers=[
        layer("enc.act", "critical", units=10, dead=[0, 1, 2]),
        layer("branch.act", "idle", units=30),
        layer("head.act", "ok", units=10),
    ])


def test_console_shows_an_idle_site_as_idle_not_as_zero_dead():
    text = console_text(idle_report())
    r = rows(text)
    assert r["branch.act"]["status"] == "idle"
    assert r["branch.act"]["dead"] == "-"                  # not "0 (0.0%)", not "0 (-)": not judged
    assert r["branch.act"]["zero frac"] == "-"
    assert r["enc.act"]["dead"] == "3 (30.0%)"
    # the headline counts the judged units only (3 of 20), and says that a site was not judged
    assert "15.0% of 20 units dead" in flat(text)
    assert "1 idle site" in flat(text)
    # no hint for the idle site; one line that says what idle means, naming it
    hints = [line for line in text.splitlines() if any(h in line for h in HINTS.values())]
    assert len(hints) == 1 and hints[0].startswith("enc.act:")
    idle_lines = [line for line in text.splitlines() if "branch.act" in line and not line.startswith("│")]
    assert len(idle_lines) == 1 and "idle" in idle_lines[0] and "not judged" in idle_lines[0]


def test_tensorboard_writes_no_dead_fraction_for_an_idle_site(tmp_path, monkeypatch):
    # the raw heatmap image, drawn when matplotlib is missing (tests/test_dashboards.py tests the figure's cells)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    reporter = tb.TensorBoardReporter(str(tmp_path), deadwatch.config.load(image_every=1))
    reports = [
        Report(step=5, window=5, layers=[layer("a", "ok"), layer("b", "warn", dead=[1])]),
        Report(step=10, window=5, layers=[layer("a", "ok"), layer("b", "idle")]),
        Report(step=15, window=5, layers=[layer("a", "idle"), layer("b", "nonfinite")]),
        Report(step=20, window=5, layers=[layer("a", "idle"), layer("b", "idle")]),
    ]
    for report in reports:
        reporter.emit(report)
    reporter.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()

    def steps(tag):
        return [e.step for e in acc.Scalars(tag)]

    assert steps("deadwatch/dead_fraction/a") == [5, 10]
    assert steps("deadwatch/dead_fraction/b") == [5, 15]
    assert steps("deadwatch/zero_fraction/b") == [5, 15]
    assert steps("deadwatch/dead_fraction/all") == [5, 10, 15]     # every site idle at 20: no fake 0
    assert [e.value for e in acc.Scalars("deadwatch/flagged_sites")] == [1, 0, 1, 0]

    image = acc.Images("deadwatch/heatmap")[-1]
    assert image.step == 20
    img = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"), dtype=np.int64)
    cell = {(site, col): tuple(img[row * tb.CELL_H + tb.CELL_H // 2, col * tb.CELL_W + tb.CELL_W // 2])
            for row, site in enumerate("ab") for col in range(4)}
    idle, nonfinite, zero = cell["b", 1], cell["b", 2], cell["a", 0]
    assert cell["a", 2] == cell["a", 3] == cell["b", 3] == idle      # idle: one colour
    assert idle not in (nonfinite, zero, (255, 255, 255))
    assert nonfinite == (255, 0, 255)
    # not on the black -> red -> yellow -> white scale of the dead fraction
    scale = {tuple(int(round(255 * c)) for c in tb.colour(np.array([[v]]))[:, 0, 0])
             for v in np.linspace(0, 1, 1001)}
    assert all(max(abs(a - b) for a, b in zip(idle, s)) > 20 for s in scale), idle

    text = tb.markdown(reports[1])
    row = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert [c.strip() for c in row.strip("|").split("|")][3:] == ["-", "-", "idle"]


def summary_run(tmp_path) -> str:
    first = Report(step=10, window=10, layers=[
        layer("a", "ok"), layer("b", "idle"), layer("c", "ok"), layer("d", "idle")])
    last = Report(step=20, window=10, layers=[
        layer("a", "idle"), layer("b", "warn", dead=[2]), layer("c", "ok"), layer("d", "idle"), layer("e", "idle")])
    return write_log(tmp_path / "idle_run", first, last)


def test_summary_trend_and_fail_on_with_idle_sites(tmp_path, capsys):
    path = summary_run(tmp_path)
    code, out, err = run_main(capsys, "summary", path)
    assert code == 0, err
    r = rows(out)
    assert list(r) == ["a", "b", "c", "d", "e"]
    assert [r[s]["status"] for s in r] == ["idle", "warn", "ok", "idle", "idle"]
    assert [r[s]["dead"] for s in r] == ["-", "1 (12.5%)", "0 (0.0%)", "-", "-"]
    assert r["a"]["dead trend"] == "0.0% -> idle"
    assert r["b"]["dead trend"] == "idle -> 12.5%"
    assert r["c"]["dead trend"] == "0.0% -> 0.0% →"
    assert r["d"]["dead trend"] == "idle -> idle"
    assert r["e"]["dead trend"] == "new -> idle"
    assert "6.2% of 16 units dead" in flat(out)
    # --fail-on ignores idle sites
    assert run_main(capsys, "summary", path, "--fail-on", "warn")[0] == 1
    assert run_main(capsys, "summary", path, "--fail-on", "critical")[0] == 0
    assert run_main(capsys, "summary", path, "--fail-on", "warn", "--site", "^[ade]$")[0] == 0
    code, out, _ = run_main(capsys, "summary", path, "--json", "--fail-on", "warn", "--site", "a")
    assert code == 0 and json.loads(out)["layers"][0]["dead_fraction"] is None


def test_compare_with_idle_sites(tmp_path, capsys):
    a = write_log(tmp_path / "a", Report(step=10, window=10, layers=[layer("x", "idle"), layer("y", "ok")]))
    b = write_log(tmp_path / "b", Report(step=10, window=10, layers=[layer("x", "warn", dead=[1]),
                                                                       layer("y", "idle")]))
    code, out, err = run_main(capsys, "compare", a, b)
    assert code == 0, err
    r = rows(out)
    assert list(r["x"].values())[1:] == ["-", "idle", "1 (12.5%)", "warn", "-"]
    assert list(r["y"].values())[1:] == ["0 (0.0%)", "ok", "-", "idle", "-"]


# ---- a run that ended in an error ------------------------------------------------------------------

def test_console_says_the_run_ended_in_an_error():
    text = console_text(idle_report(error="RuntimeError: boom [at step 21]"))
    lines = [line for line in text.splitlines() if "RuntimeError: boom [at step 21]" in line]
    assert len(lines) == 1 and "error" in lines[0].replace("RuntimeError", "")
    assert "ended" in lines[0]
    assert "RuntimeError" not in console_text(idle_report())


def test_summary_says_the_run_ended_in_an_error(tmp_path, capsys):
    path = write_log(tmp_path / "err", idle_report(step=10), idle_report(step=23, error="ValueError: bad batch"))
    code, out, err = run_main(capsys, "summary", path)
    assert code == 0
    lines = [line for line in out.splitlines() if "ValueError: bad batch" in line]
    assert len(lines) == 1 and "ended" in lines[0] and "error" in lines[0].replace("ValueError", "")
    # --site keeps the error; --json carries it
    code, out, _ = run_main(capsys, "summary", path, "--site", "head")
    assert "ValueError: bad batch" in out
    code, out, _ = run_main(capsys, "summary", path, "--json", "--site", "head")
    assert json.loads(out)["error"] == "ValueError: bad batch"
    # a run that ended well says nothing of the kind
    path = write_log(tmp_path / "fine", idle_report(step=10))
    code, out, _ = run_main(capsys, "summary", path)
    assert "error" not in out


# ---- --fail-on nonfinite -------------------------------------------------------------------------

def test_fail_on_nonfinite(tmp_path, capsys):
    bad = write_log(tmp_path / "bad", Report(step=5, window=5, layers=[
        layer("a", "ok"), layer("b[x]", "nonfinite"), layer("c", "idle")]))
    critical = write_log(tmp_path / "critical", Report(step=5, window=5, layers=[
        layer("a", "critical", dead=[0, 1, 2]), layer("c", "idle")]))
    code, _, err = run_main(capsys, "summary", bad, "--fail-on", "nonfinite")
    assert code == 1
    assert "b[x]" in err and "a," not in err
    assert run_main(capsys, "summary", critical, "--fail-on", "nonfinite")[0] == 0
    assert run_main(capsys, "summary", critical, "--fail-on", "critical")[0] == 1
    assert run_main(capsys, "summary", bad, "--fail-on", "nonfinite", "--site", "^a$")[0] == 0


# ---- full site names off a terminal -------------------------------------------------------------

def long_report(error=None) -> Report:
    return Report(step=40, window=20, error=error, layers=[
        layer(LONG, "critical", units=3072, dead=range(40), kind="GELUActivation"),
        layer(LONGER, "ok", units=4096, kind="SiLU"),
        layer("short", "idle"),
    ])


def assert_whole_names_in_rows(text):
    names = [line.strip("│").split("│")[0].strip() for line in text.splitlines() if line.startswith("│")]
    for name in (LONG, LONGER):
        assert name in names, text


def test_console_reporter_prints_whole_site_names_into_a_file():
    text = console_text(long_report())
    assert_whole_names_in_rows(text)
    hint = next(line for line in text.splitlines() if HINTS["critical"][:20] in line)
    assert hint.startswith(f"{LONG}: ")


def test_a_narrow_terminal_folds_site_names_but_never_cuts_them():
    console = Console(file=io.StringIO(), width=60, force_terminal=True, color_system=None)
    console.print(render(long_report()))
    text = console.file.getvalue()
    pieces = [line.strip("│").split("│")[0].strip() for line in text.splitlines() if line.startswith("│")]
    assert not any("…" in piece for piece in pieces), text
    assert LONG in "".join(pieces) and LONGER in "".join(pieces), text


def test_summary_and_compare_through_a_pipe_print_whole_site_names(tmp_path):
    path = write_log(tmp_path / "long", long_report())
    other = write_log(tmp_path / "other", Report(step=10, window=20, layers=[layer(LONG, "ok", units=3072)]))
    p = python("-m", "deadwatch", "summary", path)
    assert p.returncode == 0, p.stderr
    assert_whole_names_in_rows(p.stdout)
    assert "…" not in p.stdout
    p = python("-m", "deadwatch", "compare", path, other)
    assert p.returncode == 0, p.stderr
    assert_whole_names_in_rows(p.stdout)
    assert "…" not in p.stdout


# ---- the CLI does not import torch -----------------------------------------------------------------

def test_summary_does_not_import_torch(tmp_path):
    path = write_log(tmp_path / "run", Report(step=5, window=5, layers=[layer(LONG, "warn", dead=[3])]))
    code = textwrap.dedent(f"""
        import sys
        from deadwatch import cli
        assert cli.main(['summary', {path!r}]) == 0
        assert cli.main(['compare', {path!r}, {path!r}]) == 0
        assert 'torch' not in sys.modules, 'torch imported'
        print('NO TORCH')
    """)
    p = python("-c", code)
    assert p.returncode == 0, p.stderr
    assert "NO TORCH" in p.stdout and LONG in p.stdout
    p = python("-X", "importtime", "-m", "deadwatch", "summary", path)
    assert p.returncode == 0, p.stderr
    assert LONG in p.stdout
    imported = [line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")]
    assert "deadwatch.cli" in imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], "torch imported"


def test_import_deadwatch_is_lazy_and_its_names_work():
    code = textwrap.dedent("""
        import sys
        import deadwatch
        assert 'torch' not in sys.modules, 'import deadwatch imported torch'
        assert deadwatch.__version__ == '0.1.0'
        assert deadwatch.DeadwatchError.__name__ == 'DeadwatchError'
        assert 'torch' not in sys.modules
        names = {}
        exec('from deadwatch import *', names)
        assert set(deadwatch.__all__) <= set(names), set(deadwatch.__all__) - set(names)
        assert names['watch'] is deadwatch.watch and names['Monitor'] is deadwatch.Monitor
        assert callable(deadwatch.config.load)
        assert set(deadwatch.__all__) <= set(dir(deadwatch))
        try:
            deadwatch.no_such_name
        except AttributeError:
            print('OK')
    """)
    p = python("-c", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "OK"


# ---- a vanished logdir ----------------------------------------------------------------------------

def test_vanished_logdir_prints_no_traceback(tmp_path):
    logdir = tmp_path / "run"
    code = textwrap.dedent(f"""
        import shutil, torch
        from torch import nn
        import deadwatch
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        with deadwatch.watch(model, logdir={str(logdir)!r}, reporters=['jsonl', 'tensorboard'],
                             report_every=2) as monitor:
            for step in range(12):
                model(torch.randn(4, 4)).sum().backward()
                monitor.step()
                if step == 4:
                    shutil.rmtree({str(logdir)!r})
        print('steps', monitor.steps)
    """)
    p = python("-c", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "steps 12"
    assert "Traceback" not in p.stderr and "Exception in thread" not in p.stderr, p.stderr
    warned = [line for line in p.stderr.splitlines() if "RuntimeWarning" in line]
    assert sum("TensorBoardReporter" in line for line in warned) == 1, p.stderr
    assert sum("RunLogReporter" in line for line in warned) == 1, p.stderr


def test_tensorboard_reporter_raises_a_vanished_logdir_once_and_quietly(tmp_path):
    """The reporter alone: the first emit after the logdir vanished raises (the monitor then drops it with one
    warning); tensorboard's writer thread prints nothing."""
    logdir = tmp_path / "tb"
    code = textwrap.dedent(f"""
        import shutil, time
        import deadwatch
        from deadwatch.analysis import LayerReport, Report
        from deadwatch.reporters.tensorboard import TensorBoardReporter
        def report(step):
            return Report(step=step, window=5, layers=[LayerReport('a', 'ReLU', 4, [1], 0.25, 0.5, 8, 'critical')])
        reporter = TensorBoardReporter({str(logdir)!r}, deadwatch.config.load())
        reporter.emit(report(5))
        shutil.rmtree({str(logdir)!r})
        try:
            reporter.emit(report(10))
        except OSError as e:
            print('raised', type(e).__name__)
        reporter.emit(report(15))
        reporter.close()
        time.sleep(0.5)
        print('closed')
    """)
    p = python("-c", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["raised", "FileNotFoundError", "closed"]
    assert p.stderr == ""
