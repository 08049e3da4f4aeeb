"""The fused statistics pass (deadwatch/fused.py, fold.cpp) against record()'s eager ops: the same state.

Both routes fold the same outputs into two copies of a site; every step buffer is compared before each fold
(the max, the fired and near-a-bound counts to the bit, NaN included; |output| sums to float32 rounding:
the eager ops sum large calls in float32, the kernel in double) and the observations exactly.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import pytest
import torch
from torch import nn

import deadwatch
from deadwatch import fused, stats

pytestmark = pytest.mark.skipif(fused.compiler() is None, reason="no C++ compiler: the fused pass is off")


@pytest.fixture(scope="module")
def kernel():
    fused.KERNEL.start()
    deadline = time.monotonic() + 300
    while fused.KERNEL.fn is None and not fused.KERNEL.failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fused.KERNEL.fn is not None, "the kernel did not build"
    return fused.KERNEL


# kind, threshold, nonnegative, bounds, how to draw values around its limits
KINDS = {
    "relu": (0.0, True, None, lambda g, s: torch.randn(s, generator=g).clamp_(min=0)),
    "gelu": (0.0, False, None, lambda g, s: torch.randn(s, generator=g)),
    "softplus": (math.log(2.0), False, None, lambda g, s: torch.rand(s, generator=g) * 1.4),
    "hardsigmoid": (0.5, False, (0.0, 1.0), lambda g, s: torch.rand(s, generator=g) * 1.04 - 0.02),
    "tanh": (0.0, False, (-1.0, 1.0), lambda g, s: torch.rand(s, generator=g) * 2.04 - 1.02),
    "relu6": (0.0, True, (0.0, 6.0), lambda g, s: (torch.rand(s, generator=g) * 6.4 - 0.2).clamp_(0, 6)),
}
# shape, unit axis, memory format
LAYOUTS = [
    ((16, 8, 5, 5), 1, "contiguous"),
    ((16, 8, 5, 5), 1, "channels_last"),
    ((13, 6, 1, 1), 1, "contiguous"),
    ((16, 7, 12), 2, "contiguous"),
    ((12, 40), 1, "contiguous"),
    ((16, 9, 3), 1, "contiguous"),
    ((6, 70), 1, "contiguous"),           # units innermost: blocks of 16 or 32 units, and some left over
    ((8, 40, 3, 3), 1, "channels_last"),
    ((4, 5, 72), 2, "contiguous"),
]


def _site(kind: str, subsample: int, use_fused: bool, out: torch.Tensor, axis: int) -> tuple[stats.Registry, stats.Site]:
    threshold, nonnegative, bounds, _ = KINDS[kind]
    registry = stats.Registry()
    site = stats.Site(kind, kind, threshold, nonnegative, 0, subsample, bounds, 0.01, fused=use_fused)
    registry.add(site, out, axis)
    return registry, site


def _draw(kind: str, shape: tuple[int, ...], fmt: str, dtype: torch.dtype, g: torch.Generator, special: bool) -> torch.Tensor:
    x = KINDS[kind][3](g, shape)
    threshold, _, bounds, _ = KINDS[kind]
    flat = x.view(-1)
    picks = torch.randint(0, flat.numel(), (12,), generator=g)
    edges = [threshold] + ([bounds[0], bounds[1], bounds[0] + 0.01 * (bounds[1] - bounds[0]),
                            bounds[1] - 0.01 * (bounds[1] - bounds[0])] if bounds else [])
    for i, p in enumerate(picks.tolist()):
        flat[p] = edges[i % len(edges)]  # values exactly at the limits, as the dtype holds them
    if special:
        flat[int(picks[0])] = float("nan")
        flat[int(picks[1])] = float("inf")
        if not KINDS[kind][1]:  # an output that is never negative (ReLU) never holds -inf
            flat[int(picks[2])] = float("-inf")
    x = x.to(dtype)
    return x.to(memory_format=torch.channels_last) if fmt == "channels_last" else x


def _states(kind, layout, dtype, subsample, masked, special, calls, seed=0):
    """Run the same calls through an eager and a fused site; the state of each before every fold."""
    shape, axis, fmt = layout
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(3):
        step = []
        for _ in range(calls):
            out = _draw(kind, shape, fmt, dtype, g, special)
            mask = None
            if masked:
                mask = torch.rand(tuple(s for d, s in enumerate(shape) if d != axis), generator=g) > 0.3
            step.append((out, mask))
        steps.append(step)
    runs = []
    for use_fused in (False, True):
        registry, site = _site(kind, subsample, use_fused, steps[0][0][0], axis)
        taken = []
        states = []
        for n, step in enumerate(steps):
            for out, mask in step:
                before = site.seen
                stats.record(site, out, mask)
                taken.append(site.seen != before or use_fused)
            states.append({"max": site.step_max.clone(), "fired": site.step_fired.clone(), "abs": site.step_abs.clone(),
                           "near": site.step_near.clone(), "observations": int(site.step_observations)})
            registry.fold(n + 1)
        runs.append(states)
    return runs


def _assert_same(eager, fused_states):
    for a, b in zip(eager, fused_states):
        torch.testing.assert_close(b["max"], a["max"], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(b["fired"], a["fired"], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(b["near"], a["near"], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(b["abs"], a["abs"], rtol=2e-6, atol=1e-9, equal_nan=True)
        assert b["observations"] == a["observations"]


def _count_fused(monkeypatch) -> list[bool]:
    answers: list[bool] = []
    real = fused.fold

    def counted(site, out, mask):
        answers.append(real(site, out, mask))
        return answers[-1]

    monkeypatch.setattr(fused, "fold", counted)
    return answers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay[0]}-axis{lay[1]}-{lay[2]}")
@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_and_eager_give_the_same_state(kernel, monkeypatch, kind, layout, dtype):
    answers = _count_fused(monkeypatch)
    eager, fused_states = _states(kind, layout, dtype, subsample=8, masked=False, special=False, calls=1)
    assert answers and all(answers), "the fused pass did not run"
    _assert_same(eager, fused_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["relu", "hardsigmoid", "gelu"])
@pytest.mark.parametrize("masked,special,calls,subsample", [
    (True, False, 1, 8), (False, True, 1, 8), (True, True, 2, 1), (False, False, 3, 4)],
    ids=["mask", "nan-inf", "mask-nan-twice", "three-calls"])
def test_masks_nan_and_several_calls_per_step(kernel, monkeypatch, kind, dtype, masked, special, calls, subsample):
    answers = _count_fused(monkeypatch)
    for layout in LAYOUTS:
        eager, fused_states = _states(kind, layout, dtype, subsample, masked, special, calls, seed=calls)
        _assert_same(eager, fused_states)
    assert answers and all(answers)


def test_a_watched_model_gives_the_same_report_with_and_without_it(kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Hardsigmoid(), nn.Flatten(),
                          nn.Linear(6 * 3 * 3, 10), nn.GELU())
    with torch.no_grad():
        model[0].bias[2] = -1e4
    twin = nn.Sequential(*[m for m in model])  # the same modules: the same weights
    xs = [torch.randn(16, 3, 7, 7) for _ in range(4)]
    reports = []
    for m, on in ((model, True), (twin, False)):
        mon = deadwatch.watch(m, reporters=[], fused=on)
        for x in xs:
            m(x).sum().backward()
            mon.step()
        reports.append(mon.report())
        mon.close()
    for a, b in zip(*(r.layers for r in reports)):
        assert (a.name, a.dead_units, a.observations, a.zero_fraction, a.saturated_units, a.rare_units) == \
            (b.name, b.dead_units, b.observations, b.zero_fraction, b.saturated_units, b.rare_units)
        assert a.dormant_units == b.dormant_units
    assert reports[0].layer("1").dead_units == [2]


# ---- where it is not used ----------------------------------------------------------------------

def _one(kind, out, axis, subsample=8):
    registry, site = _site(kind, subsample, True, out, axis)
    return fused.fold(site, out, None)


def test_fused_false_never_calls_it(kernel, monkeypatch):
    answers = _count_fused(monkeypatch)
    _states("relu", LAYOUTS[0], torch.float32, 8, False, False, 1)  # the eager run has fused=False
    assert len(answers) == 3  # only the fused run's calls


def test_outputs_it_leaves_to_the_eager_ops(kernel, monkeypatch):
    x = torch.randn(16, 8, 5, 5)
    assert _one("gelu", x, 1)
    assert not _one("gelu", x.half(), 1)                         # float16
    assert not _one("gelu", x.transpose(2, 3)[:, :, :3], 1)      # no (lead, units, trail) view
    assert not _one("gelu", torch.randn(8, 16, 5), 0)            # units first
    assert not _one("gelu", torch.randn(0, 8, 5, 5), 1)          # empty
    registry, site = _site("gelu", 8, True, x, 1)
    assert not fused.fold(site, x.double(), None)                # another dtype than the site's buffers

    class Wrapped(torch.Tensor):  # a tensor subclass (fake, distributed tensors): its storage is not its values
        pass

    assert not fused.fold(site, x.as_subclass(Wrapped), None)
    assert not fused.fold(site, torch.empty(16, 8, 5, 5, device="meta"), None)  # not on the CPU
    assert not fused.fold(site, x.to_sparse(), None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not _one("gelu", torch.randn(16, 8, 32, 32), 1)       # large, and torch has threads to split it
    assert _one("gelu", x, 1)                                    # small: one thread is enough


def test_a_failed_build_warns_once_and_the_eager_ops_count(tmp_path, monkeypatch):
    broken = tmp_path / "fold.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(fused, "SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    k = fused.Kernel()
    with pytest.warns(RuntimeWarning, match="fused statistics pass is off") as caught:
        k.build(k.target())
    assert len([w for w in caught if "fused" in str(w.message)]) == 1
    assert k.fn is None and k.failed


def test_no_compiler_means_the_eager_ops_silently(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    k = fused.Kernel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k.start()
        time.sleep(1.0)  # no build starts: nothing to fail later on a thread either
    assert k.fn is None and not k.failed and not caught


def test_the_build_is_cached_and_the_training_thread_never_waits(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    k = fused.Kernel()
    started = time.perf_counter()
    k.start()
    assert time.perf_counter() - started < 0.5 and k.fn is None  # building on its thread
    deadline = time.monotonic() + 300
    while k.fn is None and not k.failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert k.fn is not None and list(tmp_path.glob("deadwatch/fold-*.so"))
    assert not [p for p in (tmp_path / "deadwatch").iterdir() if not p.name.startswith("fold-")]  # no temp left
    again = fused.Kernel()
    again.start()
    assert again.fn is not None  # from the cache, at once


def test_a_build_under_way_elsewhere_is_waited_for_and_a_stale_one_is_taken_over(kernel, tmp_path, monkeypatch):
    built = kernel.target().read_bytes()
    monkeypatch.setattr(fused, "LOCKED", 20)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    k = fused.Kernel()
    target = k.target()
    target.parent.mkdir(parents=True)
    lock = target.with_suffix(".lock")
    lock.touch()  # another process is building

    def other_builder():
        time.sleep(0.5)
        target.write_bytes(built)
        lock.unlink()

    import threading
    threading.Thread(target=other_builder).start()
    monkeypatch.setattr(fused.subprocess, "run", lambda *a, **k: pytest.fail("built twice"))
    k.build(target)
    assert k.fn is not None and not lock.exists()
    monkeypatch.undo()
    monkeypatch.setattr(fused, "LOCKED", 20)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "stale"))
    k = fused.Kernel()
    target = k.target()
    target.parent.mkdir(parents=True)
    target.with_suffix(".lock").touch()
    os.utime(target.with_suffix(".lock"), (time.time() - 2 * fused.LOCKED,) * 2)  # its builder died long ago
    k.build(target)
    assert k.fn is not None and target.exists() and not target.with_suffix(".lock").exists()


def test_a_mask_of_another_shape_is_ignored_as_the_eager_ops_ignore_it(kernel, monkeypatch):
    answers = _count_fused(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, 5, 5, generator=g)
    wrong = torch.rand(16, 5, generator=g) > 0.5  # the mask of another output
    states = []
    for use_fused in (False, True):
        registry, site = _site("gelu", 8, use_fused, x, 1)
        stats.record(site, x, wrong)
        states.append({"max": site.step_max.clone(), "fired": site.step_fired.clone(), "abs": site.step_abs.clone(),
                       "near": site.step_near.clone(), "observations": int(site.step_observations)})
    _assert_same(*([s] for s in states))
    assert answers == [True]
