"""Sync: the counters leave the device here, once per report, merged across ranks.

A single CPU process reads its buffers in place, with no copy at all. Otherwise every
site's counters go in one packed float64 buffer: one data all_reduce (after a 2-number
layout check under torch.distributed) and one device->host copy. Without a process
group every function here is local.
"""

from __future__ import annotations

import hashlib
from typing import Any, Hashable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .errors import DeadwatchError
from . import stats
from .stats import Registry, Site

Layout = list[tuple[Hashable, Site]]  # (site key, site), in the order the sites first ran


class Figures(NamedTuple):
    """One site's merged figures, on the host."""

    name: Any               # the site key, until the caller puts the site's name here
    kind: str
    alive: np.ndarray       # per unit: fired within the window
    nonfinite: bool         # NaN/inf within the window
    fired: np.ndarray       # per unit: values fired in the interval (whole numbers, float64)
    observations: int       # values per unit in the interval
    judged: bool            # a step that ran the site has been completed
    idle: bool = False      # no counted forward of the site in the window (on any rank)
    abs_sum: np.ndarray | None = None    # per unit: sum of |output| over the counted values of the interval
    near: np.ndarray | None = None       # per unit: counted values near a bound (bounded sites), interval
    last_fired: np.ndarray | None = None  # per unit: last step (0-based) it fired on any rank, -1 never
    bounds: tuple[float, float] | None = None  # the activation's output range, when bounded


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def snapshot(registry: Registry, layout: Layout, steps: int, window: int) -> tuple[list[Figures], bool]:
    """Host copy of every site's figures over the window / interval, merged across ranks.

    Under torch.distributed the ranks first agree on the sites (a 2-number MAX all_reduce of a
    fingerprint; on a mismatch, the union of every rank's sites), then all counters go in one
    float64 buffer: one all_reduce (SUM) and one device->host copy. Also says whether every rank
    had the same sites.
    """
    registry.settle()
    shapes, same = [(key, site.kind, site.units) for key, site in layout], True
    bounds = {key: site.bounds for key, site in layout}
    if distributed():
        shapes, same, bounds = agree(shapes, bounds)
    start = max(steps - window, 0)
    mine = dict(layout)
    if same:
        host = _merged(registry, start, steps)
        figures = [Figures(key, mine[key].kind, *host[id(mine[key])]) for key, _, _ in shapes]
    else:
        figures = _union(shapes, mine, start, steps)
    return [f._replace(bounds=bounds.get(f.name)) for f in figures], same


TAIL = 4  # numbers per site after the per-unit figures


def _site_tail(site: Site, start: int, steps: int) -> tuple[int, int, int, int]:
    """Per site: observations, judged, ran in the window, held by this rank (each adds up over ranks)."""
    return int(site.observations), int(steps > site.first_step), int(site.last_ran >= start), 1


# last_fired is merged with MAX, but the data all_reduce is a SUM: each rank adds 2**(k*e), e = last_fired - steps
# clamped to >= -horizon(k), with 2**k above the world size, so the sum's binary exponent gives the largest e
# exactly (the others add less than 2**(k*e) * (world - 1) < 2**(k*(e+1))). Beyond the horizon (2**(k*e) would
# leave float64's normal range) a second slot holds the plain sum: divided by the ranks holding the site, it is
# exact when they agree (a unit dead on every rank since the same step) and their mean otherwise.

def _horizon(k: int) -> int:
    return 1022 // k


def _encode_last(last: torch.Tensor, steps: int, k: int, out: torch.Tensor) -> None:
    torch.clamp(last.to(out.device, torch.float64) - steps, min=-_horizon(k), out=out)
    out.mul_(k).exp2_()


def _decode_last(code: np.ndarray, total: np.ndarray, holders: int, steps: int, k: int) -> np.ndarray:
    _, exponent = np.frexp(code)
    e = (exponent.astype(np.int64) - 1) // k
    plain = np.floor(total / max(holders, 1) + 1e-9).astype(np.int64)
    return np.where((code > 0) & (e > -_horizon(k)), steps + e, plain)


def _merged(registry: Registry, start: int, steps: int) -> dict[int, tuple]:
    """{id(site): (alive, nonfinite, fired, observations, judged, idle)} for this rank's sites, merged."""
    groups = list(registry.by_device.values())
    many = distributed()
    if not many and all(c.device.type == "cpu" for c in groups):
        out = {}
        for c in groups:
            alive, nonfinite = c.last_fired.numpy() >= start, c.last_nonfinite.numpy() >= start
            for site in c.sites:
                obs, judged, ran, _ = _site_tail(site, start, steps)
                sl = site.slice
                out[id(site)] = (alive[sl], bool(nonfinite[sl].any()), c.fired.numpy()[sl], obs, bool(judged), not ran,
                                 c.abs_sum.numpy()[sl], c.near.numpy()[sl], c.last_fired.numpy()[sl].astype(np.int64))
        return out
    # One buffer, written in place: per group, alive + base * nonfinite per unit (base is a power of two
    # above the world size, so a SUM over ranks can be taken apart again), the fired counts, the |output|
    # sums, the near-a-bound counts, last_fired (encoded, see _encode_last, under torch.distributed) and,
    # under torch.distributed, last_fired's plain sum; then the tail of every site.
    k = (dist.get_world_size() if many else 1).bit_length()
    base = 1 << k
    per = 6 if many else 5
    device = _collective_device() if many else groups[0].device
    tail = [v for c in groups for site in c.sites for v in _site_tail(site, start, steps)]
    flat = torch.empty(sum(per * c.units for c in groups) + len(tail), dtype=torch.float64, device=device)
    pos = 0
    for c in groups:
        code, fired, abs_sum, near, last = (flat[pos + i * c.units:pos + (i + 1) * c.units] for i in range(5))
        torch.mul(c.last_nonfinite.to(device) >= start, base, out=code)
        code.add_(c.last_fired.to(device) >= start)
        fired.copy_(c.fired)
        abs_sum.copy_(c.abs_sum)
        near.copy_(c.near)
        if many:
            _encode_last(c.last_fired, steps, k, last)
            flat[pos + 5 * c.units:pos + 6 * c.units].copy_(c.last_fired)
        else:
            last.copy_(c.last_fired)
        pos += per * c.units
    flat[pos:].copy_(torch.tensor(tail, dtype=torch.float64))
    if many:
        dist.all_reduce(flat)
    host = flat.cpu().numpy()
    out, pos, t = {}, 0, host.size - len(tail)
    for c in groups:
        code, fired, abs_sum, near, last = (host[pos + i * c.units:pos + (i + 1) * c.units] for i in range(5))
        total = host[pos + 5 * c.units:pos + 6 * c.units] if many else None
        pos += per * c.units
        code = code.astype(np.int64)
        alive, nonfinite = (code & (base - 1)) > 0, code >= base
        for site in c.sites:
            sl = site.slice
            holders = int(host[t + 3])
            lf = _decode_last(last[sl], total[sl], holders, steps, k) if many else last[sl].astype(np.int64)
            out[id(site)] = (alive[sl], bool(nonfinite[sl].any()), fired[sl], int(host[t]), host[t + 1] > 0,
                             not host[t + 2] > 0, abs_sum[sl], near[sl], lf)
            t += TAIL
    return out


def _union(shapes: list[tuple[Hashable, str, int]], mine: dict[Hashable, Site], start: int, steps: int) -> list[Figures]:
    """Ranks saw different sites: pack site by site in the agreed order, zeros for sites not run here."""
    device = _collective_device()
    k = dist.get_world_size().bit_length()
    parts, tail = [], []
    for key, _, units in shapes:
        site = mine.get(key)
        if site is None:
            parts.append(torch.zeros(7 * units, dtype=torch.float64, device=device))
            tail += [0] * TAIL
            continue
        c = site.counters
        last = torch.empty(units, dtype=torch.float64, device=device)
        _encode_last(site.buffer("last_fired"), steps, k, last)
        parts += [(site.buffer("last_fired") >= start).to(device, torch.float64),
                  (site.buffer("last_nonfinite") >= start).to(device, torch.float64), c.fired[site.slice].to(device),
                  c.abs_sum[site.slice].to(device), c.near[site.slice].to(device), last,
                  site.buffer("last_fired").to(device, torch.float64)]
        tail += _site_tail(site, start, steps)
    flat = torch.cat(parts + [torch.tensor(tail, dtype=torch.float64).to(device)])
    dist.all_reduce(flat)
    host = flat.cpu().numpy()
    figures, pos, t = [], 0, host.size - len(tail)
    for key, kind, units in shapes:
        alive, nonfinite, fired, abs_sum, near, last, total = (host[pos + i * units:pos + (i + 1) * units]
                                                              for i in range(7))
        pos += 7 * units
        figures.append(Figures(key, kind, alive > 0, bool(nonfinite.any()), fired, int(host[t]), host[t + 1] > 0,
                               not host[t + 2] > 0, abs_sum, near,
                               _decode_last(last, total, int(host[t + 3]), steps, k)))
        t += TAIL
    return figures


def merged_state(sites: dict[str, dict]) -> dict[str, dict]:
    """Every rank's saved sites (Registry.state), merged: a unit fired when it fired on any rank, counts
    add up. A checkpoint holds this on every rank, so it does not matter which rank's is saved (Lightning
    saves rank 0's). Checkpoints are rare: the host objects are gathered whole."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sites)
    merged: dict[str, dict] = {}
    for rank, theirs in enumerate(gathered):
        for name, saved in theirs.items():
            mine = merged.get(name)
            if mine is None:
                merged[name] = dict(saved)
                continue
            if mine["units"] != saved["units"]:
                raise DeadwatchError(f"site {name!r} has {mine['units']} units on one rank and {saved['units']} on "
                                     f"rank {rank}: the ranks do not run the same model")
            for key in ("last_fired", "last_nonfinite"):
                mine[key] = torch.maximum(mine[key], saved[key])
            for key in stats.INTERVAL:
                if key in mine and key in saved:
                    mine[key] = mine[key] + saved[key]
            mine["observations"] += saved["observations"]
            mine["last_ran"] = max(mine["last_ran"], saved["last_ran"])
            mine["first_step"] = min(mine["first_step"], saved["first_step"])
    return merged


def fingerprint(shapes: list[tuple[Hashable, str, int]]) -> int:
    return int.from_bytes(hashlib.blake2b(repr(shapes).encode(), digest_size=7).digest(), "little")


def agree(shapes: list[tuple[Hashable, str, int]], bounds: dict[Hashable, Any]
          ) -> tuple[list[tuple[Hashable, str, int]], bool, dict[Hashable, Any]]:
    """The sites every rank reports on, whether every rank had exactly these, and each site's output bounds:
    this rank's when all ranks match, else the union of all ranks' sites (and their bounds)."""
    fp = fingerprint(shapes)
    check = torch.tensor([fp, -fp], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if int(check[0]) == -int(check[1]):  # max == min: every rank has the same sites
        return shapes, True, bounds
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (shapes, bounds))
    union: dict[Hashable, tuple[str, int]] = {}
    merged: dict[Hashable, Any] = {}
    for rank, (theirs, their_bounds) in enumerate(gathered):
        for key, kind, units in theirs:
            if key in union and union[key][1] != units:
                raise DeadwatchError(f"site {str(key)!r} has {union[key][1]} units on one rank and {units} on rank "
                                     f"{rank}: the ranks do not run the same model")
            union.setdefault(key, (kind, units))
            merged.setdefault(key, their_bounds.get(key))
    return [(key, kind, units) for key, (kind, units) in union.items()], False, merged


def _collective_device() -> torch.device:
    if distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
