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


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def snapshot(registry: Registry, layout: Layout, steps: int, window: int) -> list[Figures]:
    """Host copy of every site's figures over the window / interval, merged across ranks.

    Under torch.distributed the ranks first agree on the sites (a 2-number MAX all_reduce of a
    fingerprint; on a mismatch, the union of every rank's sites), then all counters go in one
    float64 buffer: one all_reduce (SUM) and one device->host copy.
    """
    shapes, same = [(key, site.kind, site.units) for key, site in layout], True
    if distributed():
        shapes, same = agree(shapes)
    start = max(steps - window, 0)
    mine = dict(layout)
    if same:
        host = _merged(registry, start, steps)
        return [Figures(key, mine[key].kind, *host[id(mine[key])]) for key, _, _ in shapes]
    return _union(shapes, mine, start, steps)


def _site_tail(site: Site, start: int, steps: int) -> tuple[int, int, int]:
    """Per site: observations, judged, ran in the window (each adds up over ranks)."""
    return int(site.observations), int(steps > site.first_step), int(site.last_ran >= start)


def _merged(registry: Registry, start: int, steps: int) -> dict[int, tuple]:
    """{id(site): (alive, nonfinite, fired, observations, judged, idle)} for this rank's sites, merged."""
    groups = list(registry.by_device.values())
    many = distributed()
    if not many and all(c.device.type == "cpu" for c in groups):
        out = {}
        for c in groups:
            alive, nonfinite = c.last_fired.numpy() >= start, c.last_nonfinite.numpy() >= start
            for site in c.sites:
                obs, judged, ran = _site_tail(site, start, steps)
                out[id(site)] = (alive[site.slice], bool(nonfinite[site.slice].any()), c.fired.numpy()[site.slice],
                                 obs, bool(judged), not ran)
        return out
    # One buffer, written in place: per group, alive + base * nonfinite per unit (base is a power
    # of two above the world size, so a SUM over ranks can be taken apart again), then the fired
    # counts; then the tail of every site.
    base = 1 << (dist.get_world_size() if many else 1).bit_length()
    device = _collective_device() if many else groups[0].device
    tail = [v for c in groups for site in c.sites for v in _site_tail(site, start, steps)]
    flat = torch.empty(sum(2 * c.units for c in groups) + len(tail), dtype=torch.float64, device=device)
    pos = 0
    for c in groups:
        code, fired = flat[pos:pos + c.units], flat[pos + c.units:pos + 2 * c.units]
        torch.mul(c.last_nonfinite.to(device) >= start, base, out=code)
        code.add_(c.last_fired.to(device) >= start)
        fired.copy_(c.fired)
        pos += 2 * c.units
    flat[pos:].copy_(torch.tensor(tail, dtype=torch.float64))
    if many:
        dist.all_reduce(flat)
    host = flat.cpu().numpy()
    out, pos, t = {}, 0, host.size - len(tail)
    for c in groups:
        code, fired = host[pos:pos + c.units].astype(np.int64), host[pos + c.units:pos + 2 * c.units]
        pos += 2 * c.units
        alive, nonfinite = (code & (base - 1)) > 0, code >= base
        for site in c.sites:
            sl = site.slice
            out[id(site)] = (alive[sl], bool(nonfinite[sl].any()), fired[sl], int(host[t]), host[t + 1] > 0,
                             not host[t + 2] > 0)
            t += 3
    return out


def _union(shapes: list[tuple[Hashable, str, int]], mine: dict[Hashable, Site], start: int, steps: int) -> list[Figures]:
    """Ranks saw different sites: pack site by site in the agreed order, zeros for sites not run here."""
    device = _collective_device()
    parts, tail = [], []
    for key, _, units in shapes:
        site = mine.get(key)
        if site is None:
            parts.append(torch.zeros(3 * units, dtype=torch.float64, device=device))
            tail += [0, 0, 0]
            continue
        c = site.counters
        parts += [(site.buffer("last_fired") >= start).to(device, torch.float64),
                  (site.buffer("last_nonfinite") >= start).to(device, torch.float64), c.fired[site.slice].to(device)]
        tail += _site_tail(site, start, steps)
    flat = torch.cat(parts + [torch.tensor(tail, dtype=torch.float64).to(device)])
    dist.all_reduce(flat)
    host = flat.cpu().numpy()
    figures, pos, t = [], 0, host.size - len(tail)
    for key, kind, units in shapes:
        alive, nonfinite, fired = (host[pos + i * units:pos + (i + 1) * units] for i in range(3))
        pos += 3 * units
        figures.append(Figures(key, kind, alive > 0, bool(nonfinite.any()), fired, int(host[t]), host[t + 1] > 0,
                               not host[t + 2] > 0))
        t += 3
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
            mine["fired"] = mine["fired"] + saved["fired"]
            mine["observations"] += saved["observations"]
            mine["last_ran"] = max(mine["last_ran"], saved["last_ran"])
            mine["first_step"] = min(mine["first_step"], saved["first_step"])
    return merged


def fingerprint(shapes: list[tuple[Hashable, str, int]]) -> int:
    return int.from_bytes(hashlib.blake2b(repr(shapes).encode(), digest_size=7).digest(), "little")


def agree(shapes: list[tuple[Hashable, str, int]]) -> tuple[list[tuple[Hashable, str, int]], bool]:
    """The sites every rank reports on, and whether every rank had exactly these: this rank's
    when all ranks match, else the union of all ranks' sites."""
    fp = fingerprint(shapes)
    check = torch.tensor([fp, -fp], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if int(check[0]) == -int(check[1]):  # max == min: every rank has the same sites
        return shapes, True
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, shapes)
    union: dict[Hashable, tuple[str, int]] = {}
    for rank, theirs in enumerate(gathered):
        for key, kind, units in theirs:
            if key in union and union[key][1] != units:
                raise DeadwatchError(f"site {str(key)!r} has {union[key][1]} units on one rank and {units} on rank "
                                     f"{rank}: the ranks do not run the same model")
            union.setdefault(key, (kind, units))
    return [(key, kind, units) for key, (kind, units) in union.items()], False


def _collective_device() -> torch.device:
    if distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
