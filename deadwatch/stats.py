"""Stats: per-unit counters on the activation's device, updated with tensor ops only.

Every site's counters are views into a few flat buffers per device, so folding a
training step and taking a report cost a handful of ops however many sites
there are. The hook path (record) never reads a value on the host; snapshot()
is the one place counters leave the device: a single CPU process reads them in
place; otherwise one packed buffer, one data all_reduce (after a 2-number layout
check under torch.distributed) and one device->host copy.

Buffers are grouped by device and by the dtype the site's output had when first seen, so a
float64 site keeps its full range and a bf16 site compares in bf16, as its counts do.

Per unit:  step_max (site dtype) the largest output this step (the dtype's lowest value when it did not run)
           step_fired (float64)  values > threshold this step (whole numbers: exact below 2**53)
           fired (float64)     values > threshold this interval
           last_fired (int32)  last step in which the unit fired, -1 for never
           last_nonfinite (int32)  last step with a NaN/inf output, -1 for never
           threshold (site dtype) the activation's value at pre-activation 0
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .errors import DeadwatchError

if TYPE_CHECKING:
    from .capture import Site

EXACT_FLOAT32 = 1 << 24  # a float32 sum of 0/1 values is exact below this many values


def record(site: Site, out: torch.Tensor) -> None:
    """Fold one activation output into its site's counters for the current step.

    One pass over the whole output, its per-unit max: exact "fired at all" and NaN/inf. The
    fired count (for zero_fraction) comes from the first 1/count_subsample of the batch: the
    sign of (output - threshold), summed (sign, not a bool `>`: summing float 0/1 is several
    times faster than summing bools). Each extra pass over a large activation costs memory
    bandwidth, which is what the training step is made of.
    """
    x = out.detach()
    if x.ndim != site.ndim or x.shape[site.axis] != site.units:
        from .capture import warn_once
        warn_once(site, f"output shape {tuple(x.shape)} does not have its {site.units} units on dim {site.axis}; call skipped")
        return
    # The first call of a step writes its reductions straight into the site's buffers (fewer ops:
    # each small op costs microseconds, most of all right after a large matmul); later calls in
    # the same step (a reused module, gradient accumulation) fold into them.
    first = site.seen != site.counters.fold_count and x.dtype == site.step_max.dtype
    site.seen = site.counters.fold_count
    if first:
        torch.amax(x, site.dims, out=site.step_max)
    else:
        torch.maximum(site.step_max, torch.amax(x, site.dims), out=site.step_max)
    if site.subsample > 1:
        batch = site.dims[0]
        x = x.narrow(batch, 0, -(-x.shape[batch] // site.subsample))
    n = x.numel() // site.units
    if site.nonnegative:  # ReLU-like: output >= 0, so sign(output) is 1 exactly where it fired
        fired = torch.sign(x)
    else:
        fired = torch.sign(x - site.threshold if site.threshold else x).clamp_(min=0)
    if first:
        torch.sum(fired, site.dims, dtype=torch.float64, out=site.step_fired)
    else:
        wide = n >= EXACT_FLOAT32 or x.dtype == torch.float64
        site.step_fired.add_(torch.sum(fired, site.dims, dtype=torch.float64 if wide else torch.float32))
    site.step_observations += n


class Counters:
    """Flat per-unit buffers for every site on one device whose outputs have one dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.lowest = torch.finfo(dtype).min
        self.fold_count = 0  # changes at every fold: a site whose `seen` differs has not run this step
        self.sites: list[Site] = []
        empty = {"device": device}
        self.step_max = torch.empty(0, dtype=dtype, **empty)
        self.step_fired = torch.empty(0, dtype=torch.float64, **empty)
        self.fired = torch.empty(0, dtype=torch.float64, **empty)
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
        self.step_fired = torch.cat([self.step_fired, torch.zeros(dtype=torch.float64, **grow)])
        self.fired = torch.cat([self.fired, torch.zeros(dtype=torch.float64, **grow)])
        self.last_fired = torch.cat([self.last_fired, torch.full(fill_value=-1, dtype=torch.int32, **grow)])
        self.last_nonfinite = torch.cat([self.last_nonfinite, torch.full(fill_value=-1, dtype=torch.int32, **grow)])
        self.threshold = torch.cat([self.threshold, torch.full(fill_value=site.threshold, dtype=self.dtype, **grow)])
        self.sites.append(site)
        for s in self.sites:  # the buffers are new: point every site at them again
            s.step_max = self.step_max[s.offset:s.offset + s.units]
            s.step_fired = self.step_fired[s.offset:s.offset + s.units]

    def fold(self, step: int) -> None:
        """Close training step `step`: a unit whose step max is NaN/inf does not fire in it."""
        ok = torch.isfinite(self.step_max)
        self.last_fired.masked_fill_((self.step_max > self.threshold).logical_and_(ok), step)
        bad = ok.logical_not_()
        self.last_nonfinite.masked_fill_(bad, step)
        self.fired += self.step_fired.masked_fill_(bad, 0)
        self.step_fired.zero_()
        self.step_max.fill_(self.lowest)
        self.fold_count += 1


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

    def snapshot(self, layout: list[tuple[str, Site]], steps: int, window: int) -> list[Figures]:
        """Host copy of every site's figures over the window / interval, merged across ranks.

        Under torch.distributed the ranks first agree on the sites (a 2-number MAX all_reduce of a
        fingerprint; on a mismatch, the union of every rank's sites), then all counters go in one
        float64 buffer: one all_reduce (SUM) and one device->host copy. A single CPU process
        reads its buffers in place, with no copy at all.
        """
        distributed = dist.is_available() and dist.is_initialized()
        shapes, same = [(name, site.kind, site.units) for name, site in layout], True
        if distributed:
            shapes, same = agree(shapes)
        start = max(steps - window, 0)
        mine = {name: site for name, site in layout}
        if same:
            host = self._merged(start, steps, distributed)
            return [self._figures(name, mine[name], host) for name, _, _ in shapes]
        return self._union(shapes, mine, start, steps)

    def _merged(self, start: int, steps: int, distributed: bool) -> dict[int, tuple]:
        """{id(site): (alive, nonfinite, fired, observations, judged)} for this rank's sites, merged."""
        groups = list(self.by_device.values())
        if not distributed and all(c.device.type == "cpu" for c in groups):
            out = {}
            for c in groups:
                alive, nonfinite = c.last_fired.numpy() >= start, c.last_nonfinite.numpy() >= start
                for site in c.sites:
                    sl = slice(site.offset, site.offset + site.units)
                    out[id(site)] = (alive[sl], bool(nonfinite[sl].any()), c.fired.numpy()[sl],
                                     site.observations, steps > site.first_step)
            return out
        # One buffer, written in place: per group, alive + base * nonfinite per unit (base is a power
        # of two above the world size, so a SUM over ranks can be taken apart again), then the fired
        # counts; then observations and judged per site.
        base = 1 << (dist.get_world_size() if distributed else 1).bit_length()
        device = _collective_device() if distributed else groups[0].device
        tail = [v for c in groups for site in c.sites for v in (site.observations, int(steps > site.first_step))]
        flat = torch.empty(sum(2 * c.units for c in groups) + len(tail), dtype=torch.float64, device=device)
        pos = 0
        for c in groups:
            code, fired = flat[pos:pos + c.units], flat[pos + c.units:pos + 2 * c.units]
            torch.mul(c.last_nonfinite.to(device) >= start, base, out=code)
            code.add_(c.last_fired.to(device) >= start)
            fired.copy_(c.fired)
            pos += 2 * c.units
        flat[pos:].copy_(torch.tensor(tail, dtype=torch.float64))
        if distributed:
            dist.all_reduce(flat)
        host = flat.cpu().numpy()
        out, pos, t = {}, 0, host.size - len(tail)
        for c in groups:
            code, fired = host[pos:pos + c.units].astype(np.int64), host[pos + c.units:pos + 2 * c.units]
            pos += 2 * c.units
            alive, nonfinite = (code & (base - 1)) > 0, code >= base
            for site in c.sites:
                sl = slice(site.offset, site.offset + site.units)
                out[id(site)] = (alive[sl], bool(nonfinite[sl].any()), fired[sl], int(host[t]), host[t + 1] > 0)
                t += 2
        return out

    @staticmethod
    def _figures(name: str, site: Site, host: dict[int, tuple]) -> Figures:
        return Figures(name, site.kind, *host[id(site)])

    def _union(self, shapes: list[tuple[str, str, int]], mine: dict[str, Site], start: int, steps: int) -> list[Figures]:
        """Ranks saw different sites: pack site by site in the agreed order, zeros for sites not run here."""
        device = _collective_device()
        parts, tail = [], []
        for name, _, units in shapes:
            site = mine.get(name)
            if site is None:
                parts.append(torch.zeros(3 * units, dtype=torch.float64, device=device))
                tail += [0, 0]
                continue
            c, sl = site.counters, slice(site.offset, site.offset + site.units)
            parts += [(c.last_fired[sl] >= start).to(device, torch.float64),
                      (c.last_nonfinite[sl] >= start).to(device, torch.float64), c.fired[sl].to(device)]
            tail += [site.observations, int(steps > site.first_step)]
        flat = torch.cat(parts + [torch.tensor(tail, dtype=torch.float64).to(device)])
        dist.all_reduce(flat)
        host = flat.cpu().numpy()
        figures, pos, t = [], 0, host.size - len(tail)
        for name, kind, units in shapes:
            alive, nonfinite, fired = (host[pos + i * units:pos + (i + 1) * units] for i in range(3))
            pos += 3 * units
            figures.append(Figures(name, kind, alive > 0, bool(nonfinite.any()), fired, int(host[t]), host[t + 1] > 0))
            t += 2
        return figures

    # -- checkpoints
    def state(self, layout: list[tuple[str, Site]]) -> dict[str, dict]:
        out = {}
        for name, site in layout:
            c, sl = site.counters, slice(site.offset, site.offset + site.units)
            out[name] = {"kind": site.kind, "units": site.units, "first_step": site.first_step,
                         "observations": site.observations,
                         "last_fired": c.last_fired[sl].cpu().clone(), "last_nonfinite": c.last_nonfinite[sl].cpu().clone(),
                         "fired": c.fired[sl].cpu().clone()}
        return out

    def restore(self, site: Site, saved: dict) -> None:
        """Put a site's saved counters back (called when the site first runs after load_state_dict)."""
        c, sl = site.counters, slice(site.offset, site.offset + site.units)
        for key in ("last_fired", "last_nonfinite", "fired"):
            getattr(c, key)[sl].copy_(saved[key])
        site.first_step = saved["first_step"]
        site.observations = saved["observations"]


class Figures(NamedTuple):
    """One site's merged figures, on the host."""

    name: str
    kind: str
    alive: np.ndarray       # per unit: fired within the window
    nonfinite: bool         # NaN/inf within the window
    fired: np.ndarray       # per unit: values fired in the interval (whole numbers, float64)
    observations: int       # values per unit in the interval
    judged: bool            # a step that ran the site has been completed


def fingerprint(shapes: list[tuple[str, str, int]]) -> int:
    return int.from_bytes(hashlib.blake2b(repr(shapes).encode(), digest_size=7).digest(), "little")


def agree(shapes: list[tuple[str, str, int]]) -> tuple[list[tuple[str, str, int]], bool]:
    """The sites every rank reports on, and whether every rank had exactly these: this rank's
    when all ranks match, else the union of all ranks' sites."""
    fp = fingerprint(shapes)
    check = torch.tensor([fp, -fp], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if int(check[0]) == -int(check[1]):  # max == min: every rank has the same sites
        return shapes, True
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, shapes)
    union: dict[str, tuple[str, int]] = {}
    for rank, theirs in enumerate(gathered):
        for name, kind, units in theirs:
            if name in union and union[name][1] != units:
                shown = name[2:].replace("|", "#") if name.startswith("m|") else name[2:]
                raise DeadwatchError(f"site {shown!r} has {union[name][1]} units on one rank and {units} on rank {rank}: "
                                     f"the ranks do not run the same model")
            union.setdefault(name, (kind, units))
    return [(name, kind, units) for name, (kind, units) in union.items()], False


def _collective_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
