"""Stats: per-unit counters on the activation's device, updated with tensor ops only.

Every site's counters are views into a few flat buffers per device, so folding a
training step and taking a report cost a handful of ops however many sites
there are. The hook path (record) never reads a value on the host; snapshot()
is the one place counters leave the device: one buffer, one collective, one copy.

Buffers are grouped by device and by the dtype the site's output had when first seen, so a
float64 site keeps its full range and a bf16 site compares in bf16, as its counts do.

Per unit:  step_max (site dtype) the largest output this step (the dtype's lowest value when it did not run)
           step_fired (int32)  values > threshold this step
           fired (int64)       values > threshold this interval
           last_fired (int32)  last step in which the unit fired, -1 for never
           last_nonfinite (int32)  last step with a NaN/inf output, -1 for never
           threshold (site dtype) the activation's value at pre-activation 0
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .capture import Site



def record(site: Site, out: torch.Tensor) -> None:
    """Fold one activation output into its site's counters for the current step."""
    x = out.detach()
    if x.ndim != site.ndim or x.shape[site.axis] != site.units:
        from .capture import warn_once
        warn_once(site, f"output shape {tuple(x.shape)} does not have its {site.units} units on dim {site.axis}; call skipped")
        return
    torch.maximum(site.step_max, torch.amax(x, site.dims), out=site.step_max)
    site.step_fired.add_(torch.sum(x > site.threshold, site.dims, dtype=torch.int32))
    site.step_observations += x.numel() // site.units


class Counters:
    """Flat per-unit buffers for every site on one device whose outputs have one dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.lowest = torch.finfo(dtype).min
        self.sites: list[Site] = []
        empty = {"device": device}
        self.step_max = torch.empty(0, dtype=dtype, **empty)
        self.step_fired = torch.empty(0, dtype=torch.int32, **empty)
        self.fired = torch.empty(0, dtype=torch.int64, **empty)
        self.last_fired = torch.empty(0, dtype=torch.int32, **empty)
        self.last_nonfinite = torch.empty(0, dtype=torch.int32, **empty)
        self.threshold = torch.empty(0, dtype=dtype, **empty)

    @property
    def units(self) -> int:
        return self.step_max.numel()

    def add(self, site: Site, units: int) -> None:
        site.offset = self.units
        site.counters = self
        grow = {"size": (units,), "device": self.device}
        self.step_max = torch.cat([self.step_max, torch.full(fill_value=self.lowest, dtype=self.dtype, **grow)])
        self.step_fired = torch.cat([self.step_fired, torch.zeros(dtype=torch.int32, **grow)])
        self.fired = torch.cat([self.fired, torch.zeros(dtype=torch.int64, **grow)])
        self.last_fired = torch.cat([self.last_fired, torch.full(fill_value=-1, dtype=torch.int32, **grow)])
        self.last_nonfinite = torch.cat([self.last_nonfinite, torch.full(fill_value=-1, dtype=torch.int32, **grow)])
        self.threshold = torch.cat([self.threshold, torch.full(fill_value=site.threshold, dtype=self.dtype, **grow)])
        self.sites.append(site)
        for s in self.sites:  # the buffers are new: point every site at them again
            s.step_max = self.step_max[s.offset:s.offset + s.units]
            s.step_fired = self.step_fired[s.offset:s.offset + s.units]

    def fold(self, step: int) -> None:
        """Close training step `step`: a unit whose step max is NaN/inf does not fire in it."""
        bad = ~torch.isfinite(self.step_max)
        fired = (self.step_max > self.threshold) & ~bad
        self.last_fired.masked_fill_(fired, step)
        self.last_nonfinite.masked_fill_(bad, step)
        self.fired += self.step_fired.masked_fill_(bad, 0)
        self.step_fired.zero_()
        self.step_max.fill_(self.lowest)


class Registry:
    """All sites' counters, one Counters per (device, dtype)."""

    def __init__(self) -> None:
        self.by_device: dict[tuple[torch.device, torch.dtype], Counters] = {}
        self.sites: list[Site] = []
        self.reset_pending = False

    def add(self, site: Site, out: torch.Tensor, axis: int) -> None:
        site.ndim = out.ndim
        site.axis = axis
        site.units = out.shape[axis]
        site.dims = tuple(d for d in range(out.ndim) if d != axis)
        key = (out.device, out.dtype)
        counters = self.by_device.get(key)
        if counters is None:
            counters = self.by_device[key] = Counters(out.device, out.dtype)
        counters.add(site, site.units)
        self.sites.append(site)

    def fold(self, step: int) -> None:
        for counters in self.by_device.values():
            if self.reset_pending:
                counters.fired.zero_()
            counters.fold(step)
        for site in self.sites:
            site.observations = site.step_observations + (0 if self.reset_pending else site.observations)
            site.step_observations = 0
        self.reset_pending = False

    def reset_interval(self) -> None:
        """Start a new interval with the next step; until then reports still show the last one."""
        self.reset_pending = True

    def snapshot(self, steps: int, window: int) -> dict[int, dict[str, np.ndarray | int]]:
        """Host copy of every site's figures over the window / interval, merged across ranks.

        Returns {id(site): {"alive", "nonfinite", "fired": per-unit arrays, "observations": int}}.
        Everything is packed into one int64 buffer: one all_reduce (SUM) and one device->host copy.
        """
        start = max(steps - window, 0)
        parts = []
        for counters in self.by_device.values():
            parts += [(counters.last_fired >= start).long(), (counters.last_nonfinite >= start).long(), counters.fired]
        device = _collective_device()
        obs = torch.tensor([s.observations for c in self.by_device.values() for s in c.sites], dtype=torch.int64)
        flat = torch.cat([p.to(device) for p in parts] + [obs.to(device)]) if parts else obs.to(device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        host = flat.cpu().numpy()
        result, pos, obs_pos = {}, 0, host.size - obs.numel()
        for counters in self.by_device.values():
            n = counters.units
            alive, nonfinite, fired = host[pos:pos + n], host[pos + n:pos + 2 * n], host[pos + 2 * n:pos + 3 * n]
            pos += 3 * n
            for site in counters.sites:
                sl = slice(site.offset, site.offset + site.units)
                result[id(site)] = {"alive": alive[sl] > 0, "nonfinite": nonfinite[sl] > 0,
                                    "fired": fired[sl], "observations": int(host[obs_pos])}
                obs_pos += 1
        return result


def _collective_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
