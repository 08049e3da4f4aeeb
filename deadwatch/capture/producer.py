"""The layer that feeds an activation, read once from the autograd graph when a site is found.

From the activation's output, the graph leads back through the op that made its input (addmm,
convolution, a norm's affine) to the parameters of that op: the first 1-d parameter with one value
per unit is the producer's bias. Further back, the output of another watched site is the input
that feeds this one. Used by the report path (causes), never by the hook path. The layers around a
site (the layer feeding it, a norm between, the site that layer reads) are read the same way, for
Monitor.recycle().
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator, NamedTuple

import torch

DEPTH = 12  # graph nodes to look back: enough for view/permute/dropout between layer and activation


def _edges(out: torch.Tensor, depth: int) -> Iterator[Any]:
    """The graph nodes behind `out`, breadth first, `depth` levels back."""
    frontier, seen = [out.grad_fn], set()
    for _ in range(depth):
        nxt = []
        for fn in frontier:
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            for child, _ in fn.next_functions:
                yield child
                nxt.append(child)
        frontier = nxt


def find_bias(out: torch.Tensor, units: int, params: dict[int, str]) -> tuple[torch.nn.Parameter, str] | None:
    """(the bias parameter feeding `out`'s units, its name in the model), or None without a graph."""
    for node in _edges(out, DEPTH):
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf, i.e. a parameter
        if var is not None and var.ndim == 1 and var.numel() == units and id(var) in params:
            return var, params[id(var)]
    return None


def neighbour_bias(module: torch.nn.Module | None, context: torch.nn.Module | None, units: int,
                   params: dict[int, str]) -> tuple[torch.nn.Parameter, str] | None:
    """Without a graph (a no_grad or reentrant-checkpointed forward): the nearest layer registered before the
    activation in its parent whose bias has one value per unit, else the only such layer of the parent."""
    if context is None:
        return None
    children = list(context.children())

    def bias_of(m: torch.nn.Module) -> torch.nn.Parameter | None:
        b = getattr(m, "bias", None)
        ok = isinstance(b, torch.nn.Parameter) and b.ndim == 1 and b.numel() == units and id(b) in params
        return b if ok else None

    if module is not None and any(c is module for c in children):
        for m in reversed(children[:next(i for i, c in enumerate(children) if c is module)]):
            b = bias_of(m)
            if b is not None:
                return b, params[id(b)]
    found = [b for b in map(bias_of, children) if b is not None]
    return (found[0], params[id(found[0])]) if len(found) == 1 else None


def find_input_site(out: torch.Tensor, outputs: dict[Any, Hashable]) -> Hashable | None:
    """The site whose output (its grad_fn, in `outputs`) `out` was computed from, nearest first."""
    return next((outputs[node] for node in _edges(out, 3 * DEPTH) if node is not None and node in outputs), None)


# -- the layers around a site, for Monitor.recycle() (recycle.py)

# Autograd ops between a layer and its activation that keep each unit's values its own: views and
# copies, dropout, and (with a single input that needs grad) scaling or shifting by a constant.
THROUGH = ("ViewBackward", "UnsafeViewBackward", "ReshapeAlias", "CloneBackward", "NativeDropoutBackward",
           "ToCopyBackward", "AliasBackward", "MulBackward", "DivBackward", "AddBackward1", "SubBackward1")
SUMS = ("AddBackward0", "SubBackward0")  # a tensor added: a residual connection, even when it needs no grad


class Layers(NamedTuple):
    """What the graph says about the layers around a site, read when the site is first seen."""

    producer: str | None    # module path of the layer feeding the activation
    norm: str | None        # module path of a norm between it and the activation
    reads: Hashable | None  # the earlier site whose output the producer reads straight
    why: str | None         # why the producer could not be told (then producer is None)


def is_norm(m: torch.nn.Module) -> bool:
    return isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)) or \
        type(m).__name__.endswith("RMSNorm")


def _grad_inputs(node: Any, params: dict[int, str]) -> tuple[list[Any], list[torch.Tensor]]:
    """A node's inputs that need grad, split into other nodes and the model's parameters (also through
    the transpose addmm takes of a Linear weight)."""
    nodes, found = [], []
    for child, _ in node.next_functions:
        if child is None:
            continue
        var = getattr(child, "variable", None)
        if var is None and type(child).__name__.startswith(("TBackward", "TransposeBackward", "PermuteBackward")):
            leaf = [c for c, _ in child.next_functions if c is not None]
            var = getattr(leaf[0], "variable", None) if len(leaf) == 1 else None
        if var is not None and id(var) in params:
            found.append(var)
        else:
            nodes.append(child)
    return nodes, found


def _through(node: Any, params: dict[int, str]) -> tuple[Any, str | None]:
    """Follow ops that keep units apart; the first other node, or why the walk stopped."""
    for _ in range(3 * DEPTH):
        name = type(node).__name__ if node is not None else ""
        if name.startswith(SUMS):
            return None, "its input is a sum of tensors (a residual add)"
        if node is None or not name.startswith(THROUGH):
            return node, None
        nodes, found = _grad_inputs(node, params)
        if found or len(nodes) != 1:
            return None, "its input is a product of tensors that both need grad (a gate?)"
        node = nodes[0]
    return None, "no layer found near it in the autograd graph"


def layers_around(out: torch.Tensor, model: torch.nn.Module, params: dict[int, str],
                  outputs: dict[Any, Hashable]) -> Layers:
    """The layer (and norm) feeding `out`'s activation, and the site (in `outputs`, by grad_fn) that layer reads."""
    if out.grad_fn is None:
        return Layers(None, None, None, "it first ran without an autograd graph (no_grad?)")
    try:
        return _layers(out, model, params, outputs)
    except Exception as e:  # the graph of an exotic op: no recycling there, never a failed forward
        return Layers(None, None, None, f"its autograd graph could not be read ({e})")


def _module_of(params: dict[int, str], found: list[torch.Tensor]) -> str | None:
    paths = {params[id(p)].rpartition(".")[0] for p in found}
    return paths.pop() if len(paths) == 1 else None


def _layers(out: torch.Tensor, model: torch.nn.Module, params: dict[int, str], outputs: dict[Any, Hashable]) -> Layers:
    nodes, found = _grad_inputs(out.grad_fn, params)
    if found:
        return Layers(None, None, None, "the activation has parameters of its own (PReLU?)")
    node = nodes[0] if len(nodes) == 1 else _only_layer(out.grad_fn, params, outputs)
    if node is None:
        return Layers(None, None, None, "the activation reads several tensors")
    norm = None
    for _ in range(2):  # the layer, or a norm and then the layer
        node, why = _through(node, params)
        if why is not None:
            return Layers(None, norm, None, why)
        if node is None:
            return Layers(None, norm, None, "no layer with parameters feeds it")
        inputs, found = _grad_inputs(node, params)
        path = _module_of(params, found) if found else None
        if path is None:
            return Layers(None, norm, None,
                          f"no single layer feeds it (a {type(node).__name__.removesuffix('Backward0')} op)")
        if is_norm(model.get_submodule(path)) and norm is None:
            norm = path
            if len(inputs) != 1:
                return Layers(None, norm, None, "its norm reads several tensors")
            node = inputs[0]
            continue
        if len(inputs) > 1:
            return Layers(None, norm, None, f"its layer {path!r} reads several tensors")
        reads = None
        if inputs:
            source, _ = _through(inputs[0], params)
            reads = outputs.get(source) if source is not None else None
        return Layers(path, norm, reads, None)
    return Layers(None, norm, None, "two norms between the layer and the activation")


def _stops(fn: Any, params: dict[int, str], outputs: dict[Any, Hashable]) -> Iterator[Any]:
    """Breadth first back from `fn`, through neither layers (nodes reading parameters) nor other sites'
    outputs: yields each of those where the walk stops, then None if it ran out of depth first."""
    frontier, seen = [fn], set()
    for _ in range(3 * DEPTH):
        nxt = []
        for node in frontier:
            if node is None or node in seen:
                continue
            seen.add(node)
            if node is not fn and node in outputs:
                yield node
                continue
            nodes, found = _grad_inputs(node, params)
            if found:
                yield node
            else:
                nxt.extend(nodes)
        frontier = nxt
        if not frontier:
            return
    yield None


def _only_layer(fn: Any, params: dict[int, str], outputs: dict[Any, Hashable]) -> Any:
    """An activation made of several ops (transformers' NewGELUActivation: 0.5 * x * (1 + tanh(...))): the
    one layer node that every path back from its output reaches, or None."""
    stops = set(_stops(fn, params, outputs))
    if None in stops or any(node in outputs for node in stops) or len(stops) != 1:
        return None
    return stops.pop()


def reaching_sites(out: torch.Tensor, params: dict[int, str], outputs: dict[Any, Hashable]) -> list[Hashable]:
    """Earlier sites whose output reaches `out`'s pre-activation without a layer in between: their units
    also feed an add or a product, which zeroing one layer's columns does not cover."""
    if out.grad_fn is None:
        return []
    return [outputs[node] for node in _stops(out.grad_fn, params, outputs) if node is not None and node in outputs]
