"""Capture: which activations are watched, where they run (sites), and which axis holds units.

A *site* is one place where an activation runs in forward: an activation module
call (`features.3`, or `layer1.0.relu#0`, `#1`, ... for a module called several
times per forward) or an activation function called inside some module's
forward (`relu#0`, `encoder.gelu#1`). Hooks only hand the output tensor to
stats.record(); nothing here reads tensor values.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn

from . import stats
from .config import Config
from .errors import ConfigError, DeadwatchError

# torch.nn activation modules that are not unit-wise activations.
_NOT_UNITWISE = {"MultiheadAttention", "Softmax", "Softmin", "Softmax2d", "LogSoftmax", "GLU",
                 "Threshold", "NonDynamicallyQuantizableLinear", "Module", "LinearActivation"}
# Where model libraries define their own activation modules.
_ACTIVATION_MODULE_PATHS = ("torch.nn.modules.activation", "transformers.activations",
                            "timm.layers.activations", "timm.models.layers.activations")


def is_activation(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith(_ACTIVATION_MODULE_PATHS) and cls.__name__ not in _NOT_UNITWISE


NONNEGATIVE = {"relu", "relu6", "relusquaredactivation"}  # kinds whose output is never negative


def fire_threshold(kind: str, beta: float = 1.0) -> float:
    """The activation's value at pre-activation 0: an output above it means pre-activation > 0."""
    kind = kind.lower()
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


class Site:
    """One place where an activation runs; its counters are views into stats.Counters buffers."""

    def __init__(self, name: str, kind: str, threshold: float, first_step: int):
        self.name = name            # provisional for call 0 of a module: see Capture.site_names()
        self.kind = kind
        self.threshold = threshold
        self.nonnegative = threshold == 0 and kind.lower() in NONNEGATIVE  # output can never be < 0
        self.subsample = 1          # counts on the first 1/subsample of the batch
        self.seen = -1              # the counters' fold_count when this site last ran
        self.first_step = first_step
        self.units = 0
        self.ndim = 0
        self.axis = 0
        self.dims: tuple[int, ...] = ()
        self.observations = 0       # values seen per unit in the current interval (completed steps)
        self.step_observations = 0  # ... in the step now running
        self.offset = 0             # first unit in its device's flat buffers
        self.counters: stats.Counters | None = None
        self.step_max: torch.Tensor | None = None
        self.step_fired: torch.Tensor | None = None
        self.warned = False


# ---- activation functions called inside forward -------------------------------------------
# One set of wrappers for the whole process, shared by every active Capture: installed
# when the first capture attaches, the originals put back when the last one closes.

def _function_targets(name: str) -> list[tuple[Any, str]]:
    targets = [(torch.nn.functional, name)]
    if name in ("relu", "selu", "celu", "rrelu", "tanh", "sigmoid"):
        targets.append((torch, name))
    if name in ("relu", "leaky_relu", "elu", "celu", "selu", "rrelu"):
        targets.append((torch.nn.functional, name + "_"))
    if name in ("relu", "selu", "celu", "rrelu"):
        targets.append((torch, name + "_"))
    return [(ns, attr) for ns, attr in targets if hasattr(ns, attr)]


class _FunctionPatch:
    def __init__(self) -> None:
        self.captures: list[Capture] = []
        self.originals: dict[tuple[int, str], tuple[Any, Callable]] = {}
        self.wrappers: dict[int, Callable] = {}  # id(original function) -> its wrapper
        self.imported: dict[tuple[int, str], tuple[dict, Any]] = {}  # names imported into model code, swapped
        self.busy = False  # F.relu calls torch.relu: count the outer call only

    def attach(self, capture: Capture) -> None:
        self.captures.append(capture)
        for fn_name in capture.config.functions:
            for ns, attr in _function_targets(fn_name):
                key = (id(ns), attr)
                if key not in self.originals:
                    original = getattr(ns, attr)
                    self.originals[key] = (ns, original)
                    self.wrappers[id(original)] = self._wrap(fn_name, original)
                    setattr(ns, attr, self.wrappers[id(original)])

    def detach(self, capture: Capture) -> None:
        if capture in self.captures:
            self.captures.remove(capture)
        if not self.captures:
            for (_, attr), (ns, original) in self.originals.items():
                setattr(ns, attr, original)
            for (_, name), (namespace, original) in self.imported.items():
                namespace[name] = original
            self.originals.clear()
            self.wrappers.clear()
            self.imported.clear()
            self.busy = False

    def _wrap(self, fn_name: str, original: Callable) -> Callable:
        patch = self

        @functools.wraps(original)
        @torch.compiler.disable
        def activation(*args: Any, **kwargs: Any) -> Any:
            if patch.busy or not patch.captures:
                return original(*args, **kwargs)
            patch.busy = True
            try:
                out = original(*args, **kwargs)
            finally:
                patch.busy = False
            module = calling_module(sys._getframe(1))
            if module is not None and not is_activation(module):  # F.relu inside nn.ReLU: the module's own site
                for capture in patch.captures:
                    if fn_name in capture.functions and id(module) in capture.paths:
                        capture.on_function(fn_name, out, module, args, kwargs)
            return out

        activation.__deadwatch_original__ = original  # type: ignore[attr-defined]
        return activation


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


_PATCH = _FunctionPatch()
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module of every watched model


def active_function_patches() -> int:
    """How many torch functions are wrapped right now (0 once every monitor has closed)."""
    return len(_PATCH.originals)


class Capture:
    """Hooks on one model: finds sites, decides which calls count, hands outputs to stats."""

    def __init__(self, model: nn.Module, config: Config, counters: stats.Registry, step: Callable[[], int]):
        # watch(torch.compile(model)): hook the original module, so site names carry no "_orig_mod."
        self.model = getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model
        self.config = config
        self.functions = frozenset(config.functions)
        self.registry = counters
        self.step = step
        self.depth = 0                     # > 0 while a forward of one of the model's modules runs
        self.active = True                 # False on the steps watch_every skips
        self.calls: dict[Any, int] = {}    # calls per module / (module, function) in this forward
                                           # (since the outermost module call began)
        self.sites: dict[Any, Site | None] = {}   # None: seen, but include/exclude says no
        self.paths: dict[int, tuple[str, bool]] = {}  # id(module) -> (path, is an activation module)
        self.thresholds: dict[int, float] = {}        # id(activation module) -> its output at 0
        self.handles: list[Any] = []
        self.swapped: list[tuple[dict, str, Any]] = []  # (namespace dict, name, original value)
        self.multi_call: set[str] = set()  # module paths called more than once per forward
        self.pending: dict[str, dict] = {}  # saved counters (load_state_dict) of sites not run yet
        self._include = [re.compile(p) for p in config.include]
        self._exclude = [re.compile(p) for p in config.exclude]

    # -- attach / detach
    def attach(self) -> None:
        taken = [path or "the model itself" for path, m in self.model.named_modules() if m in _WATCHED]
        if taken:
            raise DeadwatchError(f"this model is already watched by another deadwatch monitor "
                                 f"(at least {taken[0]!r}); close that one first: one monitor per model")
        try:
            for path, module in self.model.named_modules():
                act = is_activation(module)
                self.paths[id(module)] = (path, act)
                _WATCHED.add(module)
                if act:
                    self.thresholds[id(module)] = module_threshold(module)
                    self.handles.append(module.register_forward_hook(functools.partial(self._on_module, path)))
                elif module is self.model or _may_call_activations(module):
                    # A forward starts when the loop calls any of these, not only the root: a Lightning
                    # training_step calls self.net(x), a VAE loop model.encoder(x).
                    self.handles.append(module.register_forward_pre_hook(self._enter))
                    self.handles.append(module.register_forward_hook(self._leave, always_call=True))
            if self.functions:
                _PATCH.attach(self)
                self._swap_stored_functions()
        except BaseException:
            self.detach()
            raise

    def _swap_stored_functions(self) -> None:
        """Activation functions taken before the patch still point at the originals: attributes of
        modules (nn.TransformerEncoderLayer keeps F.gelu in self.activation, also as a functools.partial)
        and names imported into the model code's modules (`from torch.nn.functional import relu`).
        Point them at the wrappers until detach."""
        def wrapped(value: Any) -> Any:
            if isinstance(value, functools.partial):
                inner = wrapped(value.func)
                return None if inner is None else functools.partial(inner, *value.args, **value.keywords)
            wrapper = _PATCH.wrappers.get(id(value)) if callable(value) else None
            return wrapper if getattr(wrapper, "__deadwatch_original__", None) is value else None

        # Python modules may define classes of several watched models: their names go back when the
        # last monitor closes (the patch does it); module attributes go back when this one does.
        code_modules, instances = {}, []
        for module in self.model.modules():
            for cls in type(module).__mro__:
                if not cls.__module__.startswith(("torch.", "builtins")) and cls.__module__ in sys.modules:
                    code_modules[cls.__module__] = vars(sys.modules[cls.__module__])
            if not is_activation(module):
                instances.append(vars(module))
        for shared, namespaces in ((True, code_modules.values()), (False, instances)):
            for namespace in namespaces:
                for name, value in list(namespace.items()):
                    replacement = wrapped(value)
                    if replacement is None:
                        continue
                    if shared:
                        _PATCH.imported[(id(namespace), name)] = (namespace, value)
                    else:
                        self.swapped.append((namespace, name, value))
                    namespace[name] = replacement

    def detach(self) -> None:
        for module in self.model.modules():
            if id(module) in self.paths:
                _WATCHED.discard(module)
        for namespace, name, original in reversed(self.swapped):
            namespace[name] = original
        self.swapped.clear()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        _PATCH.detach(self)
        self.depth = 0

    def new_step(self, step: int) -> None:
        self.calls.clear()
        self.active = step % self.config.watch_every == 0

    # -- hooks
    @torch.compiler.disable
    def _enter(self, module: nn.Module, args: Any) -> None:
        if self.depth == 0 and not _in_backward():
            self.calls.clear()
        self.depth += 1

    @torch.compiler.disable
    def _leave(self, module: nn.Module, args: Any, out: Any) -> None:
        self.depth = max(self.depth - 1, 0)

    @torch.compiler.disable  # under torch.compile: a graph break, the hook runs eagerly on real tensors
    def _on_module(self, path: str, module: nn.Module, args: Any, out: Any) -> None:
        if not self.active or _in_backward():  # recomputation of a checkpointed segment: already counted in forward
            return
        if self.depth == 0:  # called by the loop itself, outside any forward of the model: a forward of its own
            self.calls.clear()
        key = id(module)
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        if call:
            self.multi_call.add(path)
        if not (module.training or self.config.count_eval) or not isinstance(out, torch.Tensor):
            return
        site_key = (path, call)
        site = self.sites.get(site_key, False)
        if site is False:
            names = (f"{path}#{call}", path) if call == 0 else (f"{path}#{call}",)
            kind = type(module).__name__
            parent = self.model.get_submodule(path.rpartition(".")[0]) if path else None
            site = self._new_site(site_key, names, kind, self.thresholds[key], out, parent, module)
        if site is not None:
            stats.record(site, out)

    def on_function(self, fn_name: str, out: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """An activation function called by a method of `module`, one of this model's modules."""
        if not self.active or _in_backward() or not isinstance(out, torch.Tensor):
            return
        if self.depth == 0:  # e.g. F.relu in a LightningModule's training_step: a forward of its own
            self.calls.clear()
        path = self.paths[id(module)][0]
        key = (id(module), fn_name)
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        if not (module.training or self.config.count_eval):
            return
        site_key = (path, fn_name, call)
        site = self.sites.get(site_key, False)
        if site is False:
            name = f"{path}.{fn_name}#{call}" if path else f"{fn_name}#{call}"
            beta = kwargs.get("beta", args[1] if fn_name == "softplus" and len(args) > 1 else 1.0)
            site = self._new_site(site_key, (name,), fn_name, fire_threshold(fn_name, beta), out, module)
        if site is not None:
            stats.record(site, out)

    # -- sites
    def _wanted(self, names: tuple[str, ...]) -> bool:
        if self._include and not any(p.search(n) for p in self._include for n in names):
            return False
        return not any(p.search(n) for p in self._exclude for n in names)

    def _new_site(self, key: Any, names: tuple[str, ...], kind: str, threshold: float, out: torch.Tensor,
                  context: nn.Module | None, module: nn.Module | None = None) -> Site | None:
        site = None
        if self._wanted(names) and out.is_floating_point() and out.ndim >= 2:
            site = Site(names[-1], kind, threshold, self.step())
            site.subsample = self.config.count_subsample
            self.registry.add(site, out, unit_axis(out, names, self.config, context, module))
            self._restore(site, names)
        self.sites[key] = site
        return site

    def _restore(self, site: Site, names: tuple[str, ...]) -> None:
        for name in names:
            saved = self.pending.pop(name, None)
            if saved is None:
                continue
            if saved["units"] != site.units:
                warnings.warn(f"deadwatch: site {name!r} had {saved['units']} units in the checkpoint and has "
                              f"{site.units} now; its counters start over", RuntimeWarning, stacklevel=4)
            else:
                self.registry.restore(site, saved)
            return

    def load(self, sites: dict[str, dict]) -> None:
        """Saved counters by site name: applied now to sites that exist, to the others when they first run."""
        self.pending = dict(sites)
        for name, site in self.site_names():
            self._restore(site, (name,))

    def layout(self) -> list[tuple[str, Site]]:
        """Watched sites in the order they first ran, under raw names that do not depend on how often
        a module ran (`m|path|call`, `f|name`): ranks compare these before names are final."""
        out = []
        for key, site in self.sites.items():
            if site is not None:
                out.append((f"m|{key[0]}|{key[1]}" if len(key) == 2 else f"f|{site.name}", site))
        return out

    def names(self, raws: list[str]) -> list[str]:
        """Final site names: `path` for a module called once per forward (on every rank), else `path#k`."""
        multi = set(self.multi_call)
        multi.update(raw[2:].rsplit("|", 1)[0] for raw in raws if raw.startswith("m|") and raw.rsplit("|", 1)[1] != "0")
        return [display(raw, multi, type(self.model).__name__) for raw in raws]

    def site_names(self) -> list[tuple[str, Site]]:
        """This process's sites with their final names."""
        layout = self.layout()
        named = list(zip(self.names([raw for raw, _ in layout]), (site for _, site in layout)))
        for name, site in named:
            site.name = name
        return named


def display(raw: str, multi: set[str], root: str) -> str:
    """The name a raw site name shows under: see Capture.layout()."""
    if raw.startswith("f|"):
        return raw[2:]
    path, call = raw[2:].rsplit("|", 1)  # a ModuleDict key may hold "|": the call number is after the last
    return f"{path}#{call}" if path in multi else (path or root)


def _may_call_activations(module: nn.Module) -> bool:
    """Containers and modules of user code; torch.nn's leaf layers (Linear, Conv, norms) call no activation."""
    return next(module.children(), None) is not None or not type(module).__module__.startswith("torch.")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def warn_once(site: Site, message: str) -> None:
    if not site.warned:
        site.warned = True
        warnings.warn(f"deadwatch: site {site.name!r}: {message}", RuntimeWarning, stacklevel=3)
