"""Safety: watching a model never changes training, never leaves anything behind,
never syncs with the host in the hook path, keeps O(units) state, and a broken
reporter cannot stop training."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
import deadwatch.capture
from deadwatch.config import FUNCTIONS

# ---------------------------------------------------------------------------------------------
# models


class MLP(nn.Module):
    """ReLU modules plus Dropout, so that any use of the global RNG by the monitor shows."""

    def __init__(self, d_in=20, hidden=32, d_out=5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """Conv + BatchNorm + in-place ReLU (the hook sees the tensor that is then used downstream)."""

    def __init__(self, d_out=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, d_out))

    def forward(self, x):
        return self.head(self.features(x))


class Functional(nn.Module):
    """Activations called as functions: F.gelu, torch.relu, in-place F.relu, F.leaky_relu."""

    def __init__(self, d_in=20, hidden=24, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        h = F.relu(self.fc3(h) - 0.1, inplace=True)
        h = F.leaky_relu(h, 0.01)
        return self.out(h)


def _data(kind, steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        xs = [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(steps)]
        ys = [torch.randint(0, 4, (batch,), generator=g) for _ in range(steps)]
    else:
        xs = [torch.randn(batch, 20, generator=g) for _ in range(steps)]
        ys = [torch.randint(0, 5, (batch,), generator=g) for _ in range(steps)]
    return xs, ys


MODELS = {"mlp": MLP, "cnn": CNN, "functional": Functional}
EXPECTED_SITES = {
    "mlp": {"net.1", "net.4"},
    "cnn": {"features.2", "features.5"},
    "functional": {"gelu#0", "relu#0", "relu#1", "leaky_relu#0"},
}


def _train(kind, monitor_kwargs=None, steps=6, batch=16, extra_hook=None):
    """Train a fresh model (seed 0) and record every output, loss, gradient and the final state."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    if extra_hook is not None:
        model.register_forward_hook(extra_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs, ys = _data(kind, steps, batch)
    torch.manual_seed(1234)  # same RNG stream for Dropout in both runs
    record = {"outputs": [], "losses": [], "grads": [], "eval": []}
    monitor = deadwatch.watch(model, **monitor_kwargs) if monitor_kwargs is not None else None
    try:
        for i, (x, y) in enumerate(zip(xs, ys)):
            model.train()
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            record["outputs"].append(out.detach().clone())
            record["losses"].append(loss.detach().clone())
            record["grads"].append([p.grad.detach().clone() for p in model.parameters()])
            opt.step()
            if monitor is not None:
                monitor.step()
                if i % 2 == 1:
                    monitor.report()
            if i % 3 == 2:  # an evaluation pass in between
                model.eval()
                with torch.no_grad():
                    record["eval"].append(model(xs[0]).clone())
        sites = None
        if monitor is not None:
            sites = {layer.name for layer in monitor.report().layers}
    finally:
        if monitor is not None:
            monitor.close()
    record["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return record, sites


def _assert_identical(a, b):
    assert len(a["outputs"]) == len(b["outputs"])
    for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"])):
        assert torch.equal(x, y), f"output of step {i} differs"
    for i, (x, y) in enumerate(zip(a["losses"], b["losses"])):
        assert torch.equal(x, y), f"loss of step {i} differs"
    for i, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        assert len(ga) == len(gb)
        for j, (x, y) in enumerate(zip(ga, gb)):
            assert torch.equal(x, y), f"gradient of parameter {j} in step {i} differs"
    assert len(a["eval"]) == len(b["eval"])
    for i, (x, y) in enumerate(zip(a["eval"], b["eval"])):
        assert torch.equal(x, y), f"eval output {i} differs"
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"final {k} differs"


# ---------------------------------------------------------------------------------------------
# 1. bitwise identical training


@pytest.mark.parametrize("kind", ["mlp", "cnn", "functional"])
@pytest.mark.parametrize("count_eval", [False, True])
def test_training_with_monitor_is_bitwise_identical(kind, count_eval):
    plain, _ = _train(kind)
    watched, sites = _train(kind, dict(reporters=[], report_every=2, window=3, count_eval=count_eval))
    assert EXPECTED_SITES[kind] <= sites, f"monitor did not watch the expected sites: {sites}"
    _assert_identical(plain, watched)


def test_bitwise_comparison_detects_a_perturbing_hook():
    """The comparison above can fail: a hook that nudges the output is caught."""
    plain, _ = _train("mlp", steps=2)

    def nudge(module, args, out):
        return out * (1 + 1e-7)

    nudged, _ = _train("mlp", steps=2, extra_hook=nudge)
    with pytest.raises(AssertionError):
        _assert_identical(plain, nudged)


# ---------------------------------------------------------------------------------------------
# 2. nothing left behind

MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
                     "_global_forward_hooks_with_kwargs", "_global_module_registration_hooks",
                     "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")


def _module_hooks(model):
    return {name: {attr: list(getattr(m, attr).items()) for attr in MODULE_HOOK_DICTS if hasattr(m, attr)}
            for name, m in model.named_modules()}


def _global_hooks():
    mod = torch.nn.modules.module
    out = {}
    for attr in GLOBAL_HOOK_DICTS:
        if hasattr(mod, attr):
            value = getattr(mod, attr)
            out[attr] = list(value.items()) if hasattr(value, "items") else value
    return out


def _function_names():
    names = set()
    for fn in FUNCTIONS:
        names |= {fn, fn + "_"}
    return names


def _functions():
    """Every public object of torch.nn.functional, plus the activation names on torch and torch.Tensor."""
    snap = {("F", k): v for k, v in vars(torch.nn.functional).items() if not k.startswith("__")}
    for k in _function_names():
        for label, ns in (("torch", torch), ("Tensor", torch.Tensor)):
            if hasattr(ns, k):
                snap[(label, k)] = getattr(ns, k)
    return snap


def _assert_functions_restored(before):
    after = _functions()
    changed = [k for k, v in before.items() if after.get(k) is not v]
    assert not changed, f"not restored: {changed}"
    added = set(after) - set(before)
    assert not added, f"left behind: {added}"
    assert deadwatch.capture.active_function_patches() == 0


def _snapshot(*models):
    return [_module_hooks(m) for m in models], _global_hooks(), _functions()


def _assert_clean(snapshot, *models):
    module_hooks, global_hooks, functions = snapshot
    assert [_module_hooks(m) for m in models] == module_hooks
    assert _global_hooks() == global_hooks
    _assert_functions_restored(functions)


def _assert_attached(model):
    """Sanity: while watching, there are hooks and F.relu / F.gelu are wrapped (so the checks can fail)."""
    assert any(h[attr] for h in _module_hooks(model).values() for attr in ("_forward_hooks", "_forward_pre_hooks"))
    assert hasattr(F.relu, "__deadwatch_original__") and hasattr(F.gelu, "__deadwatch_original__")
    assert deadwatch.capture.active_function_patches() > 0


@pytest.mark.parametrize("kind", ["mlp", "cnn", "functional"])
def test_no_hooks_or_patches_left_after_close(kind):
    torch.manual_seed(0)
    model = MODELS[kind]()
    xs, _ = _data(kind, 3, 4)
    before = _snapshot(model)
    relu_before, gelu_before, torch_relu_before = F.relu, F.gelu, torch.relu
    with deadwatch.watch(model, reporters=[]) as monitor:
        _assert_attached(model)
        assert F.relu is not relu_before and F.gelu is not gelu_before and torch.relu is not torch_relu_before
        for x in xs:
            model(x).sum().backward()
            monitor.step()
        assert monitor.report().layers
    _assert_clean(before, model)
    assert F.relu is relu_before and F.gelu is gelu_before and torch.relu is torch_relu_before
    monitor.close()  # idempotent
    _assert_clean(before, model)
    with pytest.raises(RuntimeError):
        monitor.step()


def test_no_hooks_left_after_explicit_close_without_with():
    model = Functional()
    before = _snapshot(model)
    monitor = deadwatch.watch(model, reporters=[])
    _assert_attached(model)
    model(torch.randn(4, 20))
    monitor.step()
    monitor.close()
    _assert_clean(before, model)
    monitor.close()
    _assert_clean(before, model)


class Boom(Exception):
    pass


class Exploding(nn.Module):
    """Raises in the middle of its forward, after an activation function ran."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        h = F.gelu(self.act(self.fc(x)))
        if getattr(self, "explode", False):
            raise Boom("mid-forward")
        return h


@pytest.mark.parametrize("where", ["body", "mid_forward", "keyboard_interrupt", "config_error_in_hook"])
def test_hooks_removed_when_the_with_body_raises(where):
    model = Exploding()
    before = _snapshot(model)
    error = {"body": Boom("in body"), "keyboard_interrupt": KeyboardInterrupt()}.get(where)
    # unit_axis out of range for a 2-d output: only found when the hook first sees the output
    overrides = {"unit_axis": {"^act$": 5}} if where == "config_error_in_hook" else {}
    seen_at_catch = None
    raised = None
    try:
        with deadwatch.watch(model, reporters=[], report_every=1, **overrides) as monitor:
            _assert_attached(model)
            model(torch.randn(4, 20)).sum().backward()
            monitor.step()
            if where == "mid_forward":
                model.explode = True
                model(torch.randn(4, 20))
            elif error is not None:
                raise error
    except (Boom, KeyboardInterrupt, deadwatch.ConfigError) as e:
        raised = e
        seen_at_catch = _snapshot(model)  # state at the moment the exception reaches the caller
    assert raised is not None, "the exception was swallowed"
    if error is not None:
        assert raised is error
    if where == "config_error_in_hook":
        assert isinstance(raised, deadwatch.ConfigError) and "unit_axis" in str(raised)
    assert seen_at_catch[0] == before[0]
    assert seen_at_catch[1] == before[1]
    _assert_clean(before, model)
    # the model is usable without the monitor, the monitor is closed
    model.explode = False
    model(torch.randn(2, 20))
    monitor.close()
    with pytest.raises(RuntimeError):
        monitor.step()
    _assert_clean(before, model)


@pytest.mark.parametrize("first", [0, 1])
def test_two_monitors_closed_in_either_order(first):
    torch.manual_seed(0)
    models = [Functional(), MLP()]
    before = _snapshot(*models)
    monitors = [deadwatch.watch(models[0], reporters=[], count_subsample=1),
                deadwatch.watch(models[1], reporters=[], count_subsample=1)]
    try:
        xs = torch.randn(4, 20)
        for model, monitor in zip(models, monitors):
            model(xs).sum().backward()
            monitor.step()
        monitors[first].close()
        second = 1 - first
        # the other monitor keeps watching its model: its sites still count observations
        obs_before = {l.name: l.observations for l in monitors[second].report().layers}
        models[second](xs).sum().backward()
        monitors[second].step()
        obs_after = {l.name: l.observations for l in monitors[second].report().layers}
        assert obs_after.keys() == obs_before.keys() and obs_after
        assert all(obs_after[k] == obs_before[k] + 4 for k in obs_after), (obs_before, obs_after)
        assert deadwatch.capture.active_function_patches() > 0
        # the closed monitor's model has no hooks any more
        assert _module_hooks(models[first]) == before[0][first]
        monitors[second].close()
    finally:
        for m in monitors:
            m.close()
    _assert_clean(before, *models)


def test_two_monitors_with_different_functions():
    torch.manual_seed(0)
    a, b = Functional(), Functional()
    before = _snapshot(a, b)
    ma = deadwatch.watch(a, reporters=[], functions=["relu"])
    mb = deadwatch.watch(b, reporters=[], functions=["gelu"], count_subsample=1)
    x = torch.randn(3, 20)
    a(x), b(x)
    ma.step(), mb.step()
    assert {l.name for l in ma.report().layers} == {"relu#0", "relu#1"}
    assert {l.name for l in mb.report().layers} == {"gelu#0"}
    ma.close()
    b(x)
    mb.step()
    assert mb.report().layer("gelu#0").observations == 6
    mb.close()
    _assert_clean(before, a, b)


# ---------------------------------------------------------------------------------------------
# 3. no host sync in the hook path

SYNC_METHODS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__index__")


class HostSync(AssertionError):
    pass


def _forbid_host_sync(mp, calls):
    for name in SYNC_METHODS:
        def forbidden(self, *args, _name=name, **kwargs):
            calls.append(_name)
            raise HostSync(f"host sync: Tensor.{_name} called")
        mp.setattr(torch.Tensor, name, forbidden)


def _step(model, opt, x, y, monitor=None):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if monitor is not None:
        monitor.step()


@pytest.mark.parametrize("kind", ["mlp", "cnn", "functional"])
def test_no_host_sync_in_hook_path(kind, monkeypatch):
    torch.manual_seed(0)
    model = MODELS[kind]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs, ys = _data(kind, 4, 8)
    baseline = copy.deepcopy(model)
    base_opt = torch.optim.SGD(baseline.parameters(), lr=0.01)
    calls: list[str] = []
    # the model and optimizer themselves do not sync: otherwise the test below proves nothing
    with monkeypatch.context() as mp:
        _forbid_host_sync(mp, calls)
        for x, y in zip(xs, ys):
            _step(baseline, base_opt, x, y)
    assert calls == []

    monitor = deadwatch.watch(model, reporters=[], report_every=10**6, window=10**6)
    try:
        with monkeypatch.context() as mp:
            _forbid_host_sync(mp, calls)
            for x, y in zip(xs, ys):  # the first forward creates the sites: included
                _step(model, opt, x, y, monitor)
            model.eval()
            with torch.no_grad():
                model(xs[0])
            model.train()
        assert calls == [], f"host syncs in the hook path: {calls}"
        report = monitor.report()  # the one sync, outside the patched region
        assert report.step == 4
        assert EXPECTED_SITES[kind] <= {l.name for l in report.layers}
        assert all(l.observations > 0 for l in report.layers)
    finally:
        monitor.close()


@pytest.mark.parametrize("method", SYNC_METHODS)
def test_host_sync_detector_catches_a_syncing_hook(method, monkeypatch):
    """The mechanism above can fail: a forward hook that reads a value on the host is caught."""
    model = MLP()
    uses = {
        "item": lambda t: t.sum().item(),
        "tolist": lambda t: t.tolist(),
        "__bool__": lambda t: bool((t > 0).any()),
        "cpu": lambda t: t.cpu(),
        "numpy": lambda t: t.detach().numpy(),
        "__float__": lambda t: float(t.detach().sum()),
        "__int__": lambda t: int(t.detach().sum()),
        "__index__": lambda t: [0, 1][(t.sum() > 1e9).long()],
    }

    def syncing_hook(module, args, out):
        uses[method](out)

    model.net[1].register_forward_hook(syncing_hook)
    calls: list[str] = []
    with monkeypatch.context() as mp:
        _forbid_host_sync(mp, calls)
        with pytest.raises(HostSync):
            model(torch.randn(4, 20))
    assert method in calls
    model(torch.randn(4, 20))  # restored


# ---------------------------------------------------------------------------------------------
# 4. state is O(units)


def _held_state(monitor):
    """Bytes of tensor/array storage and number of container entries reachable from the monitor
    (not counting the watched model itself)."""
    seen, storages = set(), {}
    entries = 0
    stack = [monitor]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, nn.Module) or callable(obj) and not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            storages[s.data_ptr(), obj.device] = s.nbytes()
        elif isinstance(obj, np.ndarray):
            storages[obj.__array_interface__["data"][0], "np"] = obj.nbytes
        elif isinstance(obj, dict):
            entries += len(obj)
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            entries += len(obj)
            stack.extend(obj)
        elif type(obj).__module__.startswith("deadwatch") and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return sum(storages.values()), entries


def _registry_numel(monitor):
    total = 0
    for counters in monitor._registry.by_device.values():
        for v in vars(counters).values():
            if isinstance(v, torch.Tensor):
                total += v.numel()
    return total


@pytest.mark.parametrize("kind", ["mlp", "cnn", "functional"])
def test_state_does_not_grow_with_steps_or_batch_size(kind):
    results = []
    for steps, batch in ((2, 4), (40, 128)):
        torch.manual_seed(0)
        model = MODELS[kind]()
        xs, _ = _data(kind, 1, batch)
        monitor = deadwatch.watch(model, reporters=[], report_every=7, window=5)
        try:
            for _ in range(steps):
                model(xs[0]).sum().backward()
                monitor.step()
            report = monitor.report()
            results.append((_registry_numel(monitor), _held_state(monitor), report.units))
        finally:
            monitor.close()
    (numel_small, held_small, units), (numel_big, held_big, units_big) = results
    assert units == units_big and units > 0
    assert numel_small == numel_big, "registry buffers grow with steps / batch size"
    assert held_small == held_big, "monitor state grows with steps / batch size"
    assert numel_small <= 16 * units
    assert held_small[0] <= 64 * units + 4096


def test_state_measure_can_fail():
    """The walker sees tensors a monitor would keep per step."""
    model = MLP()
    monitor = deadwatch.watch(model, reporters=[])
    try:
        model(torch.randn(4, 20))
        monitor.step()
        held = _held_state(monitor)
        monitor._capture.sites["leak"] = None
        monitor.history = [torch.zeros(1000)]
        grown = _held_state(monitor)
        assert grown[0] >= held[0] + 4000 and grown[1] > held[1]
    finally:
        monitor.close()


# ---------------------------------------------------------------------------------------------
# 5. a failing reporter warns once; training goes on


class Recorder:
    def __init__(self):
        self.reports = []
        self.closed = False

    def emit(self, report):
        self.reports.append(report.step)

    def close(self):
        self.closed = True


class Broken:
    def __init__(self):
        self.calls = 0
        self.closed = False

    def emit(self, report):
        self.calls += 1
        raise OSError("disk full")

    def close(self):
        self.closed = True


def test_failing_reporter_warns_once_and_training_goes_on():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs, ys = _data("mlp", 10, 8)
    before, broken, after = Recorder(), Broken(), Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with deadwatch.watch(model, reporters=[before, broken, after], report_every=2) as monitor:
            for x, y in zip(xs, ys):
                _step(model, opt, x, y, monitor)
            assert monitor.steps == 10
            assert monitor.report().layers
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "Broken" in str(runtime[0].message) and "disk full" in str(runtime[0].message)
    assert broken.calls == 1 and broken.closed
    assert before.reports == [2, 4, 6, 8, 10] and after.reports == [2, 4, 6, 8, 10]
    assert before.closed and after.closed


def test_reporter_failing_on_close_does_not_raise():
    class BadClose(Recorder):
        def close(self):
            raise OSError("cannot flush")

    model = MLP()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = BadClose()
        monitor = deadwatch.watch(model, reporters=[bad], report_every=1)
        model(torch.randn(2, 20))
        monitor.step()
        monitor.close()
        monitor.close()
    assert bad.reports == [1]
    assert any(issubclass(w.category, RuntimeWarning) and "cannot flush" in str(w.message) for w in caught)
    assert deadwatch.capture.active_function_patches() == 0
    assert all(not m._forward_hooks for m in model.modules())


from torch.nn.functional import gelu as _imported_gelu  # noqa: E402  (a name imported by model code)


class _ImportedGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return _imported_gelu(self.fc(x))


def test_imported_name_stays_watched_until_the_last_monitor_closes():
    original = _imported_gelu
    a, b = _ImportedGelu(), _ImportedGelu()
    ma, mb = deadwatch.watch(a, reporters=[]), deadwatch.watch(b, reporters=[])
    ma.close()
    b(torch.randn(3, 4))
    mb.step()
    assert [layer.name for layer in mb.report().layers] == ["gelu#0"]
    assert globals()["_imported_gelu"] is not original  # still the wrapper while mb watches
    mb.close()
    assert globals()["_imported_gelu"] is original
    assert deadwatch.capture.active_function_patches() == 0
