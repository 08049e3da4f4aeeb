"""The layer that feeds an activation, read once from the autograd graph when a site is found.

From the activation's output, the graph leads back through the op that made its input (addmm,
convolution, a norm's affine) to the parameters of that op: the first 1-d parameter with one value
per unit is the producer's bias. Further back, the output of another watched site is the input
that feeds this one. Used by the report path (causes), never by the hook path.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator

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
