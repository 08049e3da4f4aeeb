"""The hooks a Capture keeps on one model, the sites they find and the names sites are reported under.

A *site* is one place where an activation runs in forward: an activation module call, or an
activation function called by one of the model's modules. Its key is (module path, function or
None, call number within the forward). Hooks only hand the output tensor to stats.record();
nothing here reads tensor values. Under torch.compile the same hooks are traced into the graph;
compiled.py holds what differs there.
"""

from __future__ import annotations

import functools
import re
import warnings
import weakref
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from .. import stats
from ..config import Config
from ..errors import DeadwatchError
from .activations import NONNEGATIVE, fire_threshold, is_activation, module_threshold, output_bounds
from . import compiled
from .axis import unit_axis
from .functions import PATCH

_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module of every watched model
PRUNE_AFTER = 2  # steps with every boundary hooked before the unneeded ones go (Capture._prune)


class SiteKey(NamedTuple):
    """Where a site is: the same on every rank and in every forward, whatever it ends up named."""

    path: str              # the module's path in the model ("" for the root)
    function: str | None   # the activation function's name, None for an activation module
    call: int              # which call of that module (or of that function by that module) in one forward

    def __str__(self) -> str:
        if self.function is None:
            return f"{self.path}#{self.call}"
        return f"{self.path}.{self.function}#{self.call}" if self.path else f"{self.function}#{self.call}"


class Capture:
    """Hooks on one model: finds sites, decides which calls count, hands outputs to stats."""

    def __init__(self, model: nn.Module, config: Config, registry: stats.Registry, step: Callable[[], int]):
        # watch(torch.compile(model)): hook the original module, so site names carry no "_orig_mod."
        self.model = getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model
        self.config = config
        self.functions = frozenset(config.functions)
        self.registry = registry
        self.step = step
        self.depth = 0                     # > 0 while a forward of one of the model's modules runs
        self.active = True                 # False on the steps watch_every skips
        self.calls: dict[Any, int] = {}    # calls per module / (module, function) since the outermost call began
        self.stack: list[nn.Module] = []   # the modules whose forward is running, innermost last
        self.deferred: list[tuple[stats.Site, torch.Tensor, torch.Tensor | None]] = []  # compiled: to record
        self.held: list[tuple] = []        # compiled: function calls waiting for the next hook (waiting())
        self.unseen: dict[SiteKey, bool] = {}  # sites a compiled graph met before any eager step found them
        self.tries: dict[SiteKey, int] = {}    # eager steps run to find each of those
        self.sites: dict[SiteKey, stats.Site | None] = {}   # None: seen, but not watched (include/exclude, dtype)
        self.paths: dict[int, tuple[str, bool]] = {}  # id(module) -> (path, is an activation module)
        # Told of each watched site's output when it is first found, and of what the outermost forward
        # returns while some are waiting (sitemap.SiteMap: the layers around each site, read from the graph).
        self.sitemap: Any = None
        self.thresholds: dict[int, float] = {}        # id(activation module) -> its output at 0
        self.handles: list[Any] = []
        # Boundaries: the pre/forward hooks that tell where a forward starts (its calls are numbered from
        # there) and, in traced code, which module owns a function call (the stack). Every module that may
        # call activations has them for the first PRUNE_AFTER steps; then only those a numbering needs keep
        # them (see _prune): each hooked module call costs about what a no-op hook does.
        self.boundaries: dict[int, tuple[str, list[Any]]] = {}  # id(module) -> (path, its two handles)
        self.entries: set[int] = set()     # modules the loop called outside any forward: forwards start there
        self.owners: set[int] = set()      # modules that called an activation function
        self.pruned = False                # only the boundaries a numbering needs are hooked
        self.keep_all = False              # never prune (a loop that calls activations itself; a surprise)
        self.surprised = False             # pruned, and a call came where the kept hooks did not expect it
        self.traced = False                # a compiled graph traced the hooks: they stay as traced
        self.swapped: list[tuple[dict, str, Any]] = []  # (namespace dict, name, original value)
        self.multi_call: set[str] = set()  # module paths called more than once per forward
        self.published: dict[SiteKey, str] = {}  # names once reported: a site keeps its name for the run
        self.pending: dict[str, dict] = {}  # saved counters (load_state_dict) of sites not run yet
        self.mask: torch.Tensor | None = None  # real positions of the next forward (Monitor.mask)
        self.mask_held = False             # True inside `with monitor.mask(...)`: the mask outlives one forward
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
                act = is_activation(module, self.config.extra_classes)
                self.paths[id(module)] = (path, act)
                _WATCHED.add(module)
                if act:
                    self.thresholds[id(module)] = module_threshold(module)
                    self.handles.append(module.register_forward_hook(functools.partial(self._on_module, path)))
                elif self._is_boundary(module):
                    self._hook_boundary(path, module)
            if self.functions:
                PATCH.attach(self)
                self.swapped = PATCH.swap_stored(self.model, self.config.extra_classes)
            compiled.EAGER.want(self, True)  # the first step finds the sites eagerly, compiled or not
        except BaseException:
            self.detach()
            raise

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
        for _, handles in self.boundaries.values():
            for handle in handles:
                handle.remove()
        self.boundaries.clear()
        PATCH.detach(self)
        compiled.EAGER.want(self, False)
        self.depth = 0
        self.stack.clear()
        self.deferred.clear()
        self.held.clear()
        self.mask = None
        if self.sitemap is not None:
            self.sitemap.forward_done(None)  # sites found in a forward that never returned: no references kept

    def _is_boundary(self, module: nn.Module) -> bool:
        """A forward may start at this module: the loop calls any of these, not only the root (a Lightning
        training_step calls self.net(x), a VAE loop model.encoder(x)). Activation modules are sites."""
        return not self.paths[id(module)][1] and (module is self.model or _may_call_activations(module))

    def _hook_boundary(self, path: str, module: nn.Module) -> None:
        self.boundaries[id(module)] = (path, [module.register_forward_pre_hook(self._enter),
                                              module.register_forward_hook(self._leave, always_call=True)])

    def _prune(self, step: int) -> None:
        """Between steps: after PRUNE_AFTER steps with every boundary hooked, keep only those the numbering
        of calls needs. Calls are numbered per forward, from where it starts; a call outside any hooked
        module starts a forward of its own and is call 0. So the hooks stay on the model itself, on every
        module the loop entered (entries), on every module that called an activation function (owners: a
        traced graph finds them on the stack), and on the ancestors of every module whose calls are
        numbered past 0 in one forward (a module called twice, an owner calling a function twice):
        whatever module a later loop enters, a call it makes outside the kept hooks is then the only call
        of its site in that forward, numbered 0 as with every hook in place. A call the kept hooks did
        not foresee (an activation or a new owner outside any hooked module), or a compiled graph traced
        on the pruned hooks, hooks every module again, for good, from the next step (a compiled model
        then compiles once more)."""
        if self.surprised or (self.pruned and self.traced):  # a graph traced on the pruned hooks would keep
            # every activation until the model's forward returns (compiled.record runs at the next hook)
            self.surprised, self.pruned, self.keep_all = False, False, True
            for path, module in self.model.named_modules():
                if id(module) not in self.boundaries and self._is_boundary(module):
                    self._hook_boundary(path, module)
            return
        if self.pruned or self.keep_all or self.traced or self.depth or step < PRUNE_AFTER:
            return
        numbered = {key.path for key in self.sites if key.call} | self.multi_call
        kept = self.entries | self.owners | {id(self.model)}
        for key, (path, handles) in list(self.boundaries.items()):
            if key in kept or not path or any(p == path or p.startswith(path + ".") for p in numbered):
                continue
            for handle in handles:
                handle.remove()
            del self.boundaries[key]
        self.pruned = True

    def _unforeseen(self) -> None:
        """An activation ran outside any hooked module (eager): before pruning, the loop calls activations
        itself, so every boundary stays; after, hook them all again (see _prune)."""
        if self.pruned:
            self.surprised = True
        else:
            self.keep_all = True

    def new_step(self, step: int) -> None:
        self._prune(step)
        self.calls.clear()
        if self.sitemap is not None and self.sitemap.pending:
            self.sitemap.forward_done(None)  # found outside any forward of the model (a loop's F.relu)
        self.active = step % self.config.watch_every == 0
        if not self.mask_held:
            self.mask = None
        compiled.EAGER.want(self, self._look_eagerly())

    def _look_eagerly(self) -> bool:
        """Whether the next step must run eagerly: a compiled graph met sites that no eager step has found
        yet. Each gets compiled.ATTEMPTS eager steps; one still not found is not watched."""
        wanted = False
        for key in self.unseen:
            if key in self.sites:
                continue
            tries = self.tries[key] = self.tries.get(key, 0) + 1
            if tries <= compiled.ATTEMPTS:
                wanted = True
            else:
                self.sites[key] = None
                warnings.warn(f"deadwatch: site {str(key)!r} ran only in compiled graphs, never in the "
                              f"{compiled.ATTEMPTS} eager steps run to find it: it is not watched",
                              RuntimeWarning, stacklevel=4)
        self.unseen.clear()
        return wanted

    # -- hooks (traced into the graph under torch.compile: see compiled.py)
    def _enter(self, module: nn.Module, args: Any) -> None:
        if self.held:
            self.resolve()
        if self.depth == 0 and (torch.compiler.is_dynamo_compiling() or not _in_backward()):
            self.calls.clear()
            if not self.pruned and not torch.compiler.is_dynamo_compiling():
                self.entries.add(id(module))
        self.depth += 1
        self.stack.append(module)

    def _pop(self, module: nn.Module) -> None:
        while self.stack and self.stack.pop() is not module:
            pass  # a forward inside it raised: its entries are stale

    def flush(self) -> None:
        """Record the outputs a compiled graph met (Capture.deferred): when the module that ran them returns
        (see compiled.record) and, for any left, before the step is folded."""
        self.resolve()
        for site, output, mask in self.deferred:
            compiled.record(site, output, mask)
        self.deferred.clear()

    def waiting(self, fn_name: str, out: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Compiled: an activation function called while `module`'s forward runs. It may be the inside of an
        activation module (nn.ReLU.forward calls F.relu), which only the module's hook, next, can tell: so
        it waits for the next hook, which drops it if it returns the same tensor (see compiled.py)."""
        self.resolve()
        self.traced = True
        self.held.append((fn_name, out, module, args, kwargs))

    def resolve(self, returned: Any = None) -> None:
        """Count the function calls waiting (Capture.waiting), except one whose output an activation module
        returned: that module's site counts it."""
        for fn_name, out, module, args, kwargs in self.held:
            if out is not returned:
                self.on_function(fn_name, out, module, args, kwargs)
        self.held.clear()

    def _leave(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.deferred or self.held:
            self.flush()
        self.depth = max(self.depth - 1, 0)
        self._pop(module)
        if self.depth == 0 and not torch.compiler.is_dynamo_compiling() and self.sitemap is not None \
                and self.sitemap.pending and not _in_backward():
            self.sitemap.forward_done(out)  # the forward in which sites were first found has returned
        if self.depth == 0 and not self.mask_held and (torch.compiler.is_dynamo_compiling() or not _in_backward()):
            self.mask = None  # a mask is for one forward

    def _on_module(self, path: str, module: nn.Module, args: Any, out: Any) -> None:
        compiling = torch.compiler.is_dynamo_compiling()
        if self.held:
            self.resolve(returned=out)
        if not compiling and compiled.internal():
            return
        # recomputation of a checkpointed segment: already counted in forward
        if not self.active or (not compiling and _in_backward()):
            if not compiling and self.sitemap is not None and self.sitemap.blind and _in_backward():
                self.sitemap.recomputed((path, None), out)  # a reentrant checkpoint's graph, for the map
            return
        if self.depth == 0:  # called by the loop itself, outside any forward of the model: a forward of its own
            if not compiling:
                self._unforeseen()
            self.calls.clear()
        key = id(module)
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        if call:
            self.multi_call.add(path)
        if not (module.training or self.config.count_eval) or not isinstance(out, torch.Tensor):
            return
        site_key = SiteKey(path, None, call)
        site = self.sites.get(site_key, False)
        if compiling:
            self._traced(site_key, site, out)
            return
        if site is False:
            parent = self.model.get_submodule(path.rpartition(".")[0]) if path else None
            site = self._new_site(site_key, type(module).__name__, self.thresholds[key], out, parent, module,
                                  output_bounds(type(module).__name__, module))
        if site is not None:
            stats.record(site, out, self.mask)

    def _traced(self, key: SiteKey, site: stats.Site | None | bool, out: torch.Tensor) -> None:
        """A site's output met in a compiled graph: recorded when the module running it returns (see
        compiled.py); a site not found yet is found by an eager step."""
        self.traced = True
        if site is False:
            self.unseen[key] = True
        elif site is not None:
            self.deferred.append((site, out, self.mask))

    def on_function(self, fn_name: str, out: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """An activation function called by a method of `module`, one of this model's modules."""
        compiling = torch.compiler.is_dynamo_compiling()
        if not self.active or (not compiling and _in_backward()) or not isinstance(out, torch.Tensor):
            if not compiling and self.sitemap is not None and self.sitemap.blind and _in_backward() and \
                    isinstance(out, torch.Tensor):
                self.sitemap.recomputed((self.paths[id(module)][0], fn_name), out)  # as in _on_module
            return
        if not compiling and id(module) not in self.owners:
            self.owners.add(id(module))
            if self.pruned and id(module) not in self.boundaries:
                self.surprised = True  # a new owner: a traced graph would not find it on the stack
        if self.depth == 0:  # e.g. F.relu in a LightningModule's training_step: a forward of its own
            if not compiling:
                self._unforeseen()
            self.calls.clear()
        key = (id(module), fn_name)
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        if not (module.training or self.config.count_eval):
            return
        site_key = SiteKey(self.paths[id(module)][0], fn_name, call)
        site = self.sites.get(site_key, False)
        if compiling:
            self._traced(site_key, site, out)
            return
        if site is False:
            beta = kwargs.get("beta", args[1] if fn_name == "softplus" and len(args) > 1 else 1.0)
            site = self._new_site(site_key, fn_name, fire_threshold(fn_name, beta), out, module,
                                  bounds=output_bounds(fn_name))
        if site is not None:
            stats.record(site, out, self.mask)

    # -- sites
    def _wanted(self, names: tuple[str, ...]) -> bool:
        if self._include and not any(p.search(n) for p in self._include for n in names):
            return False
        return not any(p.search(n) for p in self._exclude for n in names)

    @staticmethod
    def _aliases(key: SiteKey) -> tuple[str, ...]:
        """The names a site answers to in include/exclude/unit_axis and checkpoints; the last is its
        usual name. The first call of a module answers to both `path#0` and `path`."""
        return (str(key), key.path) if key.function is None and key.call == 0 else (str(key),)

    def _new_site(self, key: SiteKey, kind: str, threshold: float, out: torch.Tensor,
                  context: nn.Module | None, module: nn.Module | None = None,
                  bounds: tuple[float, float] | None = None) -> stats.Site | None:
        site, names = None, self._aliases(key)
        if self._wanted(names) and out.is_floating_point() and out.ndim >= 2:
            nonnegative = threshold == 0 and kind.lower() in NONNEGATIVE
            site = stats.Site(names[-1], kind, threshold, nonnegative, self.step(), self.config.count_subsample,
                              bounds, self.config.saturation_eps, self.config.fused)
            self.registry.add(site, out, unit_axis(out, names, self.config, context, module))
            self._restore(site, names)
            if self.sitemap is not None:
                self.sitemap.found(key, out, site.positive)
        self.sites[key] = site
        return site

    def _restore(self, site: stats.Site, names: tuple[str, ...]) -> None:
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

    def load(self, sites: dict[str, dict]) -> list[str]:
        """Saved counters by site name: applied now to sites that exist, to the others when they first run.
        Returns the sites that exist now and had no saved counters."""
        self.pending = dict(sites)
        new = []
        for (key, site), name in zip(self.layout(), self.names([key for key, _ in self.layout()])):
            aliases = self._aliases(key)
            if not any(alias in self.pending for alias in aliases):
                new.append(name)
            self._restore(site, aliases)
        return new

    def layout(self) -> list[tuple[SiteKey, stats.Site]]:
        """Watched sites in the order they first ran, by key: ranks compare these before names are final."""
        return [(key, site) for key, site in self.sites.items() if site is not None]

    def names(self, keys: list[SiteKey], publish: bool = False) -> list[str]:
        """The names sites are reported under. A module called once per forward is `path`, one called
        several times `path#0`, `path#1`, ... (on any rank); a function `path.fn#k`. A name once
        reported (`publish`) is kept for the run: a module first reported as `path` that later runs
        twice per forward keeps `path` for its first call, the new one is `path#1`."""
        multi = set(self.multi_call) | {key.path for key in keys if key.function is None and key.call}
        root = type(self.model).__name__
        out = []
        for key in keys:
            name = self.published.get(key)
            if name is None:
                if key.function is not None:
                    name = str(key)
                else:
                    name = str(key) if key.path in multi else (key.path or root)
                if publish:
                    self.published[key] = name
            out.append(name)
        return out

    def site_names(self) -> list[tuple[str, stats.Site]]:
        """This process's sites with their names."""
        layout = self.layout()
        named = list(zip(self.names([key for key, _ in layout]), (site for _, site in layout)))
        for name, site in named:
            site.name = name
        return named

    def unwatched(self) -> str | None:
        """Why no site is watched, when none is: say it once after the first step."""
        if any(site is not None for site in self.sites.values()):
            return None
        seen = self.names(list(self.sites))
        if not seen:
            return ("no activation that deadwatch can see ran in a counted forward of the model: it watches "
                    "activation modules (torch.nn, transformers, timm, and the classes in activations.extra) and the "
                    f"functions in `functions` ({', '.join(sorted(self.functions)) or 'none'}), also as tensor "
                    "methods (x.relu()), in training mode unless count_eval is true")
        patterns = [f"include {list(self.config.include)}"] * bool(self.config.include) + \
                   [f"exclude {list(self.config.exclude)}"] * bool(self.config.exclude)
        if patterns:
            return f"no site is watched: {' and '.join(patterns)} left out every activation seen: {', '.join(seen)}"
        return f"no site is watched: the outputs of {', '.join(seen)} are not floating point or have fewer than 2 dims"


def _may_call_activations(module: nn.Module) -> bool:
    """Containers and modules of user code; torch.nn's leaf layers (Linear, Conv, norms) call no activation."""
    return next(module.children(), None) is not None or not type(module).__module__.startswith("torch.")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1
