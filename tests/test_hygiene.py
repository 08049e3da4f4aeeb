"""The monitor leaves the process as it found it: the compiler stance, the function patches and the
models of monitors that were never closed, and another thread's activation calls."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.capture import active_function_patches
from deadwatch.capture.functions import PATCH


def stance() -> str:
    from torch._dynamo import eval_frame
    return eval_frame._stance.stance


@pytest.fixture(autouse=True)
def default_stance():
    torch.compiler.set_stance("default")
    yield
    torch.compiler.set_stance("default")
    gc.collect()
    assert active_function_patches() == 0, "a test left the functions patched"


class FnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        return F.relu(self.fc(x))


# ---- the compiler stance ----------------------------------------------------------------------------

def test_the_stance_goes_back_to_what_it_was_before_the_discovery_step():
    torch.compiler.set_stance("eager_on_recompile")
    net = FnNet()
    with deadwatch.watch(net, reporters=[]) as monitor:
        assert stance() == "force_eager"          # the first step finds the sites eagerly
        net(torch.randn(2, 4))
        monitor.step()
        assert stance() == "eager_on_recompile"
    assert stance() == "eager_on_recompile"


def test_a_stance_the_user_sets_meanwhile_is_kept():
    """set_stance("fail_on_recompile") between watch() and the end of the first step: theirs stays."""
    net = FnNet()
    with deadwatch.watch(net, reporters=[]) as monitor:
        torch.compiler.set_stance("fail_on_recompile")
        net(torch.randn(2, 4))
        monitor.step()
        assert stance() == "fail_on_recompile"
    assert stance() == "fail_on_recompile"


# ---- monitors never closed ---------------------------------------------------------------------------

def _abandon(raise_in_forward: bool):
    """watch() then a failing (or not) first forward, no `with`, no close(): the monitor is dropped."""
    net = FnNet()
    monitor = deadwatch.watch(net, reporters=[])
    try:
        net(torch.randn(2, 3) if raise_in_forward else torch.randn(2, 4))   # (2, 3): a shape error
    except RuntimeError:
        pass
    return weakref.ref(net), weakref.ref(monitor)


def test_an_abandoned_monitor_is_cleaned_up_when_collected():
    net, monitor = _abandon(raise_in_forward=True)
    gc.collect()
    assert monitor() is None and net() is None
    assert stance() == "default", "force_eager left on for the whole process"
    assert active_function_patches() == 0 and F.relu is getattr(F.relu, "__deadwatch_original__", F.relu)


def test_an_abandoned_monitor_of_a_model_still_in_use_removes_its_hooks():
    net = FnNet()
    deadwatch.watch(net, reporters=[])   # dropped at once
    gc.collect()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == 0
    assert stance() == "default" and active_function_patches() == 0
    with deadwatch.watch(net, reporters=[]):  # the model is free to be watched again
        pass


def test_unclosed_monitors_free_their_models():
    refs = []
    for _ in range(3):
        net = FnNet()
        monitor = deadwatch.watch(net, reporters=[])
        net(torch.randn(2, 4)).sum().backward()
        monitor.step()
        refs.append((weakref.ref(net), weakref.ref(monitor)))
    del net, monitor
    gc.collect()
    assert [(n() is None, m() is None) for n, m in refs] == [(True, True)] * 3
    assert active_function_patches() == 0
    assert not hasattr(F.relu, "__deadwatch_original__")


def test_an_open_monitor_keeps_the_patch_and_its_model():
    net = FnNet()
    monitor = deadwatch.watch(net, reporters=[])
    gc.collect()
    assert active_function_patches() > 0 and hasattr(F.relu, "__deadwatch_original__")
    monitor.close()
    assert active_function_patches() == 0


# ---- threads ----------------------------------------------------------------------------------------

class Held(torch.Tensor):
    """A tensor whose torch functions wait for an event: another thread's F.relu call held half-way."""

    entered = threading.Event()
    release = threading.Event()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.entered.set()
        cls.release.wait(10)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_another_threads_activation_call_never_hides_a_watched_one():
    """Thread B is inside F.relu (the patch's wrapper) while the watched forward calls F.relu here: the
    "F.relu calls torch.relu, count the outer call only" bookkeeping is per thread, so it counts."""
    net = FnNet()
    held = torch.randn(3).as_subclass(Held)
    with deadwatch.watch(net, reporters=[], count_subsample=1) as monitor:
        other = threading.Thread(target=lambda: F.relu(held))  # F.relu looked up now: the wrapper
        other.start()
        assert Held.entered.wait(10)
        try:
            net(torch.randn(5, 4))
            monitor.step()
        finally:
            Held.release.set()
            other.join(10)
        report = monitor.report()
    assert [layer.name for layer in report.layers] == ["relu#0"]
    assert report.layer("relu#0").observations == 5


# ---- the compiler reads torch's own functions ----------------------------------------------------------

def test_a_model_compiled_after_a_monitor_closed_still_compiles_fullgraph():
    """torch._dynamo first imported while the wrappers were installed read them for torch.relu: a model
    compiled later (nn.ReLU -> F.relu -> torch.relu) failed under fullgraph. Needs a fresh process."""
    code = """
import torch, deadwatch
from torch import nn
a = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
with deadwatch.watch(a, reporters=[]) as m:
    a(torch.randn(2, 8)); m.step()
net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1))
with deadwatch.watch(net, reporters=[], count_subsample=1) as monitor:
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        compiled(torch.randn(16, 8)).sum().backward(); monitor.step()
    print("observations", monitor.report().layer("1").observations)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "observations 48" in done.stdout, done.stderr[-3000:]


def test_a_capture_collected_without_detach_lets_go_of_the_patch():
    """The patch holds captures weakly: one dropped without detach() (no monitor to close it) frees its
    model, and the originals go back when it was the last."""
    from deadwatch import stats
    from deadwatch.capture import Capture
    from deadwatch.config import load

    net = FnNet()
    capture = Capture(net, load(reporters=[]), stats.Registry(), lambda: 0)
    PATCH.attach(capture)
    assert active_function_patches() > 0
    ref = weakref.ref(net)
    del net, capture
    gc.collect()
    assert ref() is None
    assert active_function_patches() == 0 and not hasattr(F.relu, "__deadwatch_original__")
