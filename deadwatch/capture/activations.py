"""What deadwatch takes for an activation, and the value at which each one fires."""

from __future__ import annotations

import math

import torch
from torch import nn


# torch.nn activation modules that are not unit-wise activations.
_NOT_UNITWISE = {"MultiheadAttention", "Softmax", "Softmin", "Softmax2d", "LogSoftmax", "GLU",
                 "Threshold", "NonDynamicallyQuantizableLinear", "Module", "LinearActivation"}
# Where model libraries define their own activation modules.
_ACTIVATION_MODULE_PATHS = ("torch.nn.modules.activation", "transformers.activations",
                            "timm.layers.activations", "timm.models.layers.activations")


def is_activation(module: nn.Module, extra: tuple[type, ...] = ()) -> bool:
    """An activation module: torch.nn's, transformers' or timm's unit-wise ones, or an instance of a class
    named in the config's activations.extra (`extra`, imported)."""
    cls = type(module)
    if extra and isinstance(module, extra):
        return True
    return cls.__module__.startswith(_ACTIVATION_MODULE_PATHS) and cls.__name__ not in _NOT_UNITWISE


NONNEGATIVE = {"relu", "relu6", "relusquaredactivation", "tensor.relu"}  # kinds whose output is never negative


def fire_threshold(kind: str, beta: float = 1.0) -> float:
    """The activation's value at pre-activation 0: an output above it means pre-activation > 0."""
    kind = kind.lower().removeprefix("tensor.")  # a Tensor method's site: as its function
    if kind in ("sigmoid", "hardsigmoid"):
        return 0.5
    if kind == "softplus":
        return math.log(2.0) / beta
    if kind == "logsigmoid":
        return -math.log(2.0)
    return 0.0


def module_threshold(module: nn.Module) -> float:
    """The module's output at pre-activation 0: from the table for torch.nn's own classes, by
    running it once on a zero for other libraries' (LaplaceActivation(0) is not 0)."""
    kind = type(module).__name__
    if type(module).__module__.startswith("torch."):
        return fire_threshold(kind, getattr(module, "beta", 1.0))
    try:
        param = next(module.parameters(), None)
        zero = torch.zeros(1, 1, device=param.device if param is not None else "cpu")
        with torch.no_grad():
            value = float(module.forward(zero).flatten()[0])  # forward, not __call__: no hooks run
        return value if math.isfinite(value) else 0.0
    except Exception:
        return fire_threshold(kind)


# Activations with a bounded output: (lower, upper). Saturation is counted only at these sites.
BOUNDED = {"tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0), "sigmoid": (0.0, 1.0), "hardsigmoid": (0.0, 1.0),
           "relu6": (0.0, 6.0), "hardtanh": (-1.0, 1.0)}


def output_bounds(kind: str, module: nn.Module | None = None) -> tuple[float, float] | None:
    """The output range of a bounded activation, None for the others; Hardtanh (and ReLU6, its subclass)
    from the module's own min_val/max_val."""
    bounds = BOUNDED.get(kind.lower().removeprefix("tensor."))
    if bounds is not None and module is not None and hasattr(module, "min_val") and hasattr(module, "max_val"):
        bounds = (float(module.min_val), float(module.max_val))
    return bounds if bounds is not None and bounds[1] > bounds[0] else None
