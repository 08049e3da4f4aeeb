"""The verdict: window rule at its edges, status thresholds, report intervals, site selection,
unit_axis, Report.to_dict.

Most tests drive an elementwise model (unit u sees input column u only), so which unit fires in
which step is set by the test itself and the expected verdict follows from the schedule.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch

pytest.register_assert_rewrite("reference")
from reference import Probe, check_report, reference, run_watch  # noqa: E402
from planted import Affine  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def unit_net(n):
    return nn.Sequential(Affine(n), nn.ReLU())


def scheduled(units, firing, batch=3):
    """One input batch: the units in `firing` get +1 in every row, the others -1."""
    x = -torch.ones(batch, units)
    x[:, sorted(firing)] = 1.0
    return x


def expected_dead(schedule, units, window, steps):
    window_steps = range(max(steps - window, 0), steps)
    return [u for u in range(units) if not any(u in schedule[s] for s in window_steps)]


# ---- the window rule ------------------------------------------------------------------------------

def test_window_edges_and_revival():
    """window=3. u0 fires at step 0 only, u1 at step 2 only, u2 never, u3 always, u4 at steps 0 and 5."""
    schedule = [{0, 3, 4}, {3}, {1, 3}, {3}, {3}, {3, 4}, {3}]
    reports = run_watch(unit_net(5), [scheduled(5, f) for f in schedule], window=3, every_step=True)
    dead = [r.layer("1").dead_units for r in reports]
    assert dead == [
        [1, 2],        # 1 step seen (< window): dead = fired in none of them
        [1, 2],
        [2],           # u0 fired at step 0: still inside the last 3 steps
        [0, 2, 4],     # after 4 steps step 0 has left the window: u0 and u4 dead
        [0, 2, 4],
        [0, 1, 2],     # u4 revived at step 5; u1's step 2 has left the window
        [0, 1, 2],
    ]
    for s, r in enumerate(reports, start=1):
        assert r.step == s and r.window == 3
        assert dead[s - 1] == expected_dead(schedule, 5, 3, s)


def test_window_one():
    schedule = [{0, 1}, {1}, set(), {0}]
    reports = run_watch(unit_net(2), [scheduled(2, f) for f in schedule], window=1, every_step=True)
    assert [r.layer("1").dead_units for r in reports] == [[], [0], [0, 1], [1]]


def test_fewer_steps_than_window():
    schedule = [{0}, set(), {1}, set(), set()]
    reports = run_watch(unit_net(3), [scheduled(3, f) for f in schedule], window=100, every_step=True)
    assert [r.layer("1").dead_units for r in reports] == [[1, 2], [1, 2], [2], [2], [2]]


def test_random_schedule_against_reference():
    """Random firing schedule, window 4, 9 steps: every report against the schedule and the reference."""
    rng = np.random.default_rng(1)
    units, window = 12, 4
    schedule = [set(np.flatnonzero(rng.random(units) < 0.25).tolist()) for _ in range(9)]
    steps = []
    for f in schedule:
        x = scheduled(units, f)
        x[1:] *= torch.rand(x.shape[0] - 1, units) * 2   # mixed magnitudes, same signs
        steps.append(x)
    m = unit_net(units)
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {"1": Probe(twin[1])})
    reports = run_watch(m, steps, window=window, every_step=True, count_subsample=1)
    for s, report in enumerate(reports, start=1):
        assert report.layer("1").dead_units == expected_dead(schedule, units, window, s)
        check_report(report, refs, window, steps=s, interval=(0, s))


def test_site_first_seen_later():
    """A site that first runs at step 2 is judged from step 3 on; it comes after the older sites."""
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.early = nn.ReLU()
            self.late = nn.Tanh()
            self.use_late = False

        def forward(self, x):
            h = self.fc(x)
            return self.late(h) if self.use_late else self.early(h)

    m = Late()
    with deadwatch.watch(m, reporters=[], report_every=10**6, window=10) as mon:
        for s in range(4):
            m.use_late = s >= 2
            m(torch.randn(3, 4)).sum().backward()
            if s == 2:
                pending = mon.report()
            mon.step()
        report = mon.report()
    assert [layer.name for layer in pending.layers] == ["early", "late"]
    assert pending.layer("late").dead_units == [] and pending.layer("late").status == "ok"
    assert [layer.name for layer in report.layers] == ["early", "late"]
    assert report.layer("late").units == 6


# ---- statuses at the threshold edges ----------------------------------------------------------------

@pytest.mark.parametrize("dead,status", [(0, "ok"), (1, "warn"), (9, "warn"), (10, "critical"), (11, "critical"),
                                         (100, "critical")])
def test_default_threshold_edges_100_units(dead, status):
    m = unit_net(100)
    with torch.no_grad():
        m[0].b[:dead] = -1e4
    x = torch.rand(4, 100) + 0.5
    report = run_watch(m, [x, x], window=5)
    layer = report.layer("1")
    assert layer.dead_units == list(range(dead))
    assert layer.dead_fraction == dead / 100
    assert layer.status == status
    assert (layer in report.flagged) == (status != "ok")


@pytest.mark.parametrize("dead,status", [(0, "ok"), (1, "ok"), (2, "warn"), (3, "warn"), (4, "critical"),
                                         (8, "critical")])
def test_custom_threshold_edges(dead, status):
    m = unit_net(8)
    with torch.no_grad():
        m[0].b[:dead] = -1e4
    x = torch.rand(4, 8) + 0.5
    report = run_watch(m, [x], window=5, thresholds={"warn": 0.25, "critical": 0.5})
    assert report.layer("1").status == status


def test_warn_equal_to_critical():
    m = unit_net(10)
    with torch.no_grad():
        m[0].b[:3] = -1e4
    x = torch.rand(4, 10) + 0.5
    assert run_watch(m, [x], thresholds={"warn": 0.3, "critical": 0.3}).layer("1").status == "critical"
    with torch.no_grad():
        m[0].b[2] = 0.0
    assert run_watch(m, [x], thresholds={"warn": 0.3, "critical": 0.3}).layer("1").status == "ok"


def test_nonfinite_takes_precedence_over_ok():
    m = unit_net(100)
    x = torch.rand(4, 100) + 0.5
    bad = x.clone()
    bad[0, 50] = float("nan")
    reports = run_watch(m, [bad, x, x], window=2, every_step=True)
    assert [r.layer("1").status for r in reports] == ["nonfinite", "nonfinite", "ok"]
    # unit 50 had a NaN in its only step-0 values: not fired in step 0, yet alive from step 1 on
    assert reports[0].layer("1").dead_units == [50]
    assert reports[1].layer("1").dead_units == []


# ---- report intervals -----------------------------------------------------------------------------------

def test_report_every_resets_interval_not_window():
    units, window = 6, 10
    m = unit_net(units)
    steps = []
    for s in range(5):
        x = torch.randn(2 + s, units)
        x[:, 0] = -1.0          # unit 0 never fires
        steps.append(x)
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {"1": Probe(twin[1])})
    reports = run_watch(m, steps, window=window, report_every=2, every_step=True, count_subsample=1)
    # report_every=2: the reports at steps 2 and 4 close an interval; the next step starts a new one
    # (until then report() still shows the interval just reported)
    intervals = [(0, 1), (0, 2), (2, 3), (2, 4), (4, 5)]
    for s, (report, interval) in enumerate(zip(reports, intervals), start=1):
        check_report(report, refs, window, steps=s, interval=interval)
    assert reports[1].layer("1").observations == 2 + 3
    assert reports[2].layer("1").observations == 4
    assert reports[4].layer("1").observations == 6
    assert all(0 in r.layer("1").dead_units for r in reports)   # the window is not reset


def test_report_by_hand_resets_nothing():
    units = 6
    m = unit_net(units)
    steps = [torch.randn(3, units) for _ in range(4)]
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {"1": Probe(twin[1])})
    with deadwatch.watch(m, reporters=[], report_every=10**6, window=10, count_subsample=1) as mon:
        for s, x in enumerate(steps, start=1):
            m(x).sum().backward()
            mon.step()
            first, second = mon.report(), mon.report()
            assert first.to_dict() == second.to_dict()
            check_report(second, refs, 10, steps=s, interval=(0, s))
    assert second.layer("1").observations == 12


def test_report_between_forward_and_step_is_consistent():
    """report() after a forward whose step() has not come yet: zero_fraction and observations must
    describe the same values (either both with or both without the pending forward)."""
    units = 5
    m = unit_net(units)
    x0 = torch.rand(4, units) + 0.5            # every value fires
    x0[:, 1] = -1.0                            # except unit 1's
    x1 = torch.randn(3, units)
    twin = copy.deepcopy(m)
    ref = reference(twin, [x0, x1], {"1": Probe(twin[1])})["1"]
    with deadwatch.watch(m, reporters=[], report_every=10**6, window=10, count_subsample=1) as mon:
        m(x0).sum().backward()
        mon.step()
        m(x1).sum().backward()               # pending: its step() has not come yet
        layer = mon.report().layer("1")
    assert layer.dead_units == ref.dead(10, steps=1) == [1]
    assert np.all(layer.firing_rate <= 1.0)
    without = (ref.interval_counts(0, 1)[1], ref.zero_fraction(0, 1))
    with_pending = (ref.interval_counts(0, 2)[1], ref.zero_fraction(0, 2))
    got = (layer.observations, layer.zero_fraction)
    assert got == pytest.approx(without, abs=1e-9) or got == pytest.approx(with_pending, abs=1e-9), \
        f"observations/zero_fraction {got}; expected {without} (completed steps) or {with_pending} (with pending)"


# ---- which sites are watched ---------------------------------------------------------------------------

class Sites(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList([nn.Sequential(nn.Linear(n, 5), nn.ReLU()) for n in (4, 5)])
        self.shared = nn.GELU()
        self.dec = nn.Sequential(nn.Linear(5, 3), nn.Tanh())

    def forward(self, x):
        for layer in self.enc:
            x = self.shared(layer(x))
        x = F.relu(x)
        return self.dec(x)


ALL_SITES = ["enc.0.1", "shared#0", "enc.1.1", "shared#1", "relu#0", "dec.1"]


@pytest.mark.parametrize("include,exclude,expected", [
    ([], [], ALL_SITES),
    ([r"^enc\."], [], ["enc.0.1", "enc.1.1"]),
    ([], [r"^enc\."], ["shared#0", "shared#1", "relu#0", "dec.1"]),
    ([r"^enc\.", r"dec"], [r"\.1\.1$"], ["enc.0.1", "dec.1"]),
    ([r"^shared$"], [], ["shared#0"]),            # the first call also answers to the plain path
    ([r"shared#1"], [], ["shared#1"]),
    ([], [r"#1$"], ["enc.0.1", "shared#0", "enc.1.1", "relu#0", "dec.1"]),
    ([], [r"^shared$"], ["enc.0.1", "enc.1.1", "shared#1", "relu#0", "dec.1"]),
    ([r"relu"], [], ["relu#0"]),
    ([r"nomatch"], [], []),
])
def test_include_exclude(include, exclude, expected):
    m = Sites()
    report = run_watch(m, [torch.randn(3, 4), torch.randn(3, 4)], include=include, exclude=exclude, count_subsample=1)
    assert [layer.name for layer in report.layers] == expected
    units = {"enc.0.1": 5, "enc.1.1": 5, "shared#0": 5, "shared#1": 5, "relu#0": 5, "dec.1": 3}
    for layer in report.layers:
        assert layer.units == units[layer.name]
        assert layer.observations == 6


def test_sites_in_the_order_they_first_ran():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ReLU()
            self.b = nn.SiLU()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(self.fc(self.b(x)))

    report = run_watch(Backwards(), [torch.randn(2, 3)])
    assert [layer.name for layer in report.layers] == ["b", "a"]


# ---- unit_axis override ------------------------------------------------------------------------------------

class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 10)
        self.act = nn.ReLU()
        self.conv = nn.Conv1d(10, 7, 1)
        self.cact = nn.ReLU()

    def forward(self, x):                      # x: (N, T=6, 4)
        h = self.act(self.fc(x))               # (N, 6, 10): default units: 10 (last dim)
        return self.cact(self.conv(h.transpose(1, 2)))   # (N, 7, 6): default units: 7 (dim 1)


@pytest.mark.parametrize("axes,act_axis,cact_axis", [
    ({}, -1, 1),
    ({r"^act$": 1}, 1, 1),
    ({r"^cact$": -1}, -1, -1),
    ({r"act": 0}, 0, 0),
])
def test_unit_axis_override(axes, act_axis, cact_axis):
    m = Seq()
    steps = []
    for _ in range(3):
        x = torch.randn(2, 6, 4)
        x[:, 2] = 0.0     # position 2: pre-activation = fc.bias < 0, no unit fires there
        steps.append(x)
    with torch.no_grad():
        m.fc.bias.fill_(-0.05)
        m.fc.bias[3] = -1e4  # feature 3 never fires
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {"act": Probe(twin.act, axis=act_axis), "cact": Probe(twin.cact, axis=cact_axis)})
    report = run_watch(m, steps, window=3, unit_axis=axes, count_subsample=1)
    check_report(report, refs, 3)


def test_unit_axis_override_for_multi_call_site():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)
            self.act = nn.ReLU()

        def forward(self, x):                 # x: (N, 3, 4)
            h = self.act(self.fc(x))          # (N, 3, 5)
            return self.act(h.transpose(1, 2))  # (N, 5, 3)

    m = Twice()
    steps = [torch.randn(2, 3, 4) for _ in range(2)]
    twin = copy.deepcopy(m)
    # by default act#0 has 5 units (last dim) and act#1 3 (last dim, after the transpose); override both to dim 1.
    # "^act$" reaches call 0 only, through its plain path
    refs = reference(twin, steps, {"act#0": Probe(twin.act, call=0, axis=1), "act#1": Probe(twin.act, call=1, axis=1)})
    report = run_watch(m, steps, window=3, unit_axis={r"act#1": 1, r"^act$": 1}, count_subsample=1)
    check_report(report, refs, 3)
    assert report.layer("act#0").units == 3 and report.layer("act#1").units == 5
    report = run_watch(m, steps, window=3, unit_axis={r"^act$": 1})
    assert report.layer("act#0").units == 3 and report.layer("act#1").units == 3


# ---- Report.to_dict --------------------------------------------------------------------------------------

class Branchy(Sites):
    """Sites, plus a Sigmoid that runs only while `extra` is set."""

    def __init__(self):
        super().__init__()
        self.extra_act = nn.Sigmoid()
        self.extra = True

    def forward(self, x):
        out = super().forward(x)
        return self.extra_act(out) if self.extra else out


def test_report_to_dict_is_json_and_matches():
    m = Branchy()
    with torch.no_grad():
        m.enc[0][0].bias[:] = -1e4          # enc.0.1 all dead: critical
        m.enc[1][0].bias[1] = float("inf")  # enc.1.1 unit 1 is +inf: nonfinite
    x = torch.randn(3, 4)
    with deadwatch.watch(m, reporters=[], report_every=2, window=5, count_subsample=1) as mon:
        for s, inp in enumerate([x, x, x]):
            m.extra = s == 0
            m(inp).sum().backward()
            mon.step()
        report = mon.report()            # interval = step 2 only: extra_act did not run in it
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back == d
    assert set(d) == {"step", "window", "units", "dead_fraction", "layers", "flagged"}
    assert d["step"] == report.step == 3 and d["window"] == 5
    assert d["units"] == sum(layer.units for layer in report.layers) == 5 * 5 + 3 + 3
    dead = sum(len(layer.dead_units) for layer in report.layers)
    assert d["dead_fraction"] == pytest.approx(dead / d["units"])
    assert d["flagged"] == [layer.name for layer in report.layers if layer.status != "ok"]
    fields = {"name", "kind", "units", "dead_units", "dead_fraction", "zero_fraction", "observations", "status",
              "dormant_units", "dormant_fraction", "saturated_units", "saturated_fraction", "rare_units", "last_fired",
              "bounds", "flags", "causes", "certified_units", "certify_note"}
    assert [ld["name"] for ld in d["layers"]] == ALL_SITES + ["extra_act"]
    for ld, layer in zip(d["layers"], report.layers):
        assert set(ld) == fields
        for key in fields:
            value = getattr(layer, key)
            assert ld[key] == ([c.to_dict() for c in value] if key == "causes" else value)
    by_name = {ld["name"]: ld for ld in d["layers"]}
    assert by_name["enc.0.1"]["dead_units"] == [0, 1, 2, 3, 4]
    assert by_name["enc.0.1"]["status"] == "critical"
    assert by_name["enc.1.1"]["status"] == "nonfinite" and 1 in by_name["enc.1.1"]["dead_units"]
    assert "enc.0.1" in d["flagged"] and "enc.1.1" in d["flagged"]
    assert by_name["extra_act"]["zero_fraction"] is None and by_name["extra_act"]["observations"] == 0
    assert by_name["dec.1"]["observations"] == 3 and isinstance(by_name["dec.1"]["zero_fraction"], float)
    assert deadwatch.Report.from_dict(back) == report


def test_report_to_dict_with_zero_fraction():
    m = Sites()
    report = run_watch(m, [torch.randn(3, 4)], count_subsample=1)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    for ld, layer in zip(d["layers"], report.layers):
        assert isinstance(ld["zero_fraction"], float) and ld["zero_fraction"] == layer.zero_fraction
        assert ld["dead_units"] == layer.dead_units and ld["observations"] == 3
