"""Activations deadwatch did not see before: a class of one's own named in `activations.extra`, and the
Tensor methods x.relu(), x.relu_(), x.sigmoid(), x.tanh(). Verdicts against a brute-force recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadwatch
from deadwatch import ConfigError


class QuickGELU(nn.Module):
    """CLIP's activation: not in any module deadwatch knows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class Net(nn.Module):
    """fc1 -> QuickGELU -> fc2 -> x.<method>() -> head; units 0-2 of fc1 and 1, 4 of fc2 killed by -1e4 biases."""

    def __init__(self, method: str = "relu"):
        super().__init__()
        self.method = method
        self.fc1, self.act, self.fc2, self.head = nn.Linear(8, 12), QuickGELU(), nn.Linear(12, 10), nn.Linear(10, 2)
        with torch.no_grad():
            self.fc1.bias[:3] = -1e4
            self.fc2.bias[[1, 4]] = -1e4

    def forward(self, x):
        h = getattr(self.fc2(self.act(self.fc1(x))), self.method)()
        return self.head(h)


EXTRA = [f"{QuickGELU.__module__}.{QuickGELU.__qualname__}"]


def reference(net, xs, method):
    """Per site: how often each unit's output is above the activation's value at 0, from every value."""
    fired = {"act": 0, "fc2": 0}
    threshold = 0.5 if method.startswith("sigmoid") else 0.0
    with torch.no_grad():
        for x in xs:
            a = quick_gelu(net.fc1(x))
            h = getattr(net.fc2(a).clone(), method)()
            fired["act"] = fired["act"] + (a > 0).sum(0).numpy()
            fired["fc2"] = fired["fc2"] + (h > threshold).sum(0).numpy()
    return {k: v / (len(xs) * len(xs[0])) for k, v in fired.items()}


@pytest.mark.parametrize("method", ["relu", "relu_", "sigmoid", "tanh"])
def test_a_class_in_activations_extra_and_a_tensor_method_give_exact_verdicts(method):
    torch.manual_seed(0)
    net = Net(method)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 8, generator=g) for _ in range(5)]
    name = method.rstrip("_")
    functions = ["relu", "sigmoid", "tanh"]   # sigmoid too: QuickGELU's own torch.sigmoid must not be a site
    with deadwatch.watch(net, reporters=[], count_subsample=1, functions=functions,
                         activations={"extra": EXTRA}) as monitor:
        for x in xs:
            net(x).sum().backward()
            monitor.step()
        report = monitor.report()
    assert [layer.name for layer in report.layers] == ["act", f"Tensor.{name}#0"]
    ref = reference(net, xs, method)
    act, fn = report.layer("act"), report.layer(f"Tensor.{name}#0")
    assert act.kind == "QuickGELU" and act.dead_units == [0, 1, 2]
    np.testing.assert_allclose(act.firing_rate, ref["act"], rtol=0, atol=1e-12)
    assert fn.kind == f"Tensor.{name}" and fn.dead_units == [1, 4]
    assert fn.bounds == ({"sigmoid": [0.0, 1.0], "tanh": [-1.0, 1.0]}.get(name))
    np.testing.assert_allclose(fn.firing_rate, ref["fc2"], rtol=0, atol=1e-12)


def test_without_activations_extra_the_class_is_no_site():
    net = Net()
    with deadwatch.watch(net, reporters=[], functions=["relu"]) as monitor:
        net(torch.randn(4, 8)).sum().backward()
        monitor.step()
        assert [layer.name for layer in monitor.report().layers] == ["Tensor.relu#0"]


def test_tensor_methods_go_back_when_the_monitor_closes():
    originals = {name: getattr(torch.Tensor, name) for name in ("relu", "relu_", "sigmoid", "tanh")}
    net = Net()
    with deadwatch.watch(net, reporters=[], functions=["relu", "sigmoid", "tanh"]):
        assert torch.Tensor.relu is not originals["relu"]
    assert {name: getattr(torch.Tensor, name) for name in originals} == originals


@pytest.mark.parametrize("path,why", [
    ("no_such_package.QuickGELU", "does not resolve"),
    ("torch.nn.NoSuchActivation", "module 'torch.nn' has no 'NoSuchActivation'"),
    ("math.pi", "not a torch.nn.Module subclass"),
    ("torch.Tensor", "not a torch.nn.Module subclass"),
])
def test_a_bad_dotted_path_is_a_config_error_naming_it(path, why):
    with pytest.raises(ConfigError) as e:
        deadwatch.watch(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), reporters=[], activations={"extra": [path]})
    assert repr(path) in str(e.value) and why in str(e.value) and "nn.Module subclass" in str(e.value)


@pytest.mark.parametrize("value", ["pkg.Cls", [3]])
def test_activations_extra_must_be_a_list_of_strings(value):
    with pytest.raises(ConfigError, match="activations.extra must be a list"):
        deadwatch.watch(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), reporters=[], activations={"extra": value})


def test_activations_keys_are_checked():
    with pytest.raises(ConfigError, match="unknown config key 'activations.extras'; allowed: activations.extra"):
        deadwatch.watch(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), reporters=[], activations={"extras": []})
    with pytest.raises(ConfigError, match="activations must be a mapping"):
        deadwatch.watch(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), reporters=[], activations=["x"])


def test_compiled_tensor_methods_warn_once():
    """torch.compile runs x.relu() without the wrapper: that site counts its eager step only, and says so
    once; the module site beside it counts every step."""
    import warnings

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.head = nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1)

        def forward(self, x):
            h = self.fc(x)
            return self.head(self.act(h) + h.relu())

    torch.manual_seed(0)
    net = Mixed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with deadwatch.watch(net, reporters=[], count_subsample=1) as monitor:
            compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
            for _ in range(3):
                compiled(torch.randn(16, 8)).sum().backward()
                monitor.step()
            report = monitor.report()
            monitor.report()
    assert report.layer("act").observations == 3 * 16
    assert report.layer("Tensor.relu#0").observations == 16
    said = [str(w.message) for w in caught if "tensor methods" in str(w.message)]
    assert len(said) == 1 and "sites Tensor.relu#0 are" in said[0]


def test_eager_tensor_methods_do_not_warn():
    import warnings
    net = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with deadwatch.watch(net, reporters=[]) as monitor:
            net(torch.randn(4, 8))
            monitor.step()
            monitor.report()
    assert not [w for w in caught if "tensor methods" in str(w.message)]
