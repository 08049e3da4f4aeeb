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
