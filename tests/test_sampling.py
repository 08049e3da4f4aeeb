"""count_subsample and watch_every.

count_subsample=k (default 8): the fired counts behind zero_fraction, observations and firing_rate
come from the first ceil(N / k) entries of the batch dim (the first dim that is not the unit axis)
of every activation output; the dead verdict and NaN/inf use every value.
watch_every=k (default 1): only the steps with step % k == 0 are watched; the others cost nothing.

The expected figures come from a brute-force count here (`sampled_reference`): forward hooks copy
each site's whole output to the host, numpy picks the rows by the definition above, and
tests/reference.py's RefSite / check_report compare deadwatch's reports with them.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
import deadwatch.stats
from deadwatch.config import load as load_config

pytest.register_assert_rewrite("reference")
from reference import Probe, RefSite, as_fwds, check_report, plant_dead, reference, run_watch  # noqa: E402

DEFAULT_SUBSAMPLE = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_defaults():
    config = load_config()
    assert config.count_subsample == DEFAULT_SUBSAMPLE
    assert config.watch_every == 1


# ---- the brute-force reference on a batch subsample ---------------------------------------------

def batch_dim(ndim: int, axis: int) -> int:
    """The dim that count_subsample cuts: the first one that is not the unit axis."""
    axis %= ndim
    return next(d for d in range(ndim) if d != axis)


def sampled_reference(model, steps, probes, subsample=DEFAULT_SUBSAMPLE, watched=lambda s: True):
    """RefSites for `probes` over `steps` (train forwards, under no_grad), where

    * fired (the verdict) and nonfinite use every value of every watched step;
    * counts and observations use, in every forward, only the first ceil(N / subsample) entries
      of the output's batch dim (N: that dim's size); a nonfinite unit-step counts nothing;
    * a step for which watched(step) is false is not seen at all.
    """
    captured = {name: [[] for _ in steps] for name in probes}
    order: list[str] = []
    calls: dict[int, int] = {}
    by_module: dict[int, tuple[nn.Module, list]] = {}
    for name, probe in probes.items():
        by_module.setdefault(id(probe.module), (probe.module, []))[1].append((name, probe))
    now = {"step": 0}

    def make_hook(mid, entries):
        def hook(module, args, out):
            call = calls.get(mid, 0)
            calls[mid] = call + 1
            if not watched(now["step"]):
                return
            for name, probe in entries:
                if probe.call == call:
                    captured[name][now["step"]].append(out.detach().to(torch.float64).cpu().numpy().copy())
                    if name not in order:
                        order.append(name)
        return hook

    handles = [m.register_forward_hook(make_hook(mid, entries)) for mid, (m, entries) in by_module.items()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s, step in enumerate(steps):
                now["step"] = s
                for fwd in as_fwds(step):
                    assert fwd.train, "sampled_reference counts train forwards only"
                    calls.clear()
                    model.train()
                    with torch.no_grad():
                        model(*fwd.args, **fwd.kwargs)
    finally:
        for h in handles:
            h.remove()

    S = len(steps)
    refs = {}
    for name, probe in probes.items():
        first = next(a for arrays in captured[name] for a in arrays)
        axis = probe.axis % first.ndim
        U = first.shape[axis]
        ran = np.zeros(S, bool)
        fired = np.zeros((S, U), bool)
        counts = np.zeros((S, U), np.int64)
        nonfinite = np.zeros((S, U), bool)
        obs = np.zeros(S, np.int64)
        for s, arrays in enumerate(captured[name]):
            if not arrays:
                continue
            ran[s] = True
            for a in arrays:
                b = batch_dim(a.ndim, axis)
                kept = np.take(a, np.arange(math.ceil(a.shape[b] / subsample)), axis=b)
                obs[s] += kept.size // U
                for u in range(U):
                    every = np.take(a, u, axis=axis)
                    sample = np.take(kept, u, axis=axis)
                    if not math.isfinite(np.max(every)):          # NaN propagates through max
                        nonfinite[s, u] = True
                    fired[s, u] |= bool(np.any(every > probe.threshold))
                    counts[s, u] += int(np.sum(sample > probe.threshold))
            fired[s] &= ~nonfinite[s]
            counts[s][nonfinite[s]] = 0
        refs[name] = RefSite(name, U, ran, fired, counts, nonfinite, obs, first_seen=order.index(name))
    return refs


def subsample_kwargs(subsample):
    """None: leave count_subsample at its default."""
    return {} if subsample is None else {"count_subsample": subsample}


# ---- models: 2-d, conv (N, C, H, W), sequence (N, T, C), unit-axis overrides ------------------------

class MLP(nn.Module):
    """ReLU module, F.gelu function site, Sigmoid module (fires above 0.5)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 10)
        self.act3 = nn.Sigmoid()
        plant_dead(self.fc1.bias, [2, 9])
        plant_dead(self.fc2.bias, [4])
        plant_dead(self.fc3.bias, [0])

    def forward(self, x):
        return self.act3(self.fc3(F.gelu(self.fc2(self.act1(self.fc1(x))))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 5, 3)
        self.act2 = nn.Tanh()
        plant_dead(self.conv1.bias, [1])
        plant_dead(self.conv2.bias, [3])

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))


class Seq(nn.Module):
    """(N, T, C) outputs: units on the last dim, the batch dim is dim 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(12, 7)
        self.act2 = nn.ReLU()
        plant_dead(self.fc.bias, [5])
        plant_dead(self.fc2.bias, [0, 6])

    def forward(self, x):
        return self.act2(self.fc2(self.act(self.fc(x))))


class Tokens(nn.Module):
    """One (N, T, 10) ReLU site whose unit axis the test overrides."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 10)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


def randn(*shape):
    return torch.randn(*shape)


CASES = {
    # name: (model, steps, probes, overrides); batch sizes below 8, not divisible by 8, and several forwards per step
    "mlp": (MLP, lambda: [randn(13, 6), randn(8, 6), randn(3, 6), randn(1, 6), randn(24, 6),
                          [randn(9, 6), randn(5, 6)], randn(17, 6)],
            lambda t: {"act1": Probe(t.act1), "gelu#0": Probe(t.fc2), "act3": Probe(t.act3, threshold=0.5)}, {}),
    "conv": (CNN, lambda: [randn(10, 3, 6, 6), randn(3, 3, 6, 6), [randn(17, 3, 5, 5), randn(2, 3, 5, 5)],
                           randn(9, 3, 4, 4)],
             lambda t: {"act1": Probe(t.act1, axis=1), "act2": Probe(t.act2, axis=1)}, {}),
    "sequence": (Seq, lambda: [randn(11, 5, 4), randn(2, 3, 4), randn(9, 7, 4), randn(16, 2, 4)],
                 lambda t: {"act": Probe(t.act, axis=-1), "act2": Probe(t.act2, axis=-1)}, {}),
    # units on dim 0 (N = 4 units): the subsample cuts dim 1 (T = 19, 8, 3, 9 + 1)
    "unit_axis_0": (Tokens, lambda: [randn(4, 19, 4), randn(4, 8, 4), randn(4, 3, 4),
                                     [randn(4, 9, 4), randn(4, 1, 4)]],
                    lambda t: {"act": Probe(t.act, axis=0)}, {"unit_axis": {"^act$": 0}}),
    # units on dim 1 (T = 6 units) of an (N, T, C) output: the subsample cuts dim 0
    "unit_axis_1": (Tokens, lambda: [randn(17, 6, 4), randn(4, 6, 4), randn(9, 6, 4), randn(1, 6, 4)],
                    lambda t: {"act": Probe(t.act, axis=1)}, {"unit_axis": {"^act$": 1}}),
}


def test_batch_dim_rule():
    assert batch_dim(2, 1) == 0 and batch_dim(4, 1) == 0 and batch_dim(3, 2) == 0
    assert batch_dim(3, 0) == 1 and batch_dim(3, 1) == 0


@pytest.mark.parametrize("subsample", [None, 3], ids=["default", "3"])
@pytest.mark.parametrize("case", list(CASES))
def test_counts_come_from_the_first_rows_of_the_batch(case, subsample):
    """zero_fraction, observations and firing_rate after every step equal the count over the first
    ceil(N / k) entries of each output's batch dim; dead units and status equal the count over all."""
    make, make_steps, probes_of, overrides = CASES[case]
    m = make()
    steps = make_steps()
    twin, twin_exact = copy.deepcopy(m), copy.deepcopy(m)
    refs = sampled_reference(twin, steps, probes_of(twin), subsample or DEFAULT_SUBSAMPLE)
    reports = run_watch(m, steps, window=2, every_step=True, **overrides, **subsample_kwargs(subsample))
    for s, report in enumerate(reports, start=1):
        check_report(report, refs, 2, steps=s, interval=(0, s))
    # set-up: the subsample really leaves values out
    exact = sampled_reference(twin_exact, steps, probes_of(twin_exact), 1)
    for name, ref in refs.items():
        assert 0 < ref.obs.sum() < exact[name].obs.sum(), name


# ---- the verdict does not depend on count_subsample ------------------------------------------------

def verdicts(reports):
    return [(r.step, r.dead_fraction, [layer.name for layer in r.flagged],
             [(layer.name, layer.kind, layer.units, layer.dead_units, layer.dead_fraction, layer.status)
              for layer in r.layers])
            for r in reports]


@pytest.mark.parametrize("case", ["mlp", "conv", "sequence", "unit_axis_0"])
def test_verdict_identical_for_every_count_subsample(case):
    make, make_steps, probes_of, overrides = CASES[case]
    base = make()
    steps = make_steps()
    twin = copy.deepcopy(base)
    refs = reference(twin, steps, probes_of(twin))        # every value counted
    got = {}
    for subsample in (1, None, 64):
        reports = run_watch(copy.deepcopy(base), steps, window=2, every_step=True, **overrides,
                            **subsample_kwargs(subsample))
        got[subsample] = verdicts(reports)
        for s, report in enumerate(reports, start=1):
            for layer in report.layers:
                assert layer.dead_units == refs[layer.name].dead(2, s), (subsample, s, layer.name)
                assert layer.status == refs[layer.name].status(2, s), (subsample, s, layer.name)
    assert got[None] == got[1]
    assert got[64] == got[1]
    if case != "unit_axis_0":   # (its units are batch rows: nothing planted)
        assert all(layer[3] for layer in got[1][-1][3]), "set-up: every site has planted dead units"


class Affine(nn.Module):
    """x * w + b per unit (unit axis `axis`): unit u sees exactly its own input values."""

    def __init__(self, n, axis=1):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.b = nn.Parameter(torch.zeros(n))
        self.axis = axis

    def forward(self, x):
        shape = [1] * x.ndim
        shape[self.axis] = -1
        return x * self.w.view(shape) + self.b.view(shape)


EDGE_SHAPES = {            # one sample's shape (5 units on the unit axis), unit axis, activation
    "2d": ((5,), 1, nn.ReLU),
    "conv": ((5, 2, 3), 1, nn.ReLU),
    "sequence": ((4, 5), -1, nn.GELU),
}


def edge_input(n, rest, axis):
    """Units: 0 fires everywhere, 1 only in batch row n-1, 2 never, 3 only in row 1, 4 only in row 0."""
    x = -torch.ones(n, *rest)
    x = x.movedim(axis, 1)                    # (N, U, ...) view: index rows and units directly
    x[:, 0] = 1.0
    x[n - 1, 1] = 2.0
    x[1, 3] = 0.5
    x[0, 4] = 3.0
    return x.movedim(1, axis).contiguous()


@pytest.mark.parametrize("n", [16, 9])
@pytest.mark.parametrize("shape", list(EDGE_SHAPES))
def test_unit_firing_only_beyond_the_subsample_is_alive(shape, n):
    """A unit that fires only in rows the subsample leaves out is alive, with firing rate 0 there."""
    rest, axis, act = EDGE_SHAPES[shape]
    units = 5
    m = nn.Sequential(Affine(units, axis=axis), act())
    x = edge_input(n, rest, axis)
    per_row = int(np.prod(rest)) // units          # values per unit in one batch row
    got = {}
    for subsample in (1, None, 64):
        k = subsample or DEFAULT_SUBSAMPLE
        kept = math.ceil(n / k)                        # 16 -> 16, 2, 1 rows; 9 -> 9, 2, 1 rows
        report = run_watch(m, [x, x], window=2, **subsample_kwargs(subsample))
        layer = report.layer("1")
        got[subsample] = verdicts([report])
        assert layer.units == units
        assert layer.dead_units == [2], subsample
        assert layer.status == "critical"
        assert layer.observations == 2 * kept * per_row, subsample
        rate = np.asarray(layer.firing_rate, dtype=np.float64)
        expected = [1.0,
                    (1.0 if n - 1 < kept else 0.0) / kept,  # row n-1 only: outside every subsample but k=1
                    0.0,
                    (1.0 if kept > 1 else 0.0) / kept,      # row 1 only: inside ceil(n/8) = 2 rows, not 1
                    1.0 / kept]                             # row 0 only
        assert np.allclose(rate, expected, atol=1e-12), (subsample, rate, expected)
        twin = copy.deepcopy(m)
        refs = sampled_reference(twin, [x, x], {"1": Probe(twin[1], axis=axis)}, k)
        check_report(report, refs, 2)
    # the pinned rates at the default (k = 8): ceil(n / 8) = 2 rows, rows 0 and 1
    assert np.allclose(run_watch(m, [x], window=2).layer("1").firing_rate, [1, 0, 0, 0.5, 0.5])
    assert got[None] == got[1] == got[64]


# ---- NaN / inf outside the subsample -----------------------------------------------------------------

class TwoSites(nn.Module):
    """A 2-d site `act` (8 units) and a conv-shaped site `cact` (4 channels)."""

    def __init__(self):
        super().__init__()
        self.lin = Affine(8)
        self.act = nn.ReLU()
        self.conv = Affine(4)
        self.cact = nn.ReLU()

    def forward(self, x, img):
        return self.act(self.lin(x)).sum() + self.cact(self.conv(img)).sum()


@pytest.mark.parametrize("subsample", [None, 64, 1], ids=["default", "64", "1"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("site", ["act", "cact"])
def test_nonfinite_outside_the_subsample_is_flagged(site, bad, subsample):
    n, window = 16, 2
    m = TwoSites()
    steps = [(torch.randn(n, 8), torch.randn(n, 4, 3, 3)) for _ in range(4)]
    row = 12
    assert row >= math.ceil(n / DEFAULT_SUBSAMPLE)          # set-up: outside the default subsample (and 64's)
    if site == "act":
        steps[0][0][row, 5] = bad
        unit = 5
    else:
        steps[0][1][row, 2, 1, 1] = bad
        unit = 2
    twin = copy.deepcopy(m)
    probes = {"act": Probe(twin.act), "cact": Probe(twin.cact)}
    refs = sampled_reference(twin, steps, probes, subsample or DEFAULT_SUBSAMPLE)
    reports = run_watch(m, steps, window=window, every_step=True, **subsample_kwargs(subsample))
    statuses = [r.layer(site).status for r in reports]
    assert statuses[:2] == ["nonfinite", "nonfinite"] and statuses[2] != "nonfinite"
    assert unit in reports[0].layer(site).dead_units           # a nonfinite unit-step does not fire
    other = "cact" if site == "act" else "act"
    assert all(r.layer(other).status != "nonfinite" for r in reports)
    for s, report in enumerate(reports, start=1):
        check_report(report, refs, window, steps=s, interval=(0, s))


# ---- watch_every ------------------------------------------------------------------------------------------

def scheduled(units, firing, batch, g):
    """Units in `firing` get positive values (mixed magnitudes), the others negative; the last unit is noise."""
    x = -(torch.rand(batch, units, generator=g) + 0.1)
    if firing:
        x[:, sorted(firing)] = torch.rand(batch, len(firing), generator=g) + 0.1
    x[:, -1] = torch.randn(batch, generator=g)
    return x


@pytest.mark.parametrize("subsample", [None, 1], ids=["default", "1"])
def test_watch_every_watches_only_every_kth_step(subsample):
    """Unit 1 fires only on steps 1, 2, 4, 5: with watch_every=3 (steps 0, 3, 6 watched) it is dead,
    with watch_every=1 alive. Unit 2 fires only on step 3 (watched): alive. Unit 3 never fires."""
    units, window = 5, 100
    schedule = [{0}, {0, 1}, {0, 1}, {0, 2}, {0, 1}, {0, 1}, {0}]
    sizes = [3, 4, 5, 6, 7, 8, 9]
    g = torch.Generator().manual_seed(3)
    steps = [scheduled(units, f, n, g) for f, n in zip(schedule, sizes)]
    observations = {}
    for every, dead in ((3, [1, 3]), (1, [3])):
        m = nn.Sequential(Affine(units), nn.ReLU())
        twin = copy.deepcopy(m)
        refs = sampled_reference(twin, steps, {"1": Probe(twin[1])}, subsample or DEFAULT_SUBSAMPLE,
                                 watched=lambda s: s % every == 0)
        reports = run_watch(m, steps, window=window, every_step=True, watch_every=every,
                            **subsample_kwargs(subsample))
        for s, report in enumerate(reports, start=1):
            check_report(report, refs, window, steps=s, interval=(0, s))
        assert reports[-1].layer("1").dead_units == dead, every
        observations[every] = reports[-1].layer("1").observations
    if subsample == 1:
        assert observations == {3: 3 + 6 + 9, 1: sum(sizes)}
    else:
        assert observations == {3: 1 + 1 + 2, 1: 6 * 1 + 2}   # ceil(n / 8) rows per step


def test_watch_every_window_counts_unwatched_steps():
    """The window is in training steps, watched or not, and an unwatched step counts as not running:
    with window 2 < watch_every 4, the reports whose window holds no watched step (after steps 3 and 4)
    find the site idle (no counted forward: nothing judged), and judge it again once step 4 is in it."""
    m = nn.Sequential(Affine(2), nn.ReLU())
    x0 = torch.tensor([[1.0, 1.0], [1.0, 1.0]])      # unit 1 fires on step 0 only
    x = torch.tensor([[1.0, -1.0], [1.0, -1.0]])     # unit 0 fires on every step
    reports = run_watch(m, [x0, x, x, x, x], window=2, every_step=True, watch_every=4)
    assert [r.layer("1").dead_units for r in reports] == [[], [], [], [], [1]]
    assert [r.layer("1").status for r in reports] == ["ok", "ok", "idle", "idle", "critical"]
    reports = run_watch(m, [x0, x, x, x, x], window=2, every_step=True)
    assert [r.layer("1").dead_units for r in reports] == [[], [], [1], [1], [1]]


@pytest.mark.parametrize("every", [1, 4])
def test_unwatched_steps_do_no_hook_work(every, monkeypatch):
    """On an unwatched step the hooks never reach stats.record (two module sites and a function site,
    two forwards per step); the model's outputs are the same as without a monitor."""
    calls = []
    original = deadwatch.stats.record

    def counting(site, out, *rest):
        calls.append(site)
        return original(site, out, *rest)

    monkeypatch.setattr(deadwatch.stats, "record", counting)
    m = MLP()
    plain = copy.deepcopy(m)
    per_step = []
    with deadwatch.watch(m, reporters=[], window=100, report_every=10**6, watch_every=every) as monitor:
        for s in range(9):
            before = len(calls)
            for n in (5, 3):
                x = torch.randn(n, 6)
                out = m(x)
                assert torch.equal(out, plain(x))
                out.sum().backward()
            per_step.append(len(calls) - before)
            monitor.step()
        report = monitor.report()
    assert per_step == [6 if s % every == 0 else 0 for s in range(9)]
    assert [layer.name for layer in report.layers] == ["act1", "gelu#0", "act3"]


# ---- configuration ------------------------------------------------------------------------------------------

BAD_VALUES = [0, -1, -8, 2.5, 8.0, "8", True, False, None, [2]]


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
@pytest.mark.parametrize("key", ["count_subsample", "watch_every"])
def test_must_be_a_positive_int(key, value):
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(deadwatch.ConfigError, match=key):
        deadwatch.watch(m, reporters=[], **{key: value})
    with pytest.raises(deadwatch.ConfigError, match=key):
        deadwatch.watch(m, config={key: value}, reporters=[])
    with pytest.raises(deadwatch.ConfigError, match=key):
        load_config({key: value})
    assert _no_hooks(m)


@pytest.mark.parametrize("key", ["count_subsample", "watch_every"])
def test_bad_value_in_yaml_file(key, tmp_path):
    path = tmp_path / "deadwatch.yaml"
    path.write_text(f"{key}: 0\n")
    with pytest.raises(deadwatch.ConfigError, match=key):
        deadwatch.watch(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), config=str(path), reporters=[])


def test_valid_values_are_taken():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with deadwatch.watch(m, reporters=[], count_subsample=3, watch_every=5) as monitor:
        assert monitor.config.count_subsample == 3 and monitor.config.watch_every == 5
    config = load_config({"count_subsample": 1, "watch_every": 1000})
    assert config.count_subsample == 1 and config.watch_every == 1000
    assert config.to_dict()["count_subsample"] == 1 and config.to_dict()["watch_every"] == 1000
