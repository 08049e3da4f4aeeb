"""The examples in examples/ run as documented (each in a subprocess, logs in a temporary dir), print
where their logs went with the commands that read them, and their run logs say what the examples claim."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deadwatch.reporters import runlog

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def run_example(name: str, logdir: Path) -> tuple[str, Path]:
    """Run examples/NAME with --logdir; its stdout, and the deadwatch log dir it printed."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--logdir", str(logdir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    printed = re.search(r"^deadwatch logs: (.+)$", done.stdout, re.M)
    assert printed, done.stdout[-2000:]
    deadwatch_dir = Path(printed.group(1))
    assert f"deadwatch summary {deadwatch_dir}" in done.stdout
    assert re.search(rf"tensorboard --logdir {re.escape(str(logdir))}\b", done.stdout)
    summary = subprocess.run([str(BIN / "deadwatch"), "summary", str(deadwatch_dir)], capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    return done.stdout, deadwatch_dir


def test_plain_loop(tmp_path):
    pytest.importorskip("sklearn")
    out, logdir = run_example("plain_loop.py", tmp_path / "run")
    assert logdir == tmp_path / "run"
    log = runlog.read(str(logdir))
    config = log.headers[0]["config"]
    assert (config["thresholds"]["warn"], config["thresholds"]["critical"], config["include"], config["exclude"]) == (
        0.05, 0.25, [r"\.act$"], [r"^encoder\."])                  # examples/custom.yaml was used
    last = log.last
    assert last.step == 300
    assert [layer.name for layer in last.layers] == ["hidden1.act", "hidden2.act"]  # the frozen encoder is left out
    assert [(layer.name, layer.status) for layer in last.flagged] == [("hidden2.act", "critical")]
    assert "flagged: hidden2.act critical" in out


def test_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    out, logdir = run_example("lightning_example.py", tmp_path)
    assert logdir == tmp_path / "digits" / "version_0" / "deadwatch"  # <trainer.log_dir>/deadwatch
    last = runlog.read(str(logdir)).last
    steps = 4 * math.ceil(math.ceil(1797 / 32) / 2)  # 4 epochs of 57 batches, 2 per optimizer step
    assert f"{steps} optimizer steps ({steps} in Lightning)" in out
    assert last.step == steps
    assert [layer.name for layer in last.layers] == ["net.relu#0", "net.relu#1"]
    assert [layer.units for layer in last.layers] == [16, 32]  # channels


def test_hf_trainer_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out, logdir = run_example("hf_trainer_example.py", tmp_path)
    last = runlog.read(str(logdir)).last
    steps = 5 * 512 // (16 * 2)  # 5 epochs of 512 examples, 16 per batch, 2 batches per optimizer step
    assert f"{steps} optimizer steps ({steps} in the Trainer)" in out
    assert last.step == steps
    assert [layer.name for layer in last.layers] == [
        "bert.encoder.layer.0.intermediate.intermediate_act_fn", "bert.encoder.layer.1.intermediate.intermediate_act_fn",
        "bert.pooler.activation"]


def test_recycle_example(tmp_path):
    pytest.importorskip("sklearn")
    out, logdir = run_example("recycle_dead_units.py", tmp_path)
    assert logdir == tmp_path / "recycled"
    plain, recycled = runlog.read(str(tmp_path / "plain")), runlog.read(str(logdir))
    assert plain.recycles == [] and recycled.recycles                 # only the second run recycles
    assert plain.headers[0]["config"]["recycle"]["every"] == 0
    assert recycled.headers[0]["config"]["recycle"] == {"every": 1, "units": "dead", "max_fraction": 0.5}
    first = {name: units for name, units in recycled.recycles[0][1]["units"].items()}
    assert first and all(units for units in first.values())
    accuracy = re.search(r"plain (\d+\.\d)%, recycled (\d+\.\d)%", out)
    assert accuracy, out
    assert plain.last.dead_fraction > recycled.last.dead_fraction    # fewer units dead at the end



def test_prune_example(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_pruning")
    out, logdir = run_example("prune_dead_units.py", tmp_path)
    assert logdir == tmp_path
    trained = {layer.name: layer for layer in runlog.read(str(logdir)).last.layers}
    assert trained["2"].certified_units and trained["5"].certified_units       # certified while training (SGD)
    scanned = {site: (int(c), int(d)) for site, c, d in re.findall(r"^  (\S+): (\d+) of \d+ channels certified, "
                                                                   r"(\d+) dead on the test digits$", out, re.M)}
    assert set(scanned) == {"2", "5"} and all(c > 0 for c, _ in scanned.values())
    removed = dict(re.findall(r"^  (\S+): removed (\d+) unit\(s\)$", out, re.M))
    assert {site: int(n) for site, n in removed.items()} == {site: c for site, (c, _) in scanned.items()}
    rows = dict((name, row.split()) for name, row in re.findall(r"^\s+(before|after)\s+(.+)$", out, re.M))
    params = {name: int(row[0].replace(",", "")) for name, row in rows.items()}
    macs = {name: int(row[1].replace(",", "")) for name, row in rows.items()}
    assert params["after"] < params["before"] and macs["after"] < macs["before"]
    assert rows["before"][3] == rows["after"][3]                                   # accuracy unchanged
    assert "same predictions on all 400 test digits: True" in out
    assert float(re.search(r"largest output difference (\S+)$", out, re.M).group(1)) <= 1e-5
