"""Recycling dead and dormant units (ReDo, Sokar et al. 2023): the cure, opt in.

For each recycled unit u of a site whose producer layer P feeds the activation and whose consumer layer
C reads it: P's row u (weight and bias) is drawn afresh as P.reset_parameters() would draw it, a batch
norm between P and the activation gets channel u's affine and running statistics back to their start
values, C's column u (input channel u of a conv) is zeroed, and the optimizer's per-parameter state of
exactly those rows and columns is reset. Everything else keeps its values bit for bit.

P, the norm and C are found from the model and the autograd graph:
- when capture first sees a site (with a graph), capture/producer.py walks back from its output through
  ops that keep units apart (views, dropout, scaling) to the layer that made it (through one norm at
  most), notes which earlier site that layer reads straight from, and which earlier sites reach this
  one's pre-activation without a layer in between (a residual add, a product): Capture.layers, .fed;
- plan() runs at recycle time and adds the module structure: in an nn.Sequential each child reads the
  previous one's output only; elsewhere C is the next layer registered after P, which the graph must
  not contradict. A gated MLP (act(gate(x)) * up(x) -> down) is recognised by its three layers.
Sites where this is not unambiguous are skipped with one warning naming the site and why.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from typing import TYPE_CHECKING, Any, Hashable, Iterable, NamedTuple

import torch
from torch import nn

from .capture.producer import is_norm

if TYPE_CHECKING:
    from .analysis import LayerReport, Report
    from .capture.hooks import Capture

# The optimizer state entries shaped like their parameter, and what they start at (others: 0).
STATE_START = {"sum": "initial_accumulator_value", "step_size": "lr"}  # Adagrad, Rprop: from the param group
KNOWN_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
               "grad_avg", "exp_inf", "prev", "ax", *STATE_START)


# -- layers
def is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


def is_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m) or (
        isinstance(m, nn.modules.conv._ConvNd) and not m.transposed)


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


# Modules between an activation and the layer reading it that keep channels apart (checked by sizes).
PASSING = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
           nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
           nn.modules.pooling._AdaptiveMaxPoolNd)


# -- plans: which layers a site's units touch
class Plan(NamedTuple):
    rows: tuple[str, ...]   # module paths whose unit rows are drawn afresh: the producer (and a gate's up)
    norm: str | None        # a batch norm between the producer and the activation
    consumer: str           # the module path whose unit columns are zeroed


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _children(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    prefix = f"{path}." if path else ""
    return [(prefix + name, m) for name, m in model.get_submodule(path)._modules.items() if m is not None]


def _first_leaf(model: nn.Module, path: str) -> str:
    """Where a Sequential's forward starts: its first child, recursively."""
    m = model.get_submodule(path)
    while isinstance(m, nn.Sequential) and len(m):
        path, m = _children(model, path)[0]
    return path


def _after_in_sequence(model: nn.Module, path: str, index: int) -> str | None:
    """The module that reads child `index` of the Sequential at `path`: the next child, or, after the
    last, the next one of the Sequential holding this one; None where a forward of other code follows."""
    while True:
        children = _children(model, path)
        if index + 1 < len(children):
            return _first_leaf(model, children[index + 1][0])
        if not path:
            return None
        parent = _parent(path)
        if not isinstance(model.get_submodule(parent), nn.Sequential):
            return None
        index = [p for p, _ in _children(model, parent)].index(path)
        path = parent


class Skip(Exception):
    """A site that is not recycled, and why."""


def plan(capture: Capture, key: Any, units: int, occurrences: dict[int, int]) -> Plan:
    """The layers a site's units touch, or Skip saying why they cannot be told apart."""
    found = _plan(capture, key, units, occurrences)  # first: a sharded layer says so, whatever its graph showed
    fed = capture.fed.get(key)
    if fed is not None:
        raise Skip(f"its output also reaches site {str(fed)!r} without a layer in between (a residual add or a "
                   f"product), so zeroing one layer's columns would not keep the network's function")
    return found


def _plan(capture: Capture, key: Any, units: int, occurrences: dict[int, int]) -> Plan:
    model = capture.model
    tr = capture.layers.get(key)
    act_path = key.path if key.function is None else None
    holder = _parent(key.path) if key.function is None else key.path   # the module whose forward runs it
    seq = key.function is None and key.path != "" and isinstance(model.get_submodule(holder), nn.Sequential)
    producer = norm = consumer = None
    if seq:  # each child reads the previous child's output only
        children = _children(model, holder)
        act = model.get_submodule(act_path)
        at = [i for i, (_, m) in enumerate(children) if m is act]
        if key.call >= len(at):
            raise Skip("its activation module is also called outside its nn.Sequential")
        i = at[key.call]
        before = [(p, m) for p, m in children[:i]]
        while before and isinstance(before[-1][1], PASSING):
            before.pop()
        if before and is_norm(before[-1][1]):
            norm = before.pop()[0]
            while before and isinstance(before[-1][1], PASSING):
                before.pop()
        if not before or not is_layer(before[-1][1]):
            raise Skip("no Linear, Conv or HF Conv1D registered just before it in its nn.Sequential")
        producer = before[-1][0]
        consumer = _after_in_sequence(model, holder, i)
        while consumer is not None and isinstance(model.get_submodule(consumer), PASSING):
            consumer = _after_in_sequence(model, _parent(consumer),
                                          [p for p, _ in _children(model, _parent(consumer))].index(consumer))
        if tr is not None and tr.producer is not None and (tr.producer, tr.norm) != (producer, norm):
            raise Skip(f"the autograd graph shows {tr.producer!r} feeding it, its nn.Sequential {producer!r}")
    else:
        if tr is None or tr.producer is None:
            raise Skip(tr.why if tr is not None else "it was not traced when first seen")
        producer, norm = tr.producer, tr.norm
        if key.function is None and key.path in capture.multi_call:
            raise Skip("its activation module is called several times per forward, outside an nn.Sequential")
        if _parent(producer) != holder:
            raise Skip(f"its producer {producer!r} is not registered in the module that runs the activation")
        children = _children(model, holder)
        paths = [p for p, _ in children]
        gated = _gated(model, children, producer, units)
        if gated is not None:
            return _checked(model, Plan((producer, gated[0]), norm, gated[1]), units, occurrences)
        start = paths.index(producer)
        if act_path is not None:
            others = [p for p, m in children[start + 1:paths.index(act_path)]
                      if p != producer and is_layer(m) and out_units(m) == units]
            if others:
                raise Skip(f"{others[0]!r} is registered between its producer and it (a gated product?)")
            start = max(start, paths.index(act_path))
        # the layer reading its units: the only one beside the producer, else the first registered after it
        readers = [i for i, (p, m) in enumerate(children) if p != producer and is_layer(m) and in_units(m) == units]
        later = [i for i in readers if i > start]
        pick = readers[0] if len(readers) == 1 else later[0] if later else None
        consumer = paths[pick] if pick is not None else None
    if consumer is None or not is_layer(model.get_submodule(consumer)):
        raise Skip("no Linear, Conv or HF Conv1D is registered right after it to read its units")
    seen = {t.producer for t in capture.layers.values() if t.reads == key and t.producer is not None}
    if seen and seen != {consumer}:
        raise Skip(f"the autograd graph shows {sorted(seen)} reading it, the module order {consumer!r}")
    return _checked(model, Plan((producer,), norm, consumer), units, occurrences)


def _gated(model: nn.Module, children: list[tuple[str, nn.Module]], producer: str, units: int
           ) -> tuple[str, str] | None:
    """(up, down) of a gated MLP, act(gate(x)) * up(x) -> down, as in LLaMA: the module running the
    activation holds exactly two layers with `units` outputs (the producer, the gate, is one), one
    layer reading `units`, and the three are distinct."""
    makers = [p for p, m in children if is_layer(m) and out_units(m) == units]
    readers = [p for p, m in children if is_layer(m) and in_units(m) == units]
    if len(makers) == 2 and producer in makers and len(readers) == 1 and readers[0] not in makers:
        return next(p for p in makers if p != producer), readers[0]
    return None


def _checked(model: nn.Module, p: Plan, units: int, occurrences: dict[int, int]) -> Plan:
    for path in (*p.rows, p.norm, p.consumer):
        if path is None:
            continue
        m = model.get_submodule(path)
        if occurrences.get(id(m), 0) > 1:
            raise Skip(f"{path!r} is used at several places in the model (shared weights)")
        for name, param in m.named_parameters(recurse=False):
            if occurrences.get(id(param), 0) > 1:
                raise Skip(f"{path}.{name} is shared with another layer (tied weights)")
            if type(param.data) is not torch.Tensor or isinstance(param, torch.Tensor) and param.is_meta:
                raise Skip(f"{path}.{name} is sharded or not materialised ({type(param.data).__name__}): "
                           f"its rows cannot be reset here")
    for path in p.rows:
        if out_units(model.get_submodule(path)) != units:
            raise Skip(f"its producer {path!r} does not have {units} outputs")
    if in_units(model.get_submodule(p.consumer)) != units:
        raise Skip(f"its consumer {p.consumer!r} does not read {units} units (grouped conv, or flattened maps)")
    if p.norm is not None:
        norm = model.get_submodule(p.norm)
        if not isinstance(norm, nn.modules.batchnorm._NormBase):
            raise Skip(f"{p.norm!r} ({type(norm).__name__}) normalises across units: a new row would change every "
                       f"unit's output")
        if norm.num_features != units:
            raise Skip(f"its norm {p.norm!r} does not have {units} channels")
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
        tmp = copy.copy(m)  # same class and sizes; its own parameters, on the CPU
        tmp._parameters = {name: nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for name, p in shapes.items()}
        tmp._buffers, tmp._modules = {}, {}
        tmp.reset_parameters()
        return {name: p.detach() for name, p in tmp._parameters.items()}


class Touched(NamedTuple):
    param: torch.Tensor
    dim: int
    index: torch.Tensor   # on the parameter's device


def renew(model: nn.Module, p: Plan, units: list[int], step: int, name: str) -> list[Touched]:
    """Draw the units' rows afresh and reset the norm's channels. Returns the parameter slices touched."""
    touched = []
    with torch.no_grad():
        for path in p.rows:
            m = model.get_submodule(path)
            new = fresh(m, seed(step, name, path))
            for pname, param in m.named_parameters(recurse=False):
                dim = _row_dim(m) if pname == "weight" else 0
                index = torch.tensor(units, dtype=torch.long, device=param.device)
                param.index_copy_(dim, index, new[pname].index_select(dim, index.cpu()).to(param.device))
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


def zero(model: nn.Module, p: Plan, units: list[int]) -> Touched:
    """Zero the consumer's weights that read the units (after every renew(): a consumer that is also a
    producer keeps these zeros)."""
    c = model.get_submodule(p.consumer)
    index = torch.tensor(units, dtype=torch.long, device=c.weight.device)
    with torch.no_grad():
        c.weight.index_fill_(_col_dim(c), index, 0.0)
    return Touched(c.weight, _col_dim(c), index)


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
    step - 1), so they have `window` steps to fire before they count as dead again, and their interval
    counts are emptied."""
    index = torch.tensor(units, dtype=torch.long, device=site.counters.device)
    site.buffer("last_fired").index_fill_(0, index, step - 1)
    for name in ("fired", "abs_sum", "near"):
        site.buffer(name).index_fill_(0, index, 0)


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

    def __init__(self, capture: Capture):
        self.capture = capture
        self.warned: set[Hashable] = set()

    def run(self, report: Report, optimizer: torch.optim.Optimizer | None, sites: Iterable[str] | None, which: str,
            step: int, max_fraction: float | None = None) -> dict[str, list[int]]:
        from . import sync

        layout = self.capture.layout()
        names = self.capture.names([key for key, _ in layout])
        by_name = {name: (key, site) for name, (key, site) in zip(names, layout)}
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
        todo: dict[str, tuple[Plan | None, list[int], str | None]] = {}
        for name in wanted:
            units = chosen(layers[name], which, max_fraction)
            if not units:
                continue
            key, site = by_name.get(name, (None, None))
            if key is None:
                todo[name] = (None, units, "it has not run in this process")
                continue
            try:
                todo[name] = (plan(self.capture, key, site.units, shared), units, None)
            except Skip as e:
                todo[name] = (None, units, str(e))
        if sync.distributed():  # every rank must recycle the same sites the same way
            import torch.distributed as dist

            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, {n: (tuple(p) if p else None, why) for n, (p, _, why) in todo.items()})
            for name, (p, units, why) in list(todo.items()):
                if any(g.get(name, (None, "absent"))[0] != (tuple(p) if p else None) for g in gathered):
                    whys = [g.get(name, (None, "it has not run there"))[1] for g in gathered]
                    todo[name] = (None, units, why or next((w for w in whys if w), "the ranks found other layers"))
        result: dict[str, list[int]] = {}
        for name, (p, units, why) in todo.items():
            if p is None and name not in self.warned:
                self.warned.add(name)
                warnings.warn(f"deadwatch: recycle: site {name!r} skipped: {why}", RuntimeWarning, stacklevel=4)
        plans = [(name, p, units) for name, (p, units, _) in todo.items() if p is not None]
        touched = [t for name, p, units in plans for t in renew(model, p, units, step, name)]
        touched += [zero(model, p, units) for _, p, units in plans]
        left = reset_state(optimizer, touched) if optimizer is not None else set()
        for name, _, units in plans:
            restart_counters(by_name[name][1], units, step)
            result[name] = units
        if left:
            warnings.warn(f"deadwatch: recycle: optimizer state not reset exactly: {'; '.join(sorted(left))}",
                          RuntimeWarning, stacklevel=4)
        return result
