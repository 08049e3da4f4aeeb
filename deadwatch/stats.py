"""Stats: per-unit counters on the activation's device, updated with tensor ops only.

Every site's counters are views into a few flat buffers per device, so folding a
training step costs a handful of ops however many sites there are. The hook path
(record) never reads a value on the host. Taking the counters off the device, and
merging them across ranks, is sync.py's job.

Buffers are grouped by device and by the dtype the site's output had when first seen, so a
float64 site keeps its full range and a bf16 site compares in bf16, as its counts do.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch

from . import fused

EXACT_FLOAT32 = 1 << 24  # a float32 sum of 0/1 values is exact below this many values
# A reduction over (N, H, W) of an (N, C, H, W) output is up to ten times slower on CPU than two, over N
# and then over (H, W), when H*W is small (an (N, 512, 7, 7) ResNet stage, 2x2 to 4x4 MobileNet maps):
# below this many values per unit and row (and above 1), the dims before the unit axis are reduced first;
# above, the max reduces the dims after it first, which is 10-30% faster than one reduction over all.
SPLIT_BELOW = 64
TWO_PASS_FROM = 1 << 17  # values, for the (H, W)-first max: below, one op fewer beats the faster reads
SMALL = 4096  # counted values of a call below which a float64 sum costs no more than a float32 one


class Buffer(NamedTuple):
    name: str
    dtype: torch.dtype | None  # None: the site's output dtype
    initial: str | float       # "lowest": the dtype's lowest value; "threshold": the site's threshold
    saved: bool                # part of a checkpoint (state_dict)
    doc: str


# The per-unit counters, declared once: Counters allocates them, checkpoints save the `saved` ones.
BUFFERS = (
    Buffer("step_max", None, "lowest", False, "the largest output this step (the dtype's lowest when it did not run)"),
    Buffer("step_fired", torch.float64, 0.0, False, "values > threshold this step (whole numbers: exact below 2**53)"),
    Buffer("fired", torch.float64, 0.0, True, "values > threshold this interval"),
    Buffer("step_abs", torch.float64, 0.0, False, "sum of |output| this step, counted values (for dormant)"),
    Buffer("abs_sum", torch.float64, 0.0, True, "sum of |output| this interval, counted values"),
    Buffer("step_near", torch.float64, 0.0, False, "values near a bound this step (bounded sites only)"),
    Buffer("near", torch.float64, 0.0, True, "values near a bound this interval (bounded sites only)"),
    Buffer("last_fired", torch.int32, -1, True, "last step in which the unit fired, -1 for never"),
    Buffer("last_nonfinite", torch.int32, -1, True, "last step with a NaN/inf output, -1 for never"),
    Buffer("threshold", None, "threshold", False, "the activation's value at pre-activation 0"),
)
SAVED = tuple(b.name for b in BUFFERS if b.saved)
# Buffers of one dtype folded together: each pair lives in the rows of one (2, units) tensor, so closing a
# step masks, adds and zeroes both with one op each.
PAIRS = (("step_fired", "step_abs"), ("fired", "abs_sum"))
ADDED_LATER = ("abs_sum", "near")  # absent from older checkpoints: they start at 0 there
INTERVAL = ("fired", "abs_sum", "near")  # the per-interval sums: zeroed at an interval reset, added across ranks


class Site:
    """One place where an activation runs (capture finds it) and its per-unit counters: views into
    the buffers of the Counters for its device and dtype."""

    def __init__(self, name: str, kind: str, threshold: float, nonnegative: bool, first_step: int, subsample: int,
                 bounds: tuple[float, float] | None = None, saturation_eps: float = 0.01, fused: bool = False):
        self.name = name              # the name it is reported under (capture decides it)
        self.kind = kind
        self.threshold = threshold
        self.bounds = bounds          # (lower, upper) of a bounded activation (Tanh, Sigmoid, ...), else None
        if bounds is not None:        # "near a bound": |output - middle| > reach, i.e. closer than eps*(upper-lower)
            lower, upper = bounds
            self.middle = (lower + upper) / 2
            self.reach = (upper - lower) / 2 - saturation_eps * (upper - lower)
        self.nonnegative = nonnegative  # output can never be < 0 (ReLU-like): sign(output) is "fired"
        self.positive = nonnegative or (bounds is not None and bounds[0] >= 0)  # output >= 0: |output| is output
        self.subsample = subsample    # counts on the first 1/subsample of the batch
        self.first_step = first_step
        self.last_ran = -1            # last step with a counted forward of this site, -1 for never
        self.seen = -1                # the counters' fold_count when this site last ran (eager path)
        self.ran = False              # ran in a compiled graph since the last fold (compiled path)
        self.index = 0                # its slot in its Counters' per-site buffers
        self.units = 0
        self.ndim = 0
        self.axis = 0
        self.dims: tuple[int, ...] = ()
        self.lead: tuple[int, ...] = ()   # dims before the unit axis
        self.trail: tuple[int, ...] = ()  # dims after it, numbered as once the lead dims are reduced
        self.after: tuple[int, ...] = ()  # dims after it, numbered as in the output
        self.observations: int | torch.Tensor = 0       # values per unit in the interval (completed steps)
        self.step_observations: int | torch.Tensor = 0  # ... in the step now running (a tensor when masked)
        self.offset = 0               # first unit in its Counters' flat buffers
        self.counters: Counters | None = None
        self.step_max: torch.Tensor | None = None    # views kept for the hook path's out= arguments
        self.step_fired: torch.Tensor | None = None
        self.step_abs: torch.Tensor | None = None
        self.step_near: torch.Tensor | None = None
        self.warned = False
        self.fused = fused            # the fused pass may fold its CPU outputs (fused.py)
        self.limits: tuple | None = None  # the fused pass's threshold, middle and reach, rounded to the output dtype

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.units)

    def starts_step(self) -> bool:
        """No call of this site has been folded into the step buffers since the last fold: the next one writes
        them instead of adding (eager path; the fused pass too)."""
        return self.seen != self.counters.fold_count and not self.ran

    def counted_rows(self, batch: int) -> int:
        """Rows of a batch of `batch` that the counts use: the first 1/count_subsample of them."""
        return -(-batch // self.subsample) if self.subsample > 1 else batch

    def buffer(self, name: str) -> torch.Tensor:
        return getattr(self.counters, name)[self.slice]

    def warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(f"deadwatch: site {self.name!r}: {message}", RuntimeWarning, stacklevel=4)


def record(site: Site, out: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Fold one activation output into its site's counters for the current step.

    One pass over the whole output, its per-unit max: exact "fired at all" and NaN/inf. The
    fired count (for zero_fraction) comes from the first 1/count_subsample of the batch: the
    sign of (output - threshold), summed (sign, not a bool `>`: summing float 0/1 is several
    times faster than summing bools). The same rows give the per-unit sum of |output| (the
    dormant score) and, at bounded activations only, the count of values near a bound. Each
    extra pass over a large activation costs memory bandwidth, which is what the training step
    is made of.

    `mask` (True/1 = a real position, shaped like the output without its unit axis) leaves the
    other positions (padding) out of everything; it is ignored where the shapes differ.
    """
    if out.ndim != site.ndim or out.shape[site.axis] != site.units:
        site.warn_once(f"output shape {tuple(out.shape)} does not have its {site.units} units on dim {site.axis}; call skipped")
        return
    if site.fused and fused.fold(site, out, mask):
        return
    v = values(site, out, mask)
    x = v.full
    # The first call of a step writes its reductions straight into the site's buffers (fewer ops:
    # each small op costs microseconds, most of all right after a large matmul); later calls in
    # the same step (a reused module, gradient accumulation) fold into them.
    first = site.starts_step() and x.dtype == site.step_max.dtype
    site.seen = site.counters.fold_count
    # Units innermost in memory (channels-last maps, (N, C, H, W) permuted from (N, H, W, C)): one reduction over
    # all other dims reads memory in order and is fastest; a split there is up to 35 times slower.
    inner = math.prod(x.shape[site.axis + 1:]) if site.trail and site.lead and x.stride(site.axis) != 1 else 1
    split = 1 < inner < SPLIT_BELOW  # small maps: the lead dims first, for the sums too
    if inner == 1 or (not split and x.numel() < TWO_PASS_FROM):
        partial, dims = x, site.dims
    elif split:
        partial, dims = torch.amax(x, site.lead), site.trail
    else:  # large maps: the dims after the unit axis first
        partial, dims = torch.amax(x, site.after), site.lead
    if first:
        torch.amax(partial, dims, out=site.step_max)
    else:
        torch.maximum(site.step_max, torch.amax(partial, dims), out=site.step_max)
    # Sums in float32 (a float64 reduction of float32 values is several times slower on CPU), exact for
    # counts below 2**24 values per unit; beyond that, and for float64 outputs, in float64. Small ones
    # in float64 too, straight into the buffers: one op fewer, which is what counts there.
    small = v.fired.numel() <= SMALL
    acc = torch.float64 if small or wide(v) else torch.float32
    _fold_sum(site.step_fired, v.fired, site, split, acc, first)
    _fold_sum(site.step_abs, v.magnitude, site, split, acc, first)
    if v.near is not None:
        _fold_sum(site.step_near, v.near, site, split, acc, first)
    site.step_observations = site.step_observations + v.counted


class Values(NamedTuple):
    """An output as record() counts it (values() makes it)."""

    full: torch.Tensor              # every value (padding at the dtype's lowest): for the max
    fired: torch.Tensor             # counted rows: 1 where a value is > the threshold, else 0
    magnitude: torch.Tensor         # counted rows: |value| (0 at padding)
    near: torch.Tensor | None       # counted rows of a bounded site: 1 near a bound, else 0
    per_unit: int                   # counted values per unit, padding included
    counted: int | torch.Tensor     # counted values per unit, padding left out (a tensor when masked)


def values(site: Site, out: torch.Tensor, mask: torch.Tensor | None) -> Values:
    """The elementwise part of counting one output, the same for the eager and the compiled path
    (capture/compiled.py); each path reduces it its own way. The fired counts, |output| sums and
    near-a-bound counts use the first 1/count_subsample of the batch; `mask` (True/1 = a real
    position, shaped like the output without its unit axis) leaves padding out of everything."""
    x = raw = out.detach()
    keep = None
    if mask is not None and tuple(mask.shape) == tuple(x.shape[d] for d in site.dims):
        keep = mask.to(device=x.device, dtype=torch.bool).unsqueeze(site.axis)
        x = x.masked_fill(keep.logical_not(), torch.finfo(x.dtype).min)  # padding never fires nor sets the max
    full = x
    if site.subsample > 1:
        batch = site.dims[0]
        rows = site.counted_rows(x.shape[batch])
        x = x.narrow(batch, 0, rows)
        if keep is None:  # every op counts at small sites: x is raw here
            raw = x
        else:
            raw, keep = raw.narrow(batch, 0, rows), keep.narrow(batch, 0, rows)
    centred = None
    if site.bounds is not None:  # bounded activations only: values within eps*(upper-lower) of a bound
        centred = raw - site.middle
        if keep is not None:
            centred.masked_fill_(keep.logical_not(), 0)  # the middle: never near a bound
    if site.nonnegative and keep is None:  # ReLU-like: output >= 0, so sign(output) is 1 exactly where it fired
        fired = torch.sign(x)
    elif centred is not None and site.threshold == site.middle:  # Sigmoid, Tanh...: fired above the middle
        fired = torch.sign(centred).clamp_(min=0)  # padding is at the middle: 0
    else:
        fired = torch.sign(x - site.threshold if site.threshold else x).clamp_(min=0)
    # Dormant: the sum of |output| per unit (an output that is never negative is its own magnitude); padding adds 0.
    magnitude = raw.masked_fill(keep.logical_not(), 0) if keep is not None else raw
    if not site.positive:
        magnitude = magnitude.abs_() if keep is not None else magnitude.abs()
    near = None if centred is None else centred.abs_().sub_(site.reach).sign_().clamp_(min=0)
    per_unit = x.numel() // site.units
    return Values(full, fired, magnitude, near, per_unit, keep.sum() if keep is not None else per_unit)


def wide(v: Values) -> bool:
    """Sum these values in float64: more than float32 counts exactly, or float64 outputs."""
    return v.per_unit >= EXACT_FLOAT32 or v.fired.dtype == torch.float64


def _fold_sum(buffer: torch.Tensor, values: torch.Tensor, site: Site, split: bool, acc: torch.dtype,
              first: bool) -> None:
    """buffer (float64) = (first call of the step) or += the per-unit sum of values, summed in `acc`."""
    if split:
        values, dims = torch.sum(values, site.lead, dtype=acc), site.trail
    else:
        dims = site.dims
    if first and acc == torch.float64:
        torch.sum(values, dims, dtype=acc, out=buffer)
    elif first:
        buffer.copy_(torch.sum(values, dims, dtype=acc))
    else:
        buffer.add_(torch.sum(values, dims, dtype=acc))


class Counters:
    """Flat per-unit buffers (BUFFERS) for every site on one device whose outputs have one dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.lowest = torch.finfo(dtype).min
        self.fold_count = 0  # changes at every fold: a site whose `seen` differs has not run this step
        self.sites: list[Site] = []
        self.pairs: dict[str, torch.Tensor] = {}  # PAIRS[i][0] -> the (2, units) tensor its pair are rows of
        self.bounded = False  # some site counts values near a bound: step_near needs folding
        for b in BUFFERS:
            setattr(self, b.name, torch.empty(0, dtype=b.dtype or dtype, device=device))
        # Per site, for the compiled path (capture/compiled.py), which cannot count in Python: values
        # counted this step, and in the interval until a report moves them to site.observations.
        self.traced = False  # a compiled graph counts into step_obs: fold it
        self.step_obs = torch.zeros(0, dtype=torch.float64, device=device)
        self.obs = torch.zeros(0, dtype=torch.float64, device=device)

    @property
    def units(self) -> int:
        return self.step_max.numel()

    def add(self, site: Site) -> None:
        site.offset = self.units
        site.index = len(self.sites)
        site.counters = self
        self.step_obs = torch.cat([self.step_obs, self.step_obs.new_zeros(1)])
        self.obs = torch.cat([self.obs, self.obs.new_zeros(1)])
        for b in BUFFERS:
            fill = self.lowest if b.initial == "lowest" else site.threshold if b.initial == "threshold" else b.initial
            grown = torch.full((site.units,), fill, dtype=b.dtype or self.dtype, device=self.device)
            setattr(self, b.name, torch.cat([getattr(self, b.name), grown]))
        for first, second in PAIRS:
            both = self.pairs[first] = torch.stack([getattr(self, first), getattr(self, second)])
            setattr(self, first, both[0])
            setattr(self, second, both[1])
        self.bounded = self.bounded or site.bounds is not None
        self.sites.append(site)
        if self.device.type == "cuda":  # CUDA graphs (torch.compile mode="reduce-overhead") mutate them in place
            from torch._dynamo import mark_static_address
            for t in (self.step_max, self.pairs["step_fired"], self.step_near, self.step_obs):
                mark_static_address(t)
        for s in self.sites:  # the buffers are new: point every site at them again
            s.step_max, s.step_fired = self.step_max[s.slice], self.step_fired[s.slice]
            s.step_abs, s.step_near = self.step_abs[s.slice], self.step_near[s.slice]

    def fold(self, step: int) -> None:
        """Close training step `step`: a unit whose step max is NaN/inf does not fire in it."""
        ok = torch.isfinite(self.step_max)
        self.last_fired.masked_fill_((self.step_max > self.threshold).logical_and_(ok), step)
        bad = ok.logical_not_()
        self.last_nonfinite.masked_fill_(bad, step)
        step_sums = self.pairs["step_fired"]  # rows: step_fired, step_abs
        self.pairs["fired"] += step_sums.masked_fill_(bad, 0)  # rows: fired, abs_sum
        step_sums.zero_()
        if self.bounded:
            self.near += self.step_near.masked_fill_(bad, 0)
            self.step_near.zero_()
        if self.traced:
            self.obs += self.step_obs
            self.step_obs.zero_()
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
        site.lead = tuple(range(axis))
        site.trail = tuple(range(1, out.ndim - axis))
        site.after = tuple(range(axis + 1, out.ndim))
        key = (out.device, out.dtype)
        counters = self.by_device.get(key)
        if counters is None:
            counters = self.by_device[key] = Counters(out.device, out.dtype)
        counters.add(site)
        self.sites.append(site)
        if site.fused and out.device.type == "cpu":
            fused.KERNEL.start()

    def fold(self, step: int) -> None:
        for site in self.sites:
            if site.seen == site.counters.fold_count or site.ran:
                site.last_ran = step
                site.ran = False
            site.observations = site.step_observations + (0 if self.reset_pending else site.observations)
            site.step_observations = 0
        for counters in self.by_device.values():
            if self.reset_pending:
                for name in INTERVAL:
                    getattr(counters, name).zero_()
                if counters.traced:
                    counters.obs.zero_()
            counters.fold(step)
        self.reset_pending = False

    def settle(self) -> None:
        """Move the values the compiled path counted (on the device) into site.observations: one copy per
        Counters, on the report and checkpoint path only."""
        for counters in self.by_device.values():
            if counters.traced:
                counted = counters.obs.tolist()
                counters.obs.zero_()
                for site in counters.sites:
                    site.observations = site.observations + int(counted[site.index])

    def reset_interval(self) -> None:
        """Start a new interval with the next step; until then reports still show the last one."""
        self.reset_pending = True

    # -- checkpoints
    def state(self, site: Site) -> dict[str, Any]:
        """One site's saved counters (call settle() first)."""
        return {"kind": site.kind, "units": site.units, "first_step": site.first_step, "last_ran": site.last_ran,
                "observations": int(site.observations),
                **{name: site.buffer(name).cpu().clone() for name in SAVED}}

    def restore(self, site: Site, saved: dict) -> None:
        """Put a site's saved counters back (called when the site first runs after load_state_dict)."""
        for name in SAVED:
            if name in saved:  # a checkpoint from before abs_sum/near: those start at 0
                site.buffer(name).copy_(saved[name])
        site.first_step = saved["first_step"]
        site.last_ran = saved["last_ran"]
        site.observations = saved["observations"]
