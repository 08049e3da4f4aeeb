"""Checkpoints: Monitor.state_dict() / load_state_dict() across a restart.

A run of 30 steps is saved (model, optimizer and monitor state, with torch.save to a file),
rebuilt from fresh objects, loaded and trained 30 more steps: its report must equal the report
of 60 straight steps. The `act` site's units are gated by the data so that units die and
revive around the restart, and the window (40 steps) spans it:

    unit 0   fires in every step                      alive
    unit 1   planted dead (bias -1e4)                 dead
    unit 2   fires in steps 0-15 only                 dead at 60 (last fired 15 < 60 - 40)
    unit 3   fires in steps 22-27 only                alive at 60 only if the restart kept its last step
    unit 4   fires in steps 45-50 only                dead at 30, revives after the restart
    unit 5   fires at step 29 only (the last saved)   alive at 60
    unit 6   fires at step 30 only (the first after)  dead at 30, alive at 60
    unit 7   fires at step 19 only                    alive at 30, dead at 60 (19 < 20)

The site `relu#0` (F.relu after a trained layer) has whatever the training gives it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.reporters import runlog

WINDOW = 40
TOTAL = 60
RESTART = 30
BATCH = 6
UNITS = 8
FIRES = {0: range(0, TOTAL), 2: range(0, 16), 3: range(22, 28), 4: range(45, 51), 5: [29], 6: [30], 7: [19]}


class Gated(nn.Module):
    def __init__(self, units: int = UNITS):
        super().__init__()
        self.gate = nn.Linear(units, units)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(units, 4)
        self.fc3 = nn.Linear(4, 1)
        with torch.no_grad():
            self.gate.weight.copy_(2 * torch.eye(units))
            self.gate.bias.fill_(-0.5)
            self.gate.bias[1] = -1e4
        self.gate.requires_grad_(False)  # the gating stays as designed; fc2 and fc3 train

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.act(self.gate(x)))))


def data(step: int, units: int = UNITS) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, units, generator=g) * 0.1 - 1.0   # gate pre-activation about -2.5: no unit fires
    for unit, steps in FIRES.items():
        if step in steps and unit < units:
            x[: BATCH // 2, unit] = 1.0                        # pre-activation 1.5 on half the batch
    return x


def expected_dead(steps: int) -> list[int]:
    start = max(steps - WINDOW, 0)
    return [u for u in range(UNITS) if not any(start <= s < steps for s in FIRES.get(u, []))]


def build(units: int = UNITS, seed: int = 0):
    torch.manual_seed(seed)
    model = Gated(units)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    return model, opt


def train_step(model, opt, monitor, step: int, units: int = UNITS, load=None) -> None:
    opt.zero_grad()
    model(data(step, units)).square().mean().backward()
    if load is not None:   # load_state_dict after the first forward of the resumed run
        load()
    opt.step()
    monitor.step()


def straight(report_every: int, logdir=None, reporters=(), history=None, **cfg) -> deadwatch.Report:
    """60 steps in one go; `history` (a list) receives report().to_dict() after every step."""
    model, opt = build()
    with deadwatch.watch(model, logdir=logdir, reporters=list(reporters), window=WINDOW,
                         report_every=report_every, **cfg) as monitor:
        for step in range(TOTAL):
            train_step(model, opt, monitor, step)
            if history is not None:
                history.append(monitor.report().to_dict())
        report = monitor.report()
    return report


def first_half(path: Path, report_every: int, logdir=None, reporters=(), **cfg) -> deadwatch.Report:
    model, opt = build()
    monitor = deadwatch.watch(model, logdir=logdir, reporters=list(reporters), window=WINDOW,
                              report_every=report_every, **cfg)
    for step in range(RESTART):
        train_step(model, opt, monitor, step)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "monitor": monitor.state_dict()}, path)
    report = monitor.report()
    monitor.close()
    return report


def second_half(path: Path, report_every: int, load_when: str = "before_forward", logdir=None,
                reporters=(), history=None, **cfg) -> deadwatch.Report:
    model, opt = build(seed=1234)   # fresh objects, other weights until the checkpoint is loaded
    checkpoint = torch.load(path)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    monitor = deadwatch.watch(model, logdir=logdir, reporters=list(reporters), window=WINDOW,
                              report_every=report_every, **cfg)
    load = lambda: monitor.load_state_dict(checkpoint["monitor"])  # noqa: E731
    with monitor:
        for step in range(RESTART, TOTAL):
            if step == RESTART and load_when == "before_forward":
                load()
            train_step(model, opt, monitor, step,
                       load=load if (step == RESTART and load_when == "after_forward") else None)
            if history is not None:
                history.append(monitor.report().to_dict())
        report = monitor.report()
    return report


# ---- the resumed run equals the straight run -------------------------------------------------------

def test_straight_run_setup():
    """The schedule does what the module docstring says (so the resume tests can fail)."""
    report = straight(report_every=20, count_subsample=1)
    act = report.layer("act")
    assert act.dead_units == expected_dead(TOTAL) == [1, 2, 7]
    assert [layer.name for layer in report.layers] == ["act", "relu#0"]
    assert act.observations == 20 * BATCH  # the interval since the report at step 40


@pytest.mark.parametrize("subsample", [1, 2], ids=["exact", "subsampled"])
@pytest.mark.parametrize("report_every", [60, 30, 20],
                         ids=["interval-spans-restart", "restart-at-report", "restart-mid-interval"])
@pytest.mark.parametrize("load_when", ["before_forward", "after_forward"])
def test_resumed_run_equals_straight_run(tmp_path, report_every, load_when, subsample):
    """The final report, and report() after every step of the resumed half, equal the straight run's.
    report_every=60: the interval (zero_fraction, observations) runs from step 0 across the restart;
    30: the restart falls on a periodic report (its interval reset is still pending in the checkpoint)."""
    cfg = {"count_subsample": subsample}
    expected_history, resumed_history = [], []
    expected = straight(report_every, history=expected_history, **cfg)
    half = first_half(tmp_path / "ckpt.pt", report_every, **cfg)
    assert half.layer("act").dead_units == expected_dead(RESTART) == [1, 4, 6]
    resumed = second_half(tmp_path / "ckpt.pt", report_every, load_when, history=resumed_history, **cfg)
    assert resumed.to_dict() == expected.to_dict()
    for step, (got, want) in enumerate(zip(resumed_history, expected_history[RESTART:]), RESTART + 1):
        assert got == want, f"report() after step {step} differs from the straight run's"
    assert len(resumed_history) == TOTAL - RESTART
    for got, want in zip(resumed.layers, expected.layers):
        assert list(got.firing_rate) == pytest.approx(list(want.firing_rate), abs=1e-12), got.name


def test_state_dict_is_plain_and_loads_with_weights_only(tmp_path):
    """torch.load's default (weights_only=True) reads a monitor state back."""
    first_half(tmp_path / "ckpt.pt", 20)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["monitor"]
    assert state["steps"] == RESTART
    assert set(state["sites"]) == {"act", "relu#0"}


@pytest.mark.parametrize("load_when", ["before_forward", "after_forward"])
def test_changed_unit_count_warns_and_starts_over(tmp_path, load_when):
    first_half(tmp_path / "ckpt.pt", 20, count_subsample=1)
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    units = UNITS + 1
    model, opt = build(units)   # `act` now has 9 units; `relu#0` still 4
    monitor = deadwatch.watch(model, reporters=[], window=WINDOW, report_every=20, count_subsample=1)
    new_steps = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(RESTART, RESTART + new_steps):
            if step == RESTART and load_when == "before_forward":
                monitor.load_state_dict(checkpoint["monitor"])
            load = (lambda: monitor.load_state_dict(checkpoint["monitor"])) \
                if (step == RESTART and load_when == "after_forward") else None
            train_step(model, opt, monitor, step, units, load=load)
    ours = [w for w in caught if "deadwatch" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert issubclass(ours[0].category, RuntimeWarning)
    assert "'act'" in str(ours[0].message) and "8" in str(ours[0].message) and "9" in str(ours[0].message)
    report = monitor.report()
    monitor.close()
    assert report.step == RESTART + new_steps
    act = report.layer("act")
    # started over at step 30: only units 0 (every step) and 6 (step 30) fired since
    assert act.units == units
    assert act.dead_units == [u for u in range(units) if u not in (0, 6)]
    assert act.observations == new_steps * BATCH
    # relu#0 kept its counters: the interval since the report at step 20 goes on
    assert report.layer("relu#0").observations == (RESTART - 20 + new_steps) * BATCH


BAD_STATES = {
    "not a mapping": [1, 2, 3],
    "None": None,
    "no version": {"steps": 3, "reported_step": 0, "interval_reset_pending": False, "sites": {}},
    "future version": {"version": 3, "steps": 3, "reported_step": 0, "interval_reset_pending": False, "sites": {}},
    "version only": {"version": 1},
    "no sites": {"version": 1, "steps": 3, "reported_step": 0, "interval_reset_pending": False},
    "sites not a mapping": {"version": 1, "steps": 3, "reported_step": 0, "interval_reset_pending": False,
                            "sites": [1, 2]},
    "site without counters": {"version": 1, "steps": 3, "reported_step": 0, "interval_reset_pending": False,
                              "sites": {"act": {"kind": "ReLU", "units": UNITS}}},
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_bad_state_raises_config_error(name):
    model, opt = build()
    with deadwatch.watch(model, reporters=[], window=WINDOW) as monitor:
        for step in range(2):
            train_step(model, opt, monitor, step)
        before = monitor.report().to_dict()
        with pytest.raises(deadwatch.ConfigError):
            monitor.load_state_dict(BAD_STATES[name])
        # a rejected state changes nothing, and training goes on
        assert monitor.report().to_dict() == before
        train_step(model, opt, monitor, 2)
        assert monitor.report().step == 3


def test_bad_site_state_raises_before_the_site_runs():
    """A malformed entry for a site that has not run yet must be rejected by load_state_dict(), not
    blow up later inside a forward hook."""
    model, opt = build()
    monitor = deadwatch.watch(model, reporters=[], window=WINDOW)
    with pytest.raises(deadwatch.ConfigError):
        monitor.load_state_dict(BAD_STATES["site without counters"])
    with monitor:
        train_step(model, opt, monitor, 0)   # must not raise
    assert monitor.report().step == 1


# ---- the run log goes on in the same logdir ------------------------------------------------------------

def _records(logdir: Path) -> list[dict]:
    with open(logdir / "deadwatch.jsonl") as f:
        return [json.loads(line) for line in f]


def test_run_log_continues_after_restart(tmp_path):
    logdir = tmp_path / "run"
    first_half(tmp_path / "ckpt.pt", 10, logdir=logdir, reporters=["jsonl"])
    second_half(tmp_path / "ckpt.pt", 10, logdir=logdir, reporters=["jsonl"])
    records = _records(logdir)
    headers = [r for r in records if r["type"] == "header"]
    reports = [r for r in records if r["type"] == "report"]
    assert [h["resumed"] for h in headers] == [False, True]
    assert records[0]["type"] == "header"
    second_header = records.index(headers[1])
    assert [r["step"] for r in records[second_header + 1:]] == [40, 50, 60]
    assert [r["step"] for r in reports] == [10, 20, 30, 40, 50, 60]

    # every report equals the straight run's report at the same step
    straight(10, logdir=tmp_path / "straight", reporters=["jsonl"])
    plain = [r for r in _records(tmp_path / "straight") if r["type"] == "report"]
    strip = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    assert [strip(r) for r in reports] == [strip(r) for r in plain]

    log = runlog.read(str(logdir))
    assert [r.step for r in log.reports] == [10, 20, 30, 40, 50, 60]


def test_summary_trend_spans_both_runs(tmp_path):
    logdir = tmp_path / "run"
    first_half(tmp_path / "ckpt.pt", 10, logdir=logdir, reporters=["jsonl"])
    second_half(tmp_path / "ckpt.pt", 10, logdir=logdir, reporters=["jsonl"])
    reports = [r for r in _records(logdir) if r["type"] == "report"]
    first = {layer["name"]: layer for layer in reports[0]["layers"]}["act"]
    # step 10: units 1, 3, 4, 5, 6, 7 have not fired yet; step 60: units 1, 2, 7 are dead
    assert first["dead_units"] == expected_dead(10) == [1, 3, 4, 5, 6, 7]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    out = subprocess.run([sys.executable, "-m", "deadwatch", "summary", str(logdir)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "step 60" in text and "6 reports" in text, text
    act_row = next(line for line in text.splitlines() if re.search(r"\bact\b", line) and "ReLU" in line)
    assert "75.0% -> 37.5%" in act_row, act_row
    assert "↓" in act_row, act_row
