"""Recycling dead and dormant units (ReDo, Sokar et al. 2023): the cure, opt in.

For each recycled unit u of a site, on the map of the layers around it (deadwatch/sitemap.py, read from
the autograd graph of a real forward): every producer's row u (weight and bias; a gated MLP's gate and
up) is drawn afresh as its reset_parameters() would draw it, a batch norm between the producer and the
activation gets channel u's affine and running statistics back to their start values, EVERY consumer's
column u (input channel u of a conv) is zeroed, and the optimizer's per-parameter state of exactly
those rows and columns is reset. Everything else keeps its values bit for bit; a dead unit's output was
0, and no layer reads it now, so the network's function is unchanged at the moment of recycling.

A site is skipped, with one warning naming it and why, when its layers could not be mapped, its
channels are coupled to other tensors (a residual add, a concatenation), a layer is used more than once
per forward or shared, a layer is not a plain Linear/Conv/HF Conv1D with its own weight and bias (weight
norm, other parametrisations), a norm between is not a batch norm, or the sizes do not match its units.
Every check runs, and every new row is drawn, before anything changes.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from typing import TYPE_CHECKING, Any, Hashable, Iterable, NamedTuple

import torch
from torch import nn

from .sitemap import SiteLayers, is_conv1d, is_layer

if TYPE_CHECKING:
    from .analysis import LayerReport, Report
    from .capture.hooks import Capture
    from .sitemap import SiteMap

# The optimizer state entries shaped like their parameter, and what they start at (others: 0).
STATE_START = {"sum": "initial_accumulator_value", "step_size": "lr"}  # Adagrad, Rprop: from the param group
KNOWN_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
               "grad_avg", "exp_inf", "prev", "ax", *STATE_START)


# -- layers
def out_units(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if is_conv1d(m):
        return m.nf
    return m.out_channels if is_layer(m) else None


def in_units(m: nn.Module) -> int | None:
    """Units a layer reads (None for a grouped conv: its input channels are not columns of one weight)."""
    if isinstance(m, nn.Linear):
        return m.in_features
    if is_conv1d(m):
        return m.weight.shape[0]
    return m.in_channels if is_layer(m) and m.groups == 1 else None


def _row_dim(m: nn.Module) -> int:
    return 1 if is_conv1d(m) else 0


def _col_dim(m: nn.Module) -> int:
    return 0 if is_conv1d(m) else 1


# -- plans: which layers a site's units touch
class Plan(NamedTuple):
    rows: tuple[str, ...]        # module paths whose unit rows are drawn afresh: the producers
    norm: str | None             # a batch norm between the producer and the activation
    consumers: tuple[str, ...]   # the module paths whose unit columns are zeroed


class Skip(Exception):
    """A site that is not recycled, and why."""


def plan(model: nn.Module, around: SiteLayers, units: int, occurrences: dict[int, int],
         sharded: str | None = None) -> Plan:
    """The layers a site's units touch, or Skip saying why they cannot be recycled exactly. `sharded`: a
    sharded parameter of the model (FSDP), whose layers the graph shows under other tensors."""
    if around.why is not None:
        raise Skip(f"{sharded} is sharded (FSDP?): its layers cannot be mapped or reset here" if sharded else around.why)
    if around.coupled is not None:
        raise Skip(f"{around.coupled}: its channels are coupled to other tensors, so new rows would change them")
    if around.repeated:
        raise Skip(f"{around.repeated[0]!r} is used more than once per forward (shared weights, or a module "
                   f"called several times)")
    p = Plan(around.producers, around.norm, around.consumers)
    for path in (*p.rows, p.norm, *p.consumers):
        if path is None:
            continue
        m = model.get_submodule(path)
        if occurrences.get(id(m), 0) > 1:
            raise Skip(f"{path!r} is used at several places in the model (shared weights)")
        for name, param in m.named_parameters(recurse=False):
            if occurrences.get(id(param), 0) > 1:
                raise Skip(f"{path}.{name} is shared with another layer (tied weights)")
            if type(param.data) is not torch.Tensor or param.is_meta:
                raise Skip(f"{path}.{name} is sharded or not materialised ({type(param.data).__name__}): "
                           f"its rows cannot be reset here")
        if path == p.norm:
            continue
        if nn.utils.parametrize.is_parametrized(m):
            raise Skip(f"{path!r} has parametrisations ({', '.join(m.parametrizations)}: "
                       f"nn.utils.parametrizations.weight_norm?): its rows and columns are not its weight's")
        other = [name for name, _ in m.named_parameters(recurse=False) if name not in ("weight", "bias")]
        if other:
            raise Skip(f"{path}.{other[0]} is not a weight or bias reset_parameters() draws "
                       f"(nn.utils.weight_norm?): its rows and columns cannot be reset")
    for path in p.rows:
        m = model.get_submodule(path)
        if not is_layer(m):
            raise Skip(f"its producer {path!r} ({type(m).__name__}) is not a Linear, Conv or HF Conv1D")
        if out_units(m) != units:
            raise Skip(f"its producer {path!r} does not have {units} outputs")
    for path in p.consumers:
        if in_units(model.get_submodule(path)) != units:
            raise Skip(f"its consumer {path!r} does not read {units} units (grouped conv, or flattened maps)")
    if p.norm is not None:
        norm = model.get_submodule(p.norm)
        if not isinstance(norm, nn.modules.batchnorm._NormBase):
            raise Skip(f"{p.norm!r} ({type(norm).__name__}) normalises across units: a new row would change every "
                       f"unit's output")
    return p


def occurrences(model: nn.Module) -> dict[int, int]:
    """How often each module and parameter appears in the model (more than once: shared)."""
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return seen


# -- the cure
def seed(step: int, name: str, path: str) -> int:
    """The same on every rank: DDP replicas draw the same new rows."""
    return int.from_bytes(hashlib.blake2b(f"{step}/{name}/{path}".encode(), digest_size=8).digest(), "little") >> 1


def fresh(m: nn.Module, seed_: int) -> dict[str, torch.Tensor]:
    """New weight and bias for layer m, drawn as m.reset_parameters() would draw them (HF Conv1D, which has
    none: as its constructor, weight N(0, 0.02), bias 0), on the CPU, from a generator seeded with seed_.
    The global random state is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed_)
        shapes = {name: p for name, p in m.named_parameters(recurse=False)}
        if is_conv1d(m):
            new = {"weight": torch.empty(shapes["weight"].shape, dtype=shapes["weight"].dtype).normal_(0.0, 0.02)}
            if "bias" in shapes:
                new["bias"] = torch.zeros(shapes["bias"].shape, dtype=shapes["bias"].dtype)
            return new
        tmp = copy.copy(m)  # same class and sizes; its own parameters, on the CPU; bias=None stays None
        tmp._parameters = {name: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype))
                           for name, p in m._parameters.items()}
        tmp._buffers, tmp._modules = {}, {}
        tmp.reset_parameters()
        return {name: p.detach() for name, p in tmp._parameters.items() if p is not None}


def draw(model: nn.Module, p: Plan, units: list[int], step: int, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """The producers' new rows for `units` (CPU), drawn before anything changes: Skip if one cannot be."""
    index = torch.tensor(units, dtype=torch.long)
    rows = {}
    for path in p.rows:
        m = model.get_submodule(path)
        try:
            new = fresh(m, seed(step, name, path))
        except Exception as e:
            raise Skip(f"its producer {path!r}: reset_parameters() failed ({type(e).__name__}: {e})") from None
        rows[path] = {pname: t.index_select(_row_dim(m) if pname == "weight" else 0, index) for pname, t in new.items()}
    return rows


class Touched(NamedTuple):
    param: torch.Tensor
    dim: int
    index: torch.Tensor   # on the parameter's device


def renew(model: nn.Module, p: Plan, units: list[int], rows: dict[str, dict[str, torch.Tensor]]) -> list[Touched]:
    """Put the new rows in and reset the norm's channels. Returns the parameter slices touched."""
    touched = []
    with torch.no_grad():
        for path in p.rows:
            m = model.get_submodule(path)
            for pname, param in m.named_parameters(recurse=False):
                dim = _row_dim(m) if pname == "weight" else 0
                index = torch.tensor(units, dtype=torch.long, device=param.device)
                param.index_copy_(dim, index, rows[path][pname].to(param.device))
                touched.append(Touched(param, dim, index))
        if p.norm is not None:
            norm = model.get_submodule(p.norm)
            for pname, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                t = getattr(norm, pname, None)
                if isinstance(t, torch.Tensor) and t.ndim == 1:
                    index = torch.tensor(units, dtype=torch.long, device=t.device)
                    t.index_fill_(0, index, value)
                    if isinstance(t, nn.Parameter):
                        touched.append(Touched(t, 0, index))
    return touched


def zero(model: nn.Module, p: Plan, units: list[int]) -> list[Touched]:
    """Zero every consumer's weights that read the units (after every renew(): a consumer that is also a
    producer keeps these zeros)."""
    touched = []
    with torch.no_grad():
        for path in p.consumers:
            c = model.get_submodule(path)
            index = torch.tensor(units, dtype=torch.long, device=c.weight.device)
            c.weight.index_fill_(_col_dim(c), index, 0.0)
            touched.append(Touched(c.weight, _col_dim(c), index))
    return touched


def reset_state(optimizer: torch.optim.Optimizer, touched: list[Touched]) -> set[str]:
    """Reset the optimizer's per-parameter state of exactly the touched rows and columns: entries shaped
    like the parameter go back to their start value (0; Adagrad's sum and Rprop's step size: from the
    param group). Per-parameter scalars (Adam's step) are left. Returns the entries it could not reset."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    left = set()
    with torch.no_grad():
        for t in touched:
            state = optimizer.state.get(t.param)
            if not state:
                continue
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or value.numel() <= 1:
                    continue  # per-parameter counters (step): no rows to reset
                if value.shape != t.param.shape:
                    left.add(f"{type(optimizer).__name__}[{key!r}] (shaped {tuple(value.shape)}, not like its parameter)")
                    continue
                start = groups.get(id(t.param), {}).get(STATE_START.get(key, ""), 0.0)
                if not isinstance(start, (int, float)):
                    left.add(f"{type(optimizer).__name__}[{key!r}] (start value {start!r})")
                    continue
                value.index_fill_(t.dim, t.index.to(value.device), float(start))
                if key not in KNOWN_STATE:
                    left.add(f"{type(optimizer).__name__}[{key!r}] (set to 0: its start value is not known)")
    return left


def restart_counters(site: Any, units: list[int], step: int) -> None:
    """The recycled units' counters start over: alive as if they fired at the last completed step (0-based
    step - 1), so they have `window` steps to fire before they count as dead again. The site's interval
    starts over for all its units (sums and observations alike), so firing rates and dormancy are judged
    on the steps since the recycling, never on sums emptied for some units only."""
    from .stats import INTERVAL

    index = torch.tensor(units, dtype=torch.long, device=site.counters.device)
    site.buffer("last_fired").index_fill_(0, index, step - 1)
    for name in INTERVAL:
        site.buffer(name).zero_()
    site.observations = 0
    site.counters.obs[site.index] = 0   # the compiled path's count of the interval, not yet settled


def chosen(layer: LayerReport, which: str, max_fraction: float | None) -> list[int]:
    """The units of a site to recycle: its dead (or dormant) units; with max_fraction, at most that share of
    its units, the longest dead first (never fired, then the earliest last fired), then the lowest index."""
    units = list(layer.dead_units if which == "dead" else layer.dormant_units)
    if max_fraction is None:
        return units
    cap = int(max_fraction * layer.units)
    if len(units) > cap:
        last = layer.last_fired or [0] * layer.units
        units = sorted(sorted(units, key=lambda u: (last[u], u))[:cap])
    return units


class Recycler:
    """Monitor.recycle(): plans per site, one warning per skipped site."""

    def __init__(self, capture: Capture, sitemap: SiteMap):
        self.capture = capture
        self.sitemap = sitemap
        self.warned: set[Hashable] = set()

    def run(self, report: Report, optimizer: torch.optim.Optimizer | None, sites: Iterable[str] | None, which: str,
            step: int, max_fraction: float | None = None) -> dict[str, list[int]]:
        from . import sync

        layout = self.capture.layout()
        keys = [key for key, _ in layout]
        names = self.capture.names(keys)
        by_name = {name: (key, site) for name, (key, site) in zip(names, layout)}
        name_of = dict(zip(keys, names))
        layers = {layer.name: layer for layer in report.layers}
        if sites is None:
            wanted = list(layers)
        else:
            wanted = [sites] if isinstance(sites, str) else list(sites)
            unknown = [s for s in wanted if s not in layers]
            if unknown:
                raise KeyError(f"deadwatch: recycle(sites=...): no site {unknown[0]!r}; sites: {', '.join(layers)}")
        model = self.capture.model
        shared = occurrences(model)
        sharded = next((n for n, p in model.named_parameters() if type(p.data) is not torch.Tensor), None)
        todo: dict[str, tuple[Plan | None, list[int], Any]] = {}   # name -> (plan, units, new rows or why)
        for name in wanted:
            units = chosen(layers[name], which, max_fraction)
            if not units:
                continue
            key, site = by_name.get(name, (None, None))
            if key is None:
                todo[name] = (None, units, "it has not run in this process")
                continue
            try:
                p = plan(model, self.sitemap.get(key, name_of), site.units, shared, sharded)
                todo[name] = (p, units, draw(model, p, units, step, name))
            except Skip as e:
                todo[name] = (None, units, str(e))
        if sync.distributed():  # every rank must recycle the same sites the same way
            import torch.distributed as dist

            gathered: list[Any] = [None] * dist.get_world_size()
            mine = {n: (tuple(p) if p else None, None if p else why) for n, (p, _, why) in todo.items()}
            dist.all_gather_object(gathered, mine)
            for name, (p, units, why) in list(todo.items()):
                if any(g.get(name, (None, "absent"))[0] != (tuple(p) if p else None) for g in gathered):
                    whys = [g.get(name, (None, "it has not run there"))[1] for g in gathered]
                    todo[name] = (None, units, mine[name][1] or next((w for w in whys if w),
                                                                     "the ranks found other layers"))
        result: dict[str, list[int]] = {}
        for name, (p, units, why) in todo.items():
            if p is None and name not in self.warned:
                self.warned.add(name)
                warnings.warn(f"deadwatch: recycle: site {name!r} skipped: {why}", RuntimeWarning, stacklevel=4)
        plans = [(name, p, units, rows) for name, (p, units, rows) in todo.items() if p is not None]
        touched = [t for _, p, units, rows in plans for t in renew(model, p, units, rows)]
        touched += [t for _, p, units, _ in plans for t in zero(model, p, units)]
        left = reset_state(optimizer, touched)
        for name, _, units, _ in plans:
            restart_counters(by_name[name][1], units, step)
            result[name] = units
        if left:
            warnings.warn(f"deadwatch: recycle: optimizer state not reset exactly: {'; '.join(sorted(left))}",
                          RuntimeWarning, stacklevel=4)
        return result
