"""Which axis of an activation's output holds its units (features, channels).

From the config's `unit_axis` when a pattern matches; else 0-d/1-d/2-d outputs are obvious; else the
op that produced the activation's input, read from the autograd graph (conv/batch norm -> dim 1,
linear/layer norm -> the last dim); without a graph, the layers registered next to the activation;
else (N, T, C) for 3-d and channels-first for the rest.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError


def _producer_axis(out: torch.Tensor) -> int | None:
    """Unit axis from the op that produced the activation's input: conv/batch-norm -> 1, linear/layer-norm -> -1."""
    seen, frontier = set(), [out.grad_fn]
    for _ in range(12):
        nxt = []
        for fn in frontier:
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            name = type(fn).__name__
            if "Permute" in name or "Transpose" in name:  # the producer's axes were moved: it cannot tell
                return None
            if "Convolution" in name or "BatchNorm" in name or "GroupNorm" in name or "InstanceNorm" in name:
                return 1
            if any(k in name for k in ("Addmm", "MmBackward", "Bmm", "Linear", "LayerNorm", "RmsNorm", "Embedding")):
                return -1
            nxt.extend(f for f, _ in fn.next_functions)
        frontier = nxt
    return None


_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _layer_axis(out: torch.Tensor, m: nn.Module) -> int | None:
    """1 if m is a conv / batch norm with out.shape[1] channels, -1 if a linear / layer norm with
    out.shape[-1] features, else None."""
    if isinstance(m, _CHANNELS_FIRST) and out.shape[1] == getattr(m, "out_channels", getattr(m, "num_features", None)):
        return 1
    if isinstance(m, nn.GroupNorm) and out.shape[1] == m.num_channels:
        return 1
    if isinstance(m, nn.Linear) and out.shape[-1] == m.out_features:
        return -1
    if isinstance(m, nn.LayerNorm) and out.shape[-1] == m.normalized_shape[-1]:
        return -1
    return None


def _neighbour_axis(out: torch.Tensor, context: nn.Module | None, module: nn.Module | None) -> int | None:
    """Unit axis from the layers around the activation: the nearest layer registered before it in
    its parent, else the layers of the parent (all agreeing)."""
    if context is None:
        return None
    children = list(context.children())
    if module is not None and any(c is module for c in children):
        for m in reversed(children[:next(i for i, c in enumerate(children) if c is module)]):
            axis = _layer_axis(out, m)
            if axis is not None:
                return axis
    for modules in (children, list(context.modules())):
        votes = {_layer_axis(out, m) for m in modules} - {None}
        if len(votes) == 1:
            return votes.pop()
    return None


def unit_axis(out: torch.Tensor, names: tuple[str, ...], config: Config, context: nn.Module | None = None,
              module: nn.Module | None = None) -> int:
    """The feature axis of an activation output, as a non-negative dim."""
    for pattern, dim in config.unit_axis:
        if any(re.search(pattern, name) for name in names):
            if not -out.ndim <= dim < out.ndim:
                raise ConfigError(f"unit_axis[{pattern!r}] = {dim} is out of range for site {names[-1]!r} with {out.ndim}-d output")
            return dim % out.ndim
    if out.ndim <= 1:
        return 0
    if out.ndim == 2:
        return 1
    axis = _producer_axis(out)
    if axis is None:  # no autograd graph (a no_grad forward): ask the neighbouring layers
        axis = _neighbour_axis(out, context, module)
    if axis is None:  # (N, T, C) sequences are the common 3-d case
        axis = -1 if out.ndim == 3 else 1
    return axis % out.ndim
