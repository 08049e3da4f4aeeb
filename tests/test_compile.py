"""torch.compile and autocast: the verdict does not depend on how the forward runs.

* torch.compile(model) with the monitor attached before compiling, and watch(torch.compile(model))
  (also after the compiled model already ran): the same verdict as eager mode on the same data,
  for activation modules and for activation functions called inside forward;
* bf16 and fp16 CPU autocast: the same dead units and statuses as fp32 on a planted model.

Eager and compiled runs start from the same weights and see the same batches; each run trains
(SGD), so what is compared is the whole verdict after several steps, not a single forward.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import deadwatch

STEPS = 8
WINDOW = 5
BATCH = 32


class ModuleActs(nn.Module):
    """Activation modules: fc1 -> ReLU -> fc2 -> GELU -> fc3."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 8)
        self.act2 = nn.GELU()
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act(self.fc1(x)))))


class FunctionalActs(nn.Module):
    """Activation functions inside forward: fc1 -> F.relu -> fc2 -> F.gelu -> fc3 (sites relu#0, gelu#0)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


SITES = {ModuleActs: ["act", "act2"], FunctionalActs: ["relu#0", "gelu#0"]}


def planted(cls: type) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        model.fc1.bias[[0, 1, 2]] = -1e4   # first site: units 0, 1, 2 dead
        model.fc2.bias[5] = -1e4           # second site: unit 5 dead
    return model


def batch(step: int) -> torch.Tensor:
    return torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(step))


def train(model: nn.Module, monitor: deadwatch.Monitor, forward=None) -> deadwatch.Report:
    forward = model if forward is None else forward
    params = model._orig_mod.parameters() if hasattr(model, "_orig_mod") else model.parameters()
    opt = torch.optim.SGD(params, lr=0.01)
    for step in range(STEPS):
        opt.zero_grad()
        forward(batch(step)).square().mean().backward()
        opt.step()
        monitor.step()
    report = monitor.report()
    monitor.close()
    return report


def eager_report(cls: type) -> deadwatch.Report:
    model = planted(cls)
    return train(model, deadwatch.watch(model, reporters=[], window=WINDOW, report_every=10**6, count_subsample=1))


def assert_same_verdict(report: deadwatch.Report, expected: deadwatch.Report) -> None:
    assert [layer.name for layer in report.layers] == [layer.name for layer in expected.layers]
    assert report.step == expected.step
    for layer, want in zip(report.layers, expected.layers):
        where = f"site {layer.name!r}"
        assert layer.kind == want.kind, where
        assert layer.units == want.units, where
        assert layer.dead_units == want.dead_units, where
        assert layer.observations == want.observations, where
        assert layer.zero_fraction == pytest.approx(want.zero_fraction, abs=1e-9), where
        assert np.allclose(layer.firing_rate, want.firing_rate, atol=1e-9), where
        assert layer.status == want.status, where


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [ModuleActs, FunctionalActs], ids=["modules", "functional"])
def test_eager_setup(cls):
    """The planted verdict in eager mode, by hand (what the compiled runs are compared with)."""
    report = eager_report(cls)
    first, second = SITES[cls]
    assert [layer.name for layer in report.layers] == [first, second]
    assert report.layer(first).dead_units[:3] == [0, 1, 2]
    assert 5 in report.layer(second).dead_units
    assert report.layer(first).observations == STEPS * BATCH
    assert report.layer(first).status == "critical"


@pytest.mark.slow
@pytest.mark.parametrize("cls", [ModuleActs, FunctionalActs], ids=["modules", "functional"])
def test_watch_then_compile_equals_eager(cls):
    expected = eager_report(cls)
    model = planted(cls)
    monitor = deadwatch.watch(model, reporters=[], window=WINDOW, report_every=10**6, count_subsample=1)
    compiled = torch.compile(model)
    before = graphs_compiled()
    report = train(model, monitor, forward=compiled)
    assert graphs_compiled() > before, "torch.compile compiled nothing: the test would compare eager with eager"
    assert_same_verdict(report, expected)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [ModuleActs, FunctionalActs], ids=["modules", "functional"])
def test_watch_compiled_model_equals_eager_and_has_plain_names(cls):
    expected = eager_report(cls)
    compiled = torch.compile(planted(cls))
    monitor = deadwatch.watch(compiled, reporters=[], window=WINDOW, report_every=10**6, count_subsample=1)
    before = graphs_compiled()
    report = train(compiled, monitor)
    assert graphs_compiled() > before
    names = [layer.name for layer in report.layers]
    assert not any("_orig_mod" in name for name in names), names
    assert names == SITES[cls]
    assert_same_verdict(report, expected)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [ModuleActs, FunctionalActs], ids=["modules", "functional"])
def test_watch_compiled_model_after_it_already_ran(cls):
    """The compiled graph was built without any hook: attaching must still see every site."""
    expected = eager_report(cls)
    model = planted(cls)
    compiled = torch.compile(model)
    warm = copy.deepcopy(model.state_dict())
    compiled(batch(99)).sum().backward()   # compiled, run, no monitor yet
    model.load_state_dict(warm)
    model.zero_grad(set_to_none=True)
    monitor = deadwatch.watch(compiled, reporters=[], window=WINDOW, report_every=10**6, count_subsample=1)
    report = train(compiled, monitor)
    assert [layer.name for layer in report.layers] == SITES[cls]
    assert_same_verdict(report, expected)


# ---- autocast ---------------------------------------------------------------------------------------

def _autocast_supported(dtype: torch.dtype) -> str | None:
    try:
        with torch.autocast("cpu", dtype=dtype):
            out = nn.Linear(4, 4)(torch.randn(2, 4))
    except Exception as e:  # noqa: BLE001 - any failure means: not supported here
        return f"CPU autocast to {dtype} is not supported by this torch: {e}"
    if out.dtype != dtype:
        return f"CPU autocast to {dtype} leaves nn.Linear in {out.dtype} on this torch"
    return None


def autocast_report(cls: type, dtype: torch.dtype | None) -> tuple[deadwatch.Report, set]:
    model = planted(cls)
    seen = set()
    probe = model.fc1.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    monitor = deadwatch.watch(model, reporters=[], window=WINDOW, report_every=10**6, count_subsample=1)

    def forward(x):
        if dtype is None:
            return model(x)
        with torch.autocast("cpu", dtype=dtype):
            return model(x)

    report = train(model, monitor, forward=forward)
    probe.remove()
    return report, seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls", [ModuleActs, FunctionalActs], ids=["modules", "functional"])
def test_autocast_gives_the_fp32_verdict(cls, dtype):
    if reason := _autocast_supported(dtype):
        pytest.skip(reason)
    expected, seen32 = autocast_report(cls, None)
    report, seen = autocast_report(cls, dtype)
    assert seen32 == {torch.float32} and seen == {dtype}, "setup: autocast did not change the activations' dtype"
    assert [layer.name for layer in report.layers] == [layer.name for layer in expected.layers]
    for layer, want in zip(report.layers, expected.layers):
        assert layer.dead_units == want.dead_units, layer.name
        assert layer.status == want.status, layer.name
        assert layer.observations == want.observations, layer.name
        assert layer.units == want.units, layer.name
    assert report.layers[0].dead_units[:3] == [0, 1, 2]


# ---- fullgraph: traced hooks, no graph break ---------------------------------------------------------

class ReusedCNN(nn.Module):
    """One ReLU module called twice per forward (sites act#0, act#1), channels-first conv outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class TorchFunctions(nn.Module):
    """torch.relu and torch.sigmoid (a bounded site) inside forward: sites relu#0, sigmoid#0."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(torch.sigmoid(self.fc2(torch.relu(self.fc1(x)))))


class Block(nn.Module):
    """A pre-norm transformer block on (N, T, C): attention, then an MLP with a GELU module (unit axis -1)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(attn)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.Sequential(Block(), Block())
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(self.blocks(F.relu(self.inp(x))))


def plant_fullgraph(cls: type) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        if cls is ReusedCNN:
            model.conv1.bias[[1, 4]] = -1e4        # act#0: channels 1, 4 dead
            model.conv2.bias[6] = -1e4             # act#1: channel 6 dead
        elif cls is Transformer:
            model.inp.bias[[2, 3]] = -1e4          # relu#0: units 2, 3
            for block in model.blocks:
                block.fc1.bias[[0, 7, 9]] = -1e4   # blocks.k.act: units 0, 7, 9
        else:
            model.fc1.bias[[0, 1, 2]] = -1e4
            model.fc2.bias[5] = -1e4
    return model


def fullgraph_batch(cls: type, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    # Transformer: 16 x 64 token rows (compiled.record reduces them in two steps: see _per_unit)
    shape = {ReusedCNN: (8, 3, 6, 6), Transformer: (16, 64, 8)}.get(cls, (BATCH, 8))
    return torch.randn(*shape, generator=g)


FULLGRAPH = [ModuleActs, FunctionalActs, TorchFunctions, ReusedCNN, Transformer]
PLANTED_SITES = {ModuleActs: {"act": [0, 1, 2], "act2": [5]}, FunctionalActs: {"relu#0": [0, 1, 2], "gelu#0": [5]},
                 TorchFunctions: {"relu#0": [0, 1, 2]}, ReusedCNN: {"act#0": [1, 4], "act#1": [6]},
                 Transformer: {"relu#0": [2, 3], "blocks.0.act": [0, 7, 9], "blocks.1.act": [0, 7, 9]}}


# Inductor's C++ code generation takes seconds per graph on 2 cores: two cases run it, the others stop at
# AOT autograd (aot_eager), which traces the same graph, functionalises the buffer mutations the same way
# and checks the same things about deadwatch (the graph breaks come from dynamo, before any backend).
INDUCTOR = {(Transformer, "watch-then-compile"), (ReusedCNN, "compile-then-watch")}


def run_fullgraph(cls: type, how: str, steps: int = STEPS, accumulate: int = 1):
    """Train a planted model `steps` steps; how: eager, watch-then-compile, compile-then-watch (the
    compiled model already ran before the monitor came). Returns (report, state_dict, graph breaks,
    graphs compiled after the first 3 steps, graphs compiled at the end)."""
    model = plant_fullgraph(cls)
    forward = model
    backend = "inductor" if (cls, how) in INDUCTOR else "aot_eager"
    if how == "compile-then-watch":
        forward = torch.compile(model, fullgraph=True, backend=backend)
        warm = copy.deepcopy(model.state_dict())
        forward(fullgraph_batch(cls, 99)).sum().backward()
        model.load_state_dict(warm)
        model.zero_grad(set_to_none=True)
    monitor = deadwatch.watch(forward, reporters=[], window=WINDOW, report_every=10**6)
    if how == "watch-then-compile":
        forward = torch.compile(model, fullgraph=True, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counters.clear()
    graphs_early = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            opt.zero_grad()
            for micro in range(accumulate):
                forward(fullgraph_batch(cls, step * accumulate + micro)).square().mean().backward()
            opt.step()
            monitor.step()
            if step == 2:
                graphs_early = graphs_compiled()
    # e.g. F.relu inside nn.ReLU.forward taken for a function site of its own: "ran only in compiled graphs"
    ours = [str(w.message) for w in caught if str(w.message).startswith("deadwatch")]
    assert not ours, ours
    report, state = monitor.report(), monitor.state_dict()
    monitor.close()
    return report, state, sum(counters["graph_break"].values()), graphs_early, graphs_compiled()


def assert_same_report(report: deadwatch.Report, expected: deadwatch.Report) -> None:
    """Every figure of the report: counts exactly, the rest to float rounding (inductor computes some
    activations, GELU among them, a few ulp away from eager)."""
    assert_same_verdict(report, expected)
    got, want = report.to_dict(), expected.to_dict()
    assert got.keys() == want.keys()
    for layer, want_layer in zip(got["layers"], want["layers"]):
        assert layer.keys() == want_layer.keys()
        for key, value in want_layer.items():
            assert layer[key] == (pytest.approx(value, rel=1e-6, abs=1e-12) if isinstance(value, float) else value), \
                (layer["name"], key)


def assert_same_state(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys() and state["sites"].keys() == expected["sites"].keys()
    for name, saved in expected["sites"].items():
        mine = state["sites"][name]
        for key, value in saved.items():
            if key == "abs_sum":  # sums of float32 outputs: inductor's GELU is not eager's to the last bit
                assert torch.allclose(mine[key], value, rtol=1e-5), (name, key)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(mine[key], value), (name, key)
            else:
                assert mine[key] == value, (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["watch-then-compile", "compile-then-watch"])
@pytest.mark.parametrize("cls", FULLGRAPH, ids=lambda c: c.__name__)
def test_fullgraph_no_graph_break_and_eager_verdict(cls, how):
    expected, expected_state, *_ = run_fullgraph(cls, "eager")
    for name, dead in PLANTED_SITES[cls].items():
        assert set(dead) <= set(expected.layer(name).dead_units), (name, "setup: the planted units are not dead")
    report, state, breaks, early, late = run_fullgraph(cls, how)
    assert breaks == 0, f"deadwatch made {breaks} graph breaks: {dict(counters['graph_break'])}"
    assert late >= 1, "torch.compile compiled nothing: the test would compare eager with eager"
    assert late == early, "the watched model was recompiled after its first steps: some guard changes every step"
    assert_same_report(report, expected)
    assert_same_state(state, expected_state)


@pytest.mark.slow
def test_fullgraph_gradient_accumulation():
    """Two forwards per step, traced: both are counted, the step's max spans both."""
    expected, expected_state, *_ = run_fullgraph(FunctionalActs, "eager", accumulate=2)
    report, state, breaks, early, late = run_fullgraph(FunctionalActs, "watch-then-compile", accumulate=2)
    assert breaks == 0 and late == early
    assert report.layer("relu#0").observations == 2 * STEPS * BATCH // 8  # count_subsample 8: 4 of 32 rows
    assert_same_report(report, expected)
    assert_same_state(state, expected_state)


@pytest.mark.slow
def test_fullgraph_site_first_met_in_a_compiled_graph():
    """A branch first taken after the eager warm-up step: the next step runs eagerly and finds it."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.act2 = nn.Linear(8, 8), nn.ReLU(), nn.ReLU()
            self.late = False

        def forward(self, x):
            h = self.act(self.fc(x))
            return self.act2(h) if self.late else h

    torch.manual_seed(0)
    model = Branchy()
    monitor = deadwatch.watch(model, reporters=[], window=WINDOW, report_every=10**6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    counters.clear()
    for step in range(6):
        model.late = step >= 2
        compiled(fullgraph_batch(ModuleActs, step)).sum().backward()
        monitor.step()
    report = monitor.report()
    monitor.close()
    assert sum(counters["graph_break"].values()) == 0
    assert [layer.name for layer in report.layers] == ["act", "act2"]
    assert report.layer("act").observations == 6 * 4
    assert report.layer("act2").observations == 3 * 4  # found eagerly at step 3 (0-based), counted from there


def test_watch_leaves_the_compiler_stance_as_it_was():
    """The first step runs eagerly under a process-wide stance; it is put back, also when watch() fails."""
    from torch._dynamo import eval_frame

    model = ModuleActs()
    before = eval_frame._stance.stance
    monitor = deadwatch.watch(model, reporters=[])
    assert eval_frame._stance.stance == "force_eager"
    model(batch(0))
    monitor.step()
    assert eval_frame._stance.stance == before
    monitor.close()
    other = deadwatch.watch(model, reporters=[])
    other.close()  # closed before any step
    assert eval_frame._stance.stance == before


@pytest.mark.parametrize("shape", [(16, 128, 64), (3, 700, 8), (1030, 8), (1031, 8), (4, 5, 8)], ids=str)
def test_per_unit_in_two_reductions_equals_one_reduction(shape):
    """compiled._per_unit reduces units-last outputs in two steps: the same max, the same counts."""
    from deadwatch import stats
    from deadwatch.capture import compiled as path

    x = torch.randn(*shape)
    site = stats.Site("s", "GELU", 0.0, False, 0, 8)
    stats.Registry().add(site, x, x.ndim - 1)
    assert torch.equal(path._per_unit(torch.amax, x, site), torch.amax(x, site.dims))
    fired = (x > 0).float()
    assert torch.equal(path._per_unit(torch.sum, fired, site, torch.float64), torch.sum(fired, site.dims, dtype=torch.float64))
    assert torch.allclose(path._per_unit(torch.sum, x.abs(), site, torch.float32), x.abs().sum(site.dims), rtol=1e-5)


@pytest.mark.parametrize("shape,device,axis,calls", [
    ((16, 128, 64), "cpu", 2, 2),    # units last after two dims, on the CPU: tokens first, then the batch
    ((16, 128, 64), "meta", 2, 1),   # not on the CPU: one reduction (inductor splits on GPUs itself)
    ((16, 64, 128), "cpu", 1, 1),    # units not last
    ((1031, 8), "cpu", 1, 1),        # (batch, units): one reduction is all there is
], ids=["two", "meta", "units-not-last", "2d"])
def test_per_unit_takes_two_reductions_only_where_they_pay(shape, device, axis, calls):
    from deadwatch import stats
    from deadwatch.capture import compiled as path

    x = torch.zeros(*shape, device=device)
    site = stats.Site("s", "GELU", 0.0, False, 0, 8)
    stats.Registry().add(site, torch.zeros(*shape), axis)
    seen = []

    def op(t, dims, **kw):
        seen.append(dims)
        return torch.amax(t, dims)

    path._per_unit(op, x, site)
    assert len(seen) == calls


def test_per_unit_keeps_symbolic_sizes_in_one_reduction():
    """Under dynamic shapes the row count is symbolic: a split chosen by size would guard on it (a recompile per
    size)."""
    from deadwatch import stats
    from deadwatch.capture import compiled as path

    site = stats.Site("s", "GELU", 0.0, False, 0, 8)
    stats.Registry().add(site, torch.zeros(4, 200, 8), 2)
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda t: path._per_unit(torch.amax, t, site), backend="eager", dynamic=True, fullgraph=True)
    for rows in (200, 210, 300):
        x = torch.randn(4, rows, 8)
        assert torch.equal(fn(x), torch.amax(x, (0, 1)))
    assert counters["stats"]["unique_graphs"] == 1
