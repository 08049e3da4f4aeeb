"""The verdicts besides dead: dormant, saturated, rarely firing units, last_fired and flags, against a
brute-force reference (every value of every step copied to the host, counted unit by unit in numpy), and
carried by the run log, TensorBoard and the CLI. count_subsample=1 throughout: the figures are exact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn

import deadwatch
from deadwatch import ConfigError, cli
from deadwatch.analysis import LayerReport, Report
from deadwatch.config import load
from deadwatch.reporters import runlog
from planted import Affine

TAU, SHARE, EPS, RARE = 0.025, 0.99, 0.01, 0.01


# ---- the reference ---------------------------------------------------------------------------------

def record_values(model, modules, steps, on_step=None):
    """Run `steps` batches (forward only, no_grad) and return {name: [per step (units, values) float64]}."""
    seen = {name: [] for name in modules}
    current = {}

    def hook(name):
        def f(module, args, out):
            a = out.detach().to(torch.float64).numpy()
            current[name] = np.moveaxis(a, -1, 0).reshape(a.shape[-1], -1).copy()
        return f

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        for i, x in enumerate(steps):
            if on_step is not None:
                on_step(model, i + 1)
            with torch.no_grad():
                model(x)
            for name in modules:
                seen[name].append(current.pop(name))
    finally:
        for h in handles:
            h.remove()
    return seen


def ref_dormant(values, tau=TAU, threshold=0.0):
    """Sokar et al. (ReDo): s_i = mean|h_i| / mean_k mean|h_k|; dormant when s_i <= tau, whatever the
    activation (a dead ReLU unit has s_i = 0; a dead GELU or tanh unit need not be dormant)."""
    h = np.concatenate(values, axis=1)
    m = np.array([np.mean(np.abs(h[u])) for u in range(h.shape[0])])
    s = m / m.mean()
    return [u for u in range(h.shape[0]) if s[u] <= tau]


def ref_saturated(values, lower, upper, share=SHARE, eps=EPS):
    h = np.concatenate(values, axis=1)
    out = []
    for u in range(h.shape[0]):
        near = np.minimum(h[u] - lower, upper - h[u]) < eps * (upper - lower)
        if near.mean() >= share:
            out.append(u)
    return out


def ref_rare(values, threshold=0.0, rate=RARE):
    h = np.concatenate(values, axis=1)
    out = []
    for u in range(h.shape[0]):
        r = np.mean(h[u] > threshold)
        if 0 < r < rate:
            out.append(u)
    return out


def ref_last_fired(values, threshold=0.0):
    """Per unit: the step (from 1) in which it last fired, -1 never."""
    out = []
    for u in range(values[0].shape[0]):
        fired = [s + 1 for s, v in enumerate(values) if (v[u] > threshold).any()]
        out.append(fired[-1] if fired else -1)
    return out


def watched(model, steps, on_step=None, **overrides):
    overrides.setdefault("reporters", [])
    overrides.setdefault("report_every", 10**6)
    overrides.setdefault("count_subsample", 1)
    with deadwatch.watch(model, **overrides) as monitor:
        for i, x in enumerate(steps):
            if on_step is not None:
                on_step(model, i + 1)
            model(x).sum().backward()
            monitor.step()
        report = monitor.report()
    model.zero_grad(set_to_none=True)
    return report


def affine_net(act, w, b):
    net = nn.Sequential(Affine(len(w)), act)
    with torch.no_grad():
        net[0].w.copy_(torch.tensor(w, dtype=torch.float32))
        net[0].b.copy_(torch.tensor(b, dtype=torch.float32))
    return net


def batches(n, units, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, units, generator=g) for _ in range(n)]


# ---- dormant -----------------------------------------------------------------------------------------

def test_gelu_unit_nearly_silent_but_firing_half_the_time_is_dormant_not_dead():
    # unit 0: GELU(1e-3 x) fires whenever x > 0 (half the values) but its output is ~1e-3 of the others'
    net = affine_net(nn.GELU(), [1e-3, 1.0, 1.0, 0.5, 1.0], [0.0, 0.0, 0.2, 0.0, -0.3])
    steps = batches(6, 5)
    values = record_values(net, {"1": net[1]}, steps)["1"]
    layer = watched(net, steps).layer("1")
    assert layer.dead_units == []
    assert layer.dormant_units == ref_dormant(values) == [0]
    assert layer.dormant_fraction == pytest.approx(1 / 5)
    assert 0.4 < layer.firing_rate[0] < 0.6                  # it fires about half the time
    assert layer.rare_units == ref_rare(values) == []
    assert layer.saturated_units == [] and layer.saturated_fraction == 0.0 and layer.bounds is None
    assert "dormant" in layer.flags and layer.status == "ok"


def test_dead_relu_units_are_dormant_and_scores_follow_tau():
    net = affine_net(nn.ReLU(), [1.0, 1.0, 0.05, 1.0, 1.0, 1.0], [0.0, -1e4, 0.0, 0.0, 0.5, 0.0])
    steps = batches(5, 6)
    values = record_values(net, {"1": net[1]}, steps)["1"]
    for tau in (0.025, 0.1, 0.5):
        layer = watched(net, steps, dormant_tau=tau).layer("1")
        assert layer.dead_units == [1]
        assert layer.dormant_units == ref_dormant(values, tau), tau
    assert watched(net, steps, dormant_tau=0.1).layer("1").dormant_units == [1, 2]


@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_dormant_is_redo_s_i_at_most_tau_for_every_activation(act):
    """Units: 0 and 1 dead with an output near 0 (bias -1e4; tanh: a weight of 1e-3 below 0), 2 and 3 dead with
    an output far from 0 (GELU at -0.75, its minimum -0.17; tanh stuck at -1; ReLU: 0 again), 4 firing
    but nearly silent, 5-9 ordinary. Dormant is exactly s_i <= tau from every value, dead or not."""
    module = {"relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh()}[act]
    near_zero = [0.0, -1e4] if act != "tanh" else [0.0, 0.0]
    w = [0.0, 0.0, 0.0, 0.0, 1e-3, 1.0, 1.0, 0.5, 1.0, 0.8]
    b = near_zero + ([-0.75, -0.75] if act == "gelu" else [-1e4, -1e4]) + [0.0, 0.0, 0.3, 0.0, -0.2, 0.1]
    if act == "tanh":
        b[0] = -1e-3
        b[1] = -2e-3
    net = affine_net(module, w, b)
    steps = batches(6, 10)
    values = record_values(net, {"1": net[1]}, steps)["1"]
    layer = watched(net, steps).layer("1")
    assert layer.dead_units[:4] == [0, 1, 2, 3]
    assert layer.dormant_units == ref_dormant(values)
    if act == "relu":
        assert {0, 1, 2, 3} <= set(layer.dormant_units)   # dead ReLU units have s_i = 0
    else:
        assert {0, 1} <= set(layer.dormant_units) and not {2, 3} & set(layer.dormant_units)  # dead, not dormant
    assert 4 in layer.dormant_units and 4 not in layer.dead_units


# ---- saturated ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("act,lower,upper", [(nn.Tanh(), -1.0, 1.0), (nn.Sigmoid(), 0.0, 1.0),
                                             (nn.Hardtanh(-2.0, 3.0), -2.0, 3.0), (nn.ReLU6(), 0.0, 6.0)])
def test_bounded_units_pushed_to_either_end_are_saturated(act, lower, upper):
    # units 0 and 1 pushed to the upper and lower end, 2 half-way out (not 99% near a bound), 3 and 4 live
    span = upper - lower
    w = [1.0, 1.0, 1.0, 1.0, 0.5]
    b = [40.0 * span, -40.0 * span, 3.0 if span < 3 else 3.0 * span / 2, 0.0, 0.2]
    if isinstance(act, nn.ReLU6):
        b[3] = 3.0
    net = affine_net(act, w, b)
    steps = batches(5, 5)
    values = record_values(net, {"1": net[1]}, steps)["1"]
    layer = watched(net, steps).layer("1")
    assert layer.bounds == [lower, upper]
    assert layer.saturated_units == ref_saturated(values, lower, upper)
    assert layer.saturated_units[:2] == [0, 1]
    assert 2 not in layer.saturated_units or ref_saturated(values, lower, upper).count(2)
    assert layer.saturated_fraction == pytest.approx(len(layer.saturated_units) / 5)
    assert "saturated" in layer.flags
    # share and eps change the verdict as the definition says
    for share, eps in ((0.5, 0.01), (0.99, 0.2), (1.0, 0.001)):
        layer = watched(net, steps, saturation={"share": share, "eps": eps}).layer("1")
        assert layer.saturated_units == ref_saturated(values, lower, upper, share, eps), (share, eps)


def test_functional_sigmoid_saturates_and_unbounded_sites_never_do():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = Affine(3)
            self.act = nn.GELU()

        def forward(self, x):
            h = self.fc(x)
            return torch.sigmoid(h) + self.act(h)

    net = Net()
    with torch.no_grad():
        net.fc.b.copy_(torch.tensor([30.0, -30.0, 0.0]))
    steps = batches(4, 3)
    report = watched(net, steps, functions=["sigmoid", "gelu"])
    sig = report.layer("sigmoid#0")
    assert sig.bounds == [0.0, 1.0] and sig.saturated_units == [0, 1]
    gelu = report.layer("act")
    assert gelu.bounds is None and gelu.saturated_units == [] and gelu.saturated_fraction == 0.0


def test_masked_positions_count_in_neither_dormant_nor_saturated():
    net = affine_net(nn.Tanh(), [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    x = torch.randn(4, 6, 3)
    x[:, 3:, 0] = 1e4             # unit 0 saturates on padding only
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 3:] = False
    with deadwatch.watch(net, reporters=[], count_subsample=1) as monitor:
        monitor.mask(mask)
        net(x).sum().backward()
        monitor.step()
        layer = monitor.report().layer("1")
    real = torch.tanh(x[:, :3]).reshape(-1, 3).double().numpy().T
    assert layer.observations == 12
    assert layer.saturated_units == ref_saturated([real], -1.0, 1.0) == []
    assert layer.dormant_units == ref_dormant([real])


# ---- rare ----------------------------------------------------------------------------------------------

def test_rarely_firing_unit():
    # unit 0 fires when x > 2.7 (~0.35% of values); unit 1 when x > 1.5 (~7%); unit 2 never; unit 3 always half
    net = affine_net(nn.ReLU(), [1.0, 1.0, 1.0, 1.0], [-2.7, -1.5, -1e4, 0.0])
    steps = batches(10, 4, batch=256, seed=3)
    values = record_values(net, {"1": net[1]}, steps)["1"]
    layer = watched(net, steps).layer("1")
    assert layer.rare_units == ref_rare(values) == [0]
    assert 2 in layer.dead_units and 2 not in layer.rare_units
    assert watched(net, steps, rare_rate=0.1).layer("1").rare_units == ref_rare(values, rate=0.1) == [0, 1]
    assert watched(net, steps, rare_rate=0.0).layer("1").rare_units == []


# ---- last_fired ------------------------------------------------------------------------------------------

def kill_unit_1_at_step_7(model, step):
    if step == 7:
        with torch.no_grad():
            model[0].b[1] = -1e4


def test_last_fired_is_exact_for_a_unit_that_stops_at_a_known_step():
    steps = batches(12, 4)
    net = affine_net(nn.ReLU(), [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, -1e4, 0.5])
    twin = affine_net(nn.ReLU(), [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, -1e4, 0.5])
    values = record_values(twin, {"1": twin[1]}, steps, on_step=kill_unit_1_at_step_7)["1"]
    report = watched(net, steps, on_step=kill_unit_1_at_step_7, window=3, count_subsample=8)  # exact anyway
    layer = report.layer("1")
    assert layer.last_fired == ref_last_fired(values) == [12, 6, -1, 12]
    assert layer.dead_units == [1, 2]


def test_last_fired_survives_a_checkpoint_and_old_checkpoints_load():
    steps = batches(8, 4)
    net = affine_net(nn.ReLU(), [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, -1e4, 0.5])

    def kill_unit_1_at_step_3(model, step):
        if step == 3:
            with torch.no_grad():
                model[0].b[1] = -1e4

    with deadwatch.watch(net, reporters=[], count_subsample=1) as monitor:
        for i, x in enumerate(steps[:5]):
            kill_unit_1_at_step_3(net, i + 1)
            net(x).sum().backward()
            monitor.step()
        state = monitor.state_dict()
        before = monitor.report().layer("1")
        assert before.last_fired == [5, 2, -1, 5] and before.dormant_units == [2]
    assert {"abs_sum", "near"} <= set(state["sites"]["1"])
    old = {**state, "sites": {k: {n: v for n, v in s.items() if n not in ("abs_sum", "near")}
                              for k, s in state["sites"].items()}}
    for saved in (state, old):
        with deadwatch.watch(net, reporters=[], count_subsample=1) as monitor:
            monitor.load_state_dict(saved)
            net(steps[5]).sum().backward()
            monitor.step()
            layer = monitor.report().layer("1")
        if saved is state:  # the interval's |output| sums went on: unit 1 fired in steps 1-2
            assert layer.dormant_units == [2]
        assert layer.last_fired == [6, 2, -1, 6]
    assert layer.dormant_units == [1, 2]  # the old checkpoint had no |output| sums: unit 1's restart at 0


# ---- flags and config -------------------------------------------------------------------------------------

def test_flags_follow_their_own_thresholds():
    net = affine_net(nn.GELU(), [1e-3] + [1.0] * 19, [0.0] * 20)   # 1 dormant unit of 20: 5%
    steps = batches(3, 20)
    assert watched(net, steps).layer("1").flags == []               # default thresholds.dormant: 10%
    assert watched(net, steps, thresholds={"dormant": 0.05}).layer("1").flags == ["dormant"]
    assert watched(net, steps, thresholds={"dormant": 0.06}).layer("1").flags == []
    assert watched(net, steps, thresholds={"dormant": 0.05, "rare": 0.05, "saturated": 0.0}).layer("1").flags \
        == ["dormant"]                                              # no rare or saturated unit: no flag


@pytest.mark.parametrize("key", ["dormant", "saturated", "rare"])
def test_flag_thresholds_are_validated(key):
    with pytest.raises(ConfigError, match=f"thresholds.{key}"):
        load(thresholds={key: 1.5})


@pytest.mark.parametrize("values,key", [
    ({"dormant_tau": -0.1}, "dormant_tau"), ({"dormant_tau": "0.1"}, "dormant_tau"), ({"dormant_tau": 2}, "dormant_tau"),
    ({"rare_rate": 1.5}, "rare_rate"), ({"rare_rate": None}, "rare_rate"),
    ({"saturation": 0.5}, "saturation"), ({"saturation": {"share": 0}}, "saturation.share"),
    ({"saturation": {"share": 1.2}}, "saturation.share"), ({"saturation": {"eps": 0.5}}, "saturation.eps"),
    ({"saturation": {"eps": "0.01"}}, "saturation.eps"), ({"saturation": {"bound": 0.1}}, "saturation.bound"),
])
def test_new_config_keys_are_validated(values, key):
    with pytest.raises(ConfigError) as info:
        load(**values)
    assert key in str(info.value)


def test_new_config_keys_defaults_and_partial_saturation():
    c = load()
    assert (c.dormant_tau, c.saturation_share, c.saturation_eps, c.rare_rate) == (TAU, SHARE, EPS, RARE)
    c = load(saturation={"eps": 0.05})
    assert (c.saturation_share, c.saturation_eps) == (SHARE, 0.05)
    assert c.to_dict()["saturation"] == {"share": SHARE, "eps": 0.05}


# ---- run log, TensorBoard, CLI ----------------------------------------------------------------------------

class TwoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act = Affine(4), nn.ReLU()
        self.fc2, self.squash = Affine(4), nn.Tanh()

    def forward(self, x):
        return self.squash(self.fc2(self.act(self.fc1(x))))


@pytest.fixture
def logged_run(tmp_path):
    net = TwoSites()
    with torch.no_grad():
        net.fc1.b.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5]))
        net.fc2.b.copy_(torch.tensor([50.0, -50.0, 0.0, 0.0]))
    steps = batches(10, 4)
    reports = []
    with deadwatch.watch(net, logdir=tmp_path, reporters=["jsonl", "tensorboard"], report_every=5, window=5,
                         count_subsample=1) as monitor:
        for i, x in enumerate(steps):
            if i + 1 == 4:
                with torch.no_grad():
                    net.fc1.b[2:] = -1e4    # units 2, 3 of act last fire at step 3
            net(x).sum().backward()
            monitor.step()
            if monitor.steps % 5 == 0:
                reports.append(monitor.report())
    return tmp_path, reports


def test_run_log_carries_the_verdicts(logged_run):
    logdir, reports = logged_run
    log = runlog.read(str(logdir))
    assert log.headers[0]["config"]["dormant_tau"] == TAU
    assert log.headers[0]["config"]["saturation"] == {"share": SHARE, "eps": EPS}
    for record, own in zip(log.records, reports):
        back = Report.from_dict(record)
        for layer, mine in zip(back.layers, own.layers):
            for key in ("dormant_units", "dormant_fraction", "saturated_units", "saturated_fraction", "rare_units",
                        "last_fired", "bounds", "flags"):
                assert getattr(layer, key) == getattr(mine, key), key
    last = log.last
    assert last.layer("act").last_fired == [10, 10, 3, 3]
    assert last.layer("squash").saturated_units == [0, 1] and last.layer("squash").bounds == [-1.0, 1.0]
    assert "saturated" in last.layer("squash").flags


def test_old_run_log_records_read_without_the_new_fields():
    d = {"step": 5, "window": 5, "layers": [{"name": "a", "kind": "ReLU", "units": 4, "dead_units": [1],
                                              "dead_fraction": 0.25, "zero_fraction": 0.5, "observations": 8,
                                              "status": "critical"}]}
    layer = Report.from_dict(d).layers[0]
    assert layer.dormant_units == [] and layer.dormant_fraction is None and layer.last_fired is None
    assert layer.flags == []


def test_run_log_caps_last_fired_for_wide_sites(tmp_path):
    net = nn.Sequential(nn.Linear(3, runlog.FIRING_RATE_CAP + 1), nn.ReLU())
    with deadwatch.watch(net, logdir=tmp_path, reporters=["jsonl"]) as monitor:
        net(torch.randn(2, 3)).sum().backward()
        monitor.step()
        assert len(monitor.report().layers[0].last_fired) == runlog.FIRING_RATE_CAP + 1
    record = json.loads((tmp_path / runlog.FILENAME).read_text().splitlines()[-1])
    assert record["layers"][0]["last_fired"] is None


def test_tensorboard_has_dormant_and_saturated_fractions(logged_run):
    logdir, reports = logged_run
    acc = ea.EventAccumulator(str(logdir), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"deadwatch/dormant_fraction/act", "deadwatch/dormant_fraction/squash",
            "deadwatch/saturated_fraction/squash"} <= tags
    assert "deadwatch/saturated_fraction/act" not in tags          # ReLU is not bounded
    got = [e.value for e in acc.Scalars("deadwatch/saturated_fraction/squash")]
    assert got == pytest.approx([r.layer("squash").saturated_fraction for r in reports])
    got = [e.value for e in acc.Scalars("deadwatch/dormant_fraction/act")]
    assert got == pytest.approx([r.layer("act").dormant_fraction for r in reports])


def run_main(capsys, *argv):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_shows_the_verdicts_and_fails_on_flags(logged_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    logdir, reports = logged_run
    code, out, err = run_main(capsys, "summary", logdir)
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    assert "dormant" in header and "flags" in header
    assert "2 died at step 3" in " ".join(out.split())          # act's units 2 and 3 last fired at step 3
    assert "squash" in out and "saturated" in out
    assert run_main(capsys, "summary", logdir, "--fail-on", "saturated")[0] == 1
    assert run_main(capsys, "summary", logdir, "--fail-on", "saturated", "--site", "^act$")[0] == 0
    assert run_main(capsys, "summary", logdir, "--fail-on", "rare")[0] == 0
    code, _, err = run_main(capsys, "summary", logdir, "--fail-on", "dormant")
    assert code == 1 and "act" in err
    d = json.loads(run_main(capsys, "summary", logdir, "--json")[1])
    assert d["layers"][0]["last_fired"] == [10, 10, 3, 3]


def test_console_shows_dormant_and_flags_columns():
    import io

    from deadwatch.reporters.console import ConsoleReporter

    buf = io.StringIO()
    net = affine_net(nn.GELU(), [1e-3, 1.0, 1.0], [0.0, 0.0, 0.0])
    with deadwatch.watch(net, reporters=[ConsoleReporter(file=buf)], count_subsample=1) as monitor:
        net(torch.randn(8, 3)).sum().backward()
        monitor.step()
    text = buf.getvalue()
    row = next(line for line in text.splitlines() if line.startswith("│"))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[-3:] == ["1 (33.3%)", "dormant", "ok"]
    assert "1: 1 dormant of 3 units" in text
    layer = LayerReport(name="x", kind="ReLU", units=2, dead_units=[], dead_fraction=0.0, zero_fraction=0.5,
                        observations=4, status="ok")
    assert math.isclose(layer.zero_fraction, 0.5) and layer.flags == []


# ---- last_fired merged across ranks (MAX inside the one SUM all_reduce) -------------------------------------

@pytest.mark.parametrize("world", [2, 3, 8, 64])
def test_last_fired_max_through_a_sum(world):
    from deadwatch import sync

    k, steps = world.bit_length(), 5000
    horizon = sync._horizon(k)
    g = np.random.default_rng(world)
    recent = g.integers(steps - horizon + 1, steps, size=(world, 200))   # within the horizon: any mix
    recent[:, :20] = -1                                                   # never fired on any rank
    recent[0, 20:40] = -1                                                 # never on one rank only
    old = np.repeat(g.integers(-1, steps - horizon, size=(1, 50)), world, axis=0)  # long ago, the same everywhere
    last = np.concatenate([recent, old], axis=1)
    if steps - horizon > 0:
        last[:, :20] = -1
    code = np.zeros(last.shape[1])
    for rank in range(world):
        out = torch.empty(last.shape[1], dtype=torch.float64)
        sync._encode_last(torch.tensor(last[rank], dtype=torch.int32), steps, k, out)
        code += out.numpy()
    merged = sync._decode_last(code, last.sum(0).astype(np.float64), world, steps, k)
    assert merged.tolist() == last.max(0).tolist()
