"""Activation functions called inside forward (`F.relu`, `torch.relu`, `F.gelu`, `x.relu()`, ...).

One set of wrappers for the whole process, shared by every open Capture: installed when the first
capture attaches, the originals put back when the last one closes (or is garbage-collected: the
patch holds captures weakly, so a model and monitor dropped without close() are freed, and each
capture's finalizer lets go of the patch). A wrapper hands the output to the capture that owns the
calling module: the module whose method is nearest on the stack. Tensor methods (`x.relu()`,
`x.relu_()`, `x.sigmoid()`, `x.tanh()`) are wrapped the same way, on torch.Tensor.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from . import compiled
from .activations import is_activation

if TYPE_CHECKING:
    from .hooks import Capture


def _targets(name: str) -> list[tuple[Any, str]]:
    targets = [(torch.nn.functional, name)]
    if name in ("relu", "selu", "celu", "rrelu", "tanh", "sigmoid"):
        targets.append((torch, name))
    if name in ("relu", "leaky_relu", "elu", "celu", "selu", "rrelu"):
        targets.append((torch.nn.functional, name + "_"))
    if name in ("relu", "selu", "celu", "rrelu"):
        targets.append((torch, name + "_"))
    if name in TENSOR_METHODS:
        targets += [(torch.Tensor, name), (torch.Tensor, name + "_")]
    return [(ns, attr) for ns, attr in targets if hasattr(ns, attr)]


TENSOR_METHODS = ("relu", "sigmoid", "tanh")  # x.relu(), x.relu_(), ... wrapped on torch.Tensor


class FunctionPatch:
    def __init__(self) -> None:
        self.held: dict[int, weakref.ref[Capture]] = {}  # id(capture) -> the capture, held weakly
        self.originals: dict[tuple[int, str], tuple[Any, Callable]] = {}
        self.wrappers: dict[int, Callable] = {}  # id(original function) -> its wrapper
        self.imported: dict[tuple[int, str], tuple[dict, Any]] = {}  # names imported into model code, swapped
        self.local = threading.local()  # .busy: F.relu calls torch.relu: count the outer call only, per thread
        self.busy = False               # the same while dynamo traces a wrapper

    @property
    def captures(self) -> list[Capture]:
        return [c for c in (ref() for ref in list(self.held.values())) if c is not None]

    def attach(self, capture: Capture) -> None:
        if not self.originals:
            _load_compiler()
        # a capture collected without detach() (a model and monitor dropped) lets go of the patch too
        self.held[id(capture)] = weakref.ref(capture, lambda _, key=id(capture): self.release(key))
        for fn_name in capture.config.functions:
            for ns, attr in _targets(fn_name):
                key = (id(ns), attr)
                if key not in self.originals:
                    original = getattr(ns, attr)
                    self.originals[key] = (ns, original)
                    # a method's sites are its own (Tensor.relu#k): torch.compile puts x.relu() in its graph
                    # without calling the wrapper, and must not shift the numbering of F.relu's sites
                    label = f"Tensor.{fn_name}" if ns is torch.Tensor else fn_name
                    self.wrappers[id(original)] = self._wrap(fn_name, label, original)
                    setattr(ns, attr, self.wrappers[id(original)])

    def detach(self, capture: Capture) -> None:
        self.release(id(capture))

    def release(self, capture_id: int) -> None:
        """Let go of a capture (by id: also from its finalizer, once it is gone); the originals go back
        when no capture is left."""
        self.held.pop(capture_id, None)
        if not self.held:
            for (_, attr), (ns, original) in self.originals.items():
                setattr(ns, attr, original)
            for (_, name), (namespace, original) in self.imported.items():
                namespace[name] = original
            self.originals.clear()
            self.wrappers.clear()
            self.imported.clear()

    def _wrap(self, fn_name: str, label: str, original: Callable) -> Callable:
        patch = self

        @functools.wraps(original)
        def activation(*args: Any, **kwargs: Any) -> Any:
            # traced code keeps its flag on the patch (tracing runs in one thread; dynamo cannot trace a
            # threading.local); eager code per thread, so another thread's call never hides this one
            state = patch if torch.compiler.is_dynamo_compiling() else patch.local
            if getattr(state, "busy", False) or not patch.held or compiled.internal():
                return original(*args, **kwargs)
            state.busy = True
            try:
                out = original(*args, **kwargs)
            finally:
                state.busy = False
            captures = patch.captures
            if torch.compiler.is_dynamo_compiling():  # traced code cannot walk frames: see compiled.py
                for capture in captures:
                    if fn_name in capture.functions and capture.stack:
                        capture.waiting(label, out, capture.stack[-1], args, kwargs)
                return out
            module = calling_module(sys._getframe(1))
            if module is not None:
                for capture in captures:
                    known = capture.paths.get(id(module))  # (path, is an activation module)
                    # F.relu inside nn.ReLU (or a class in activations.extra): the module's own site counts it
                    if known is not None and not known[1] and fn_name in capture.functions:
                        capture.on_function(label, out, module, args, kwargs)
            return out

        activation.__deadwatch_original__ = original  # type: ignore[attr-defined]
        return activation

    def swap_stored(self, model: nn.Module, extra: tuple[type, ...] = ()) -> list[tuple[dict, str, Any]]:
        """Activation functions taken before the patch still point at the originals: attributes of
        modules (nn.TransformerEncoderLayer keeps F.gelu in self.activation, also as a functools.partial)
        and names imported into the model code's modules (`from torch.nn.functional import relu`).
        Point them at the wrappers. Returns the module attributes swapped, for the capture to put back
        when it closes; imported names go back when the last capture closes (a Python module may
        define classes of several watched models)."""
        def wrapped(value: Any) -> Any:
            if isinstance(value, functools.partial):
                inner = wrapped(value.func)
                return None if inner is None else functools.partial(inner, *value.args, **value.keywords)
            wrapper = self.wrappers.get(id(value)) if callable(value) else None
            return wrapper if getattr(wrapper, "__deadwatch_original__", None) is value else None

        code_modules, instances = {}, []
        for module in model.modules():
            for cls in type(module).__mro__:
                if not cls.__module__.startswith(("torch.", "builtins")) and cls.__module__ in sys.modules:
                    code_modules[cls.__module__] = vars(sys.modules[cls.__module__])
            if not is_activation(module, extra):
                instances.append(vars(module))
        swapped = []
        for shared, namespaces in ((True, code_modules.values()), (False, instances)):
            for namespace in namespaces:
                for name, value in list(namespace.items()):
                    replacement = wrapped(value)
                    if replacement is None:
                        continue
                    if shared:
                        self.imported[(id(namespace), name)] = (namespace, value)
                    else:
                        swapped.append((namespace, name, value))
                    namespace[name] = replacement
        return swapped


PATCH = FunctionPatch()


def _load_compiler() -> None:
    """torch._dynamo reads torch's functions (torch.relu, ...) when it is first imported: let it read the
    originals, not the wrappers, or a model compiled after this monitor closes cannot trace them."""
    import torch._dynamo  # noqa: F401


def calling_module(frame: Any) -> nn.Module | None:
    """The module whose method (forward, or a helper it calls) is nearest on the stack: the function's
    owner. Only that module counts, so another model called inside a watched forward is not watched."""
    while frame is not None:
        code = frame.f_code  # only methods can have a module as `self`: skip the rest without f_locals
        if code.co_argcount and code.co_varnames[0] == "self":
            obj = frame.f_locals.get("self")
            if isinstance(obj, nn.Module):
                return obj
        frame = frame.f_back
    return None


def active_function_patches() -> int:
    """How many torch functions are wrapped right now (0 once every monitor has closed)."""
    return len(PATCH.originals)
