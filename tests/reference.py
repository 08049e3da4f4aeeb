"""Brute-force reference figures for the deadwatch tests.

Nothing here imports deadwatch's internals: plain forward hooks copy the
tensors that hold each site's values to the host (as float64 numpy arrays),
and numpy loops do the counting, step by step and unit by unit, straight from
the definitions:

* a value *fires* when it is > the site's threshold (the activation's value at
  0; 0 when the probed tensor is the pre-activation);
* a unit-step (all values of one unit in one training step) whose max is NaN or
  +-inf does not fire in that step, and none of its values count as fired;
* a unit is *dead* when it fired in none of the last `window` completed steps
  (in none of them when fewer were seen); nothing is judged before the site
  has run in a completed step;
* zero_fraction is the mean over units of the fraction of observed values
  (in the report interval) that did not fire;
* status: nonfinite when a NaN/inf was seen in the window, else critical from
  `critical`, warn from `warn`, ok below.

The only deadwatch API used is `deadwatch.watch` in `run_watch`, the driver
that runs the same forwards under the monitor.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn


# ---- what to run -----------------------------------------------------------------------------

@dataclass
class Fwd:
    """One forward pass: model(*args, **kwargs), in train mode (counted) or eval mode (under no_grad)."""

    args: tuple
    train: bool = True
    kwargs: dict = field(default_factory=dict)


def as_fwds(step: Any) -> list[Fwd]:
    """A step is a tensor, a Fwd, or a list of them (several forwards before step())."""
    items = step if isinstance(step, list) else [step]
    out = []
    for item in items:
        if isinstance(item, Fwd):
            out.append(item)
        elif isinstance(item, tuple):
            out.append(Fwd(item))
        else:
            out.append(Fwd((item,)))
    return out


# ---- where to read a site's values ------------------------------------------------------------

@dataclass
class Probe:
    """One site: the output of `module` at its `call`-th call within one forward of the model.

    `axis` is the unit axis of that output. Post-activation probes (hook on the activation
    module) use the activation's value at 0 as `threshold`; pre-activation probes (hook on the
    Linear/Conv feeding an activation function) use threshold 0.
    """

    module: nn.Module
    call: int = 0
    axis: int = 1
    threshold: float = 0.0


# ---- the reference figures --------------------------------------------------------------------

@dataclass
class RefSite:
    name: str
    units: int
    ran: np.ndarray          # (S,) bool: the site ran in a counted forward in step s
    fired: np.ndarray        # (S, U) bool: unit fired in step s
    counts: np.ndarray       # (S, U) int: values that fired in step s (0 for a nonfinite unit-step)
    nonfinite: np.ndarray    # (S, U) bool: the unit-step's max was NaN/inf
    obs: np.ndarray          # (S,) int: values per unit seen in step s
    first_seen: int = 0      # global order of the site's first counted call

    def _window(self, window: int, steps: int | None) -> tuple[int, int]:
        steps = len(self.ran) if steps is None else steps
        return max(steps - window, 0), steps

    def judged(self, steps: int | None = None) -> bool:
        steps = len(self.ran) if steps is None else steps
        return bool(self.ran[:steps].any())

    def dead(self, window: int, steps: int | None = None) -> list[int]:
        start, end = self._window(window, steps)
        if not self.judged(end):
            return []
        dead = []
        for u in range(self.units):
            if not any(self.fired[s, u] for s in range(start, end)):
                dead.append(u)
        return dead

    def nonfinite_in_window(self, window: int, steps: int | None = None) -> bool:
        start, end = self._window(window, steps)
        return self.judged(end) and bool(self.nonfinite[start:end].any())

    def interval_counts(self, start: int = 0, end: int | None = None) -> tuple[np.ndarray, int]:
        end = len(self.ran) if end is None else end
        return self.counts[start:end].sum(axis=0), int(self.obs[start:end].sum())

    def firing_rate(self, start: int = 0, end: int | None = None) -> np.ndarray | None:
        counts, obs = self.interval_counts(start, end)
        if obs == 0:
            return None
        return np.array([counts[u] / obs for u in range(self.units)])

    def zero_fraction(self, start: int = 0, end: int | None = None) -> float | None:
        counts, obs = self.interval_counts(start, end)
        if obs == 0:
            return None
        return sum(1.0 - counts[u] / obs for u in range(self.units)) / self.units

    def status(self, window: int, steps: int | None = None, warn: float = 0.01, critical: float = 0.10) -> str:
        if self.nonfinite_in_window(window, steps):
            return "nonfinite"
        frac = len(self.dead(window, steps)) / self.units
        if frac >= critical:
            return "critical"
        if frac >= warn:
            return "warn"
        return "ok"


def reference(model: nn.Module, steps: Sequence[Any], probes: dict[str, Probe],
              count_eval: bool = False) -> dict[str, RefSite]:
    """Run `steps` through `model` (each forward under no_grad, no backward, no optimiser) and
    count every probe's values. The model is left in train mode.

    Forwards run in eval mode (Fwd(train=False)) count only with count_eval.
    """
    by_module: dict[int, list[tuple[str, Probe]]] = {}
    for name, probe in probes.items():
        by_module.setdefault(id(probe.module), []).append((name, probe))
    calls: dict[int, int] = {}
    current: dict[str, list[np.ndarray]] = {name: [] for name in probes}
    first_seen: dict[str, int] = {}
    state = {"counting": False, "clock": 0}

    def make_hook(mid: int) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            k = calls.get(mid, 0)
            calls[mid] = k + 1
            if not state["counting"]:
                return
            t = out[0] if isinstance(out, (tuple, list)) else out
            for name, probe in by_module[mid]:
                if probe.call != k:
                    continue
                a = t.detach().to(torch.float64).cpu().numpy()
                a = np.moveaxis(a, probe.axis, 0)
                current[name].append(a.reshape(a.shape[0], -1).copy())
                if name not in first_seen:
                    first_seen[name] = state["clock"]
                    state["clock"] += 1
        return hook

    handles = []
    seen_modules = {}
    for name, probe in probes.items():
        if id(probe.module) not in seen_modules:
            seen_modules[id(probe.module)] = probe.module
            handles.append(probe.module.register_forward_hook(make_hook(id(probe.module))))

    per_step: list[dict[str, list[np.ndarray]]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in steps:
                for fwd in as_fwds(step):
                    calls.clear()
                    model.train(fwd.train)
                    state["counting"] = fwd.train or count_eval
                    with torch.no_grad():
                        model(*fwd.args, **fwd.kwargs)
                per_step.append({name: current[name][:] for name in probes})
                for name in probes:
                    current[name].clear()
    finally:
        for h in handles:
            h.remove()
        model.train()

    result = {}
    S = len(per_step)
    for name, probe in probes.items():
        arrays = [a for st in per_step for a in st[name]]
        if not arrays:
            result[name] = RefSite(name, 0, np.zeros(S, bool), np.zeros((S, 0), bool), np.zeros((S, 0), np.int64),
                                   np.zeros((S, 0), bool), np.zeros(S, np.int64), first_seen=10**9)
            continue
        U = arrays[0].shape[0]
        ran = np.zeros(S, bool)
        fired = np.zeros((S, U), bool)
        counts = np.zeros((S, U), np.int64)
        nonfinite = np.zeros((S, U), bool)
        obs = np.zeros(S, np.int64)
        for s, st in enumerate(per_step):
            if not st[name]:
                continue
            ran[s] = True
            values = np.concatenate(st[name], axis=1)
            obs[s] = values.shape[1]
            for u in range(U):
                row = values[u]
                m = np.max(row)                  # NaN propagates
                if not math.isfinite(m):
                    nonfinite[s, u] = True
                    continue
                n = int(np.sum(row > probe.threshold))
                counts[s, u] = n
                fired[s, u] = n > 0
        result[name] = RefSite(name, U, ran, fired, counts, nonfinite, obs, first_seen=first_seen[name])
    return result


# ---- the same forwards under deadwatch --------------------------------------------------------

def default_loss(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        t = out
    elif isinstance(out, (tuple, list)):
        t = out[0]
    else:  # a Hugging Face ModelOutput
        t = out[0]
    return t.float().sum() if t.requires_grad else None


def run_watch(model: nn.Module, steps: Sequence[Any], *, loss: Callable = default_loss,
              every_step: bool = False, **overrides: Any) -> Any:
    """Run `steps` under deadwatch.watch(model, **overrides): train forwards with backward
    (no optimiser step, so the weights stay put), eval forwards under no_grad, monitor.step()
    after each step. Returns the last report (or the report after every step)."""
    import deadwatch

    overrides.setdefault("reporters", [])
    overrides.setdefault("report_every", 10**6)
    reports = []
    with deadwatch.watch(model, **overrides) as monitor:
        for step in steps:
            for fwd in as_fwds(step):
                model.train(fwd.train)
                if fwd.train:
                    value = loss(model(*fwd.args, **fwd.kwargs))
                    if value is not None:
                        value.backward()
                else:
                    with torch.no_grad():
                        model(*fwd.args, **fwd.kwargs)
            model.train()
            monitor.step()
            if every_step:
                reports.append(monitor.report())
        report = monitor.report()
    model.zero_grad(set_to_none=True)
    return reports if every_step else report


# ---- comparison -------------------------------------------------------------------------------

def check_layer(layer: Any, ref: RefSite, window: int, steps: int | None = None,
                interval: tuple[int, int | None] = (0, None), warn: float = 0.01, critical: float = 0.10) -> None:
    where = f"site {ref.name!r}"
    assert layer.name == ref.name
    assert layer.units == ref.units, where
    dead = ref.dead(window, steps)
    assert layer.dead_units == dead, where
    assert layer.dead_fraction == pytest.approx(len(dead) / ref.units, abs=1e-12), where
    counts, obs = ref.interval_counts(*interval)
    assert layer.observations == obs, where
    zf = ref.zero_fraction(*interval)
    if zf is None:
        assert layer.zero_fraction is None, where
    else:
        assert layer.zero_fraction is not None, where
        assert layer.zero_fraction == pytest.approx(zf, abs=1e-9), where
        assert np.allclose(np.asarray(layer.firing_rate, dtype=np.float64), ref.firing_rate(*interval), atol=1e-9), where
    assert layer.status == ref.status(window, steps, warn, critical), where


def check_report(report: Any, refs: dict[str, RefSite], window: int, steps: int | None = None,
                 interval: tuple[int, int | None] = (0, None), warn: float = 0.01, critical: float = 0.10) -> None:
    """Every site of the report against the reference, in the order the sites first ran."""
    expected = [name for name, ref in sorted(refs.items(), key=lambda kv: kv[1].first_seen)]
    assert [layer.name for layer in report.layers] == expected
    for layer in report.layers:
        check_layer(layer, refs[layer.name], window, steps, interval, warn, critical)


def compare(model: nn.Module, steps: Sequence[Any], probes_of: Callable[[nn.Module], dict[str, Probe]],
            window: int = 3, count_eval: bool = False, **overrides: Any) -> tuple[Any, dict[str, RefSite]]:
    """Reference on a deep copy of the model (same state: BatchNorm statistics evolve alike), then
    deadwatch on the model itself; check the final report against the reference."""
    twin = copy.deepcopy(model)
    refs = reference(twin, steps, probes_of(twin), count_eval=count_eval)
    report = run_watch(model, steps, window=window, count_eval=count_eval, **overrides)
    check_report(report, refs, window)
    return report, refs


def plant_dead(bias: torch.Tensor, units: Sequence[int]) -> None:
    """Kill `units` exactly: a bias of -1e4 keeps the pre-activation far below 0."""
    with torch.no_grad():
        bias[list(units)] = -1e4
