"""The Monitor: ties capture -> stats -> analysis -> reporters to one training loop."""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from . import analysis, causes, config as config_mod, stats, sync, updates
from .sitemap import SiteLayers, SiteMap
from .capture import Capture
from .config import FILE_REPORTERS, Config
from .errors import ConfigError, DeadwatchError
from .reporters import Reporter


def watch(model: nn.Module, config: Config | str | os.PathLike | Mapping | None = None,
          logdir: str | os.PathLike | None = None, optimizer: torch.optim.Optimizer | None = None,
          **overrides: Any) -> Monitor:
    """Start watching `model`'s activations. Call monitor.step() once per training step. With `optimizer`,
    the learning rate each optimizer step used is recorded: evidence for the causes of dead units."""
    return Monitor(model, config, logdir, optimizer, **overrides)


def _rank() -> int:
    return torch.distributed.get_rank() if sync.distributed() else 0


class LoadResult(NamedTuple):
    """What load_state_dict() could not match yet, like nn.Module.load_state_dict's incompatible keys."""

    unmatched: list[str]  # saved sites that have not run yet: restored when they first run
    new: list[str]        # sites that have run and had nothing saved: they start afresh


class Monitor:
    """Watches one model; `deadwatch.watch(...)` is the same call."""

    def __init__(self, model: nn.Module, config: Config | str | os.PathLike | Mapping | None = None,
                 logdir: str | os.PathLike | None = None, optimizer: torch.optim.Optimizer | None = None,
                 **overrides: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"deadwatch.watch() needs a torch.nn.Module, got {type(model).__name__}")
        if isinstance(config, Config):
            if overrides:
                raise ConfigError("pass keyword overrides with a config file or mapping, not with a Config object")
        else:
            config = config_mod.load(config, **overrides)
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"deadwatch: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if config.recycle_every and optimizer is None:
            raise ConfigError(f"recycle.every = {config.recycle_every} recycles units during training, which resets "
                              f"their optimizer state: pass the optimizer, watch(model, optimizer=opt, ...), or "
                              f"set recycle.every to 0")
        self.config = config
        self.optimizer = optimizer
        self._lr_changes: list[tuple[int, tuple[float, ...]]] = []  # (step from 1, lr per group) when it changed
        self._lr_used: tuple | None = None  # the rates the last optimizer.step() ran with (_on_optimizer_step)
        self._lr_hook: Any = None
        self._updates = updates.UpdateSizes()  # ||dW|| / ||W|| of the producer layers (large_update cause)
        self._tracked = 0                  # sites whose producers _updates measures
        self.logdir = os.path.expanduser(os.fspath(logdir)) if logdir is not None else None
        self.steps = 0                     # completed training steps (calls of step())
        self._reported_step = 0            # step of the last periodic report
        self._recycler: Any = None         # recycle.Recycler, made at the first recycling
        self._closed = False
        self._scan = False                 # deadwatch.scan(): no training, so certificates need no optimizer check
        self._warned_no_step = False
        self._warned_methods = False       # said once: tensor-method sites are not counted in compiled graphs
        self._resumed = False              # load_state_dict() was called: the run log marks the run resumed
        self._strict_pending = False       # load_state_dict(strict=True): unmatched sites raise at the next report
        self._used_logdir = False          # the logdir held an earlier run when watch() was called
        self._registry = stats.Registry()
        me = weakref.ref(self)  # the capture (kept by the model's hooks) must not keep the monitor alive
        self._capture = Capture(model, config, self._registry, lambda: me().steps)  # type: ignore[union-attr]
        self._sitemap = self._capture.sitemap = SiteMap(self._capture.model)
        specs = self._reporter_specs()      # checked on every rank, so no rank trains on alone
        self._reporters: list[Reporter] = self._make_reporters(specs) if _rank() == 0 else []
        try:
            self._capture.attach()
            hook = getattr(_innermost(optimizer), "register_step_pre_hook", None) if optimizer is not None else None
            if callable(hook):  # an optimizer-like object without step hooks: rates read at step()
                self._lr_hook = hook(_lr_recorder(me))
        except BaseException:
            self._capture.detach()
            self._close_reporters()
            raise
        # A monitor dropped without close() (no `with`, the loop raised) is cleaned up when collected:
        # hooks, function patches and the compiler stance go back as close() puts them. The finalizer
        # holds the capture and the optimizer hook, never the monitor.
        self._finalizer = weakref.finalize(self, _abandoned, self._capture, self._lr_hook, self._updates)
        self._finalizer.atexit = False

    # -- public API
    def step(self) -> None:
        """Mark the end of one training step; every report_every steps, report."""
        if self._closed:
            raise RuntimeError("deadwatch: step() called on a closed monitor")
        if self.steps == 0:  # asked at the first step: load_state_dict() comes after watch()
            self._first_step_warnings()
        self._capture.flush()
        self._registry.fold(self.steps)
        self.steps += 1
        if self.optimizer is not None:
            self._record_lr()
        self._capture.new_step(self.steps)
        every = self.config.recycle_every * self.config.report_every  # steps: the same after a resume
        if every and self.steps > every and (self.steps - 1) % every == 0:
            self._auto_recycle()
        if self.steps % self.config.report_every == 0:
            self._periodic_report()
        # after any recycling: its new rows are no update of the optimizer's
        if len(self._sitemap.layers) != self._tracked:  # sites mapped since: their producers join
            self._tracked = len(self._sitemap.layers)
            self._updates.track(self._producer_weights())
        self._updates.end_of_step(self.steps)

    def mask(self, mask: torch.Tensor | None) -> contextlib.AbstractContextManager:
        """Count only the real positions of the next forward: `mask` is 1/True at real positions and
        0/False at padding, shaped like the activations without their unit axis ((N, T) for (N, T, C)
        outputs, e.g. a tokenizer's attention_mask). Sites whose outputs have another shape ignore it.
        Applies to the next forward the loop starts; `with monitor.mask(m): ...` applies it to every
        forward in the block."""
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(f"deadwatch: mask() takes a tensor or None, got {type(mask).__name__}")
        self._capture.mask = mask
        return self._held_mask()

    @contextlib.contextmanager
    def _held_mask(self) -> Iterator[None]:
        self._capture.mask_held = True
        try:
            yield
        finally:
            self._capture.mask_held = False
            self._capture.mask = None

    def recycle(self, optimizer: torch.optim.Optimizer | None = None, sites: Iterable[str] | str | None = None,
                units: str = "dead") -> dict[str, list[int]]:
        """Recycle the dead (or, with units="dormant", dormant) units of `sites` (names; None: all), as
        ReDo does, on the map of site_layers(): the producers' rows drawn afresh, every consumer's columns
        zeroed, the state of `optimizer` (default: the one given to watch(); one is required, since stale
        moments would steer the new rows) reset for exactly those rows and columns, the units' counters
        and their site's interval started over. Sites that cannot be recycled exactly are skipped with one
        warning saying why. Returns {site: [recycled units]} for the sites where units were recycled.
        Collective under torch.distributed: call it on every rank; every rank recycles the same units
        the same way."""
        if self._closed:
            raise RuntimeError("deadwatch: recycle() called on a closed monitor")
        if units not in config_mod.RECYCLE_UNITS:
            raise ValueError(f"deadwatch: recycle(units=...) must be one of {', '.join(config_mod.RECYCLE_UNITS)}, "
                             f"got {units!r}")
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise DeadwatchError("recycle() resets the optimizer state (Adam's moments, momentum) of the rows and "
                                 "columns it redraws and zeroes, and no optimizer is known: pass "
                                 "recycle(optimizer=opt) or watch(model, optimizer=opt, ...)")
        return self._recycle(self.report(), optimizer, sites, units)

    def _recycle(self, report: analysis.Report, optimizer: torch.optim.Optimizer | None, sites: Any, units: str,
                 max_fraction: float | None = None) -> dict[str, list[int]]:
        from .recycle import Recycler
        if self._recycler is None:
            self._recycler = Recycler(self._capture, self._sitemap)
        result = self._recycler.run(report, optimizer, sites, units, self.steps, max_fraction)
        if result:
            self._updates.forget()  # new rows are no optimizer update: not a large_update
            for reporter in list(self._reporters):
                told = getattr(reporter, "recycled", None)  # optional: reporters without it are not told
                if callable(told):
                    try:
                        told(self.steps, result)
                    except Exception as e:
                        self._drop(reporter, e)
        return result

    def site_layers(self) -> dict[str, SiteLayers]:
        """The layers around each site, read from the autograd graph of the forward in which it was first
        found (see deadwatch.sitemap), by site name as in Report.layers. Local to this process."""
        layout = self._capture.layout()
        names = dict(zip((key for key, _ in layout), self._capture.names([key for key, _ in layout])))
        return {name: self._sitemap.get(key, names) for key, name in names.items()}

    def report(self) -> analysis.Report:
        """The verdict now; resets nothing. Collective under torch.distributed."""
        self._warn_if_no_step()
        figures, same = sync.snapshot(self._registry, self._capture.layout(), self.steps, self.config.window)
        names = self._capture.names([f.name for f in figures], publish=True)  # once the ranks agree on sites
        self._warn_if_methods_compiled(names)
        if self._strict_pending:
            self._strict_pending = False
            self._check_strict(names)
        layers = [analysis.layer_report(f._replace(name=name), self.config) for f, name in zip(figures, names)]
        report = analysis.Report(step=self.steps, window=self.config.window, layers=layers)
        self._explain(report, figures, local=same)
        self._certify(report)
        return report

    def state_dict(self) -> dict[str, Any]:
        """Counters, last-fired steps and the step counter, for a checkpoint (take it after step()).
        Under torch.distributed it is collective and holds every rank's counters merged, the same on
        every rank: whichever rank's copy is saved, a resumed run gives the verdict of an unbroken one."""
        self._registry.settle()
        sites = {name: self._registry.state(site) for name, site in self._capture.site_names()}
        if sync.distributed():
            sites = sync.merged_state(sites)
        return {"version": 2, "steps": self.steps, "reported_step": self._reported_step,
                "interval_reset_pending": self._registry.reset_pending, "sites": sites}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Continue from a state_dict(): a window spanning the restart gives the verdict of an unbroken run.
        Sites are matched by name when they first run (or now, if they already have). The state is
        checked whole before anything changes. Returns the saved sites not matched yet and the sites
        that have no saved state; with `strict`, saved sites that have not run by the first report
        raise DeadwatchError then."""
        sites = _check_state(state)
        if _rank() != 0:  # the saved counts are every rank's, merged: rank 0 holds them, so a report adds them once
            for saved in sites.values():
                for name in stats.INTERVAL:
                    if name in saved:
                        saved[name] = torch.zeros_like(saved[name])
                saved["observations"] = 0
        self.steps = state["steps"]
        self._reported_step = state["reported_step"]
        self._registry.reset_pending = state["interval_reset_pending"]
        new = self._capture.load(sites)
        self._capture.new_step(self.steps)
        self._resumed = True
        self._strict_pending = strict
        return LoadResult(unmatched=sorted(self._capture.pending), new=new)

    def close(self, error: BaseException | None = None) -> None:
        """Report the steps not yet reported, remove every hook, close the reporters. Idempotent.

        With `error` (the training loop failed), a single process still writes its final report,
        marked with the error; under torch.distributed it makes none, since the collective it needs
        may hang when other ranks never get there."""
        if self._closed:
            return
        self._closed = True
        try:
            if error is None:
                self._warn_if_no_step()
                if self.steps > self._reported_step:
                    self._periodic_report()
            elif not sync.distributed() and self.steps:
                self._final_report_after(error)
        finally:
            self._finalizer()
            self._close_reporters()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(error=exc if exc_type is not None else None)

    # -- internals
    def _record_lr(self) -> None:
        """The learning rates the step just ended ran with, kept when they change (host floats: no sync).
        Read when optimizer.step() ran (a step pre-hook), so a scheduler stepped before monitor.step() (as
        the HF Trainer does) does not move a change one step early; read now when no optimizer step ran
        since the last step() (an optimizer wrapper that runs no step hooks)."""
        lrs = self._lr_used if self._lr_used is not None else _rates(self.optimizer)
        self._lr_used = None
        if all(isinstance(lr, (int, float)) for lr in lrs) and (not self._lr_changes or self._lr_changes[-1][1] != lrs):
            self._lr_changes.append((self.steps, lrs))

    def _producer_weights(self) -> list[tuple[str, nn.Module, str]]:
        """The weights whose updates are measured: each site's producer layer's, (name, layer, "weight")."""
        return [(f"{path}.weight", self._capture.model.get_submodule(path), "weight")
                for path in self._producers().values() if path]

    def _producers(self) -> dict[Any, str | None]:
        """Site key -> module path of the layer feeding its activation (the site map's first producer;
        None: not known). A gate's partner (the up projection) multiplies the units' values, but the
        first producer's updates are what drives the pre-activation below 0."""
        return {key: layers.producers[0] if layers.producers else None for key, layers in self._sitemap.layers.items()}

    def _explain(self, report: analysis.Report, figures: list[sync.Figures], local: bool) -> None:
        """Causes for the flagged sites' dead units, from the evidence the run left (report path only).
        Every rank must find the same causes: the evidence this process holds about a site (its producer's
        bias, the site feeding it) is used only when every rank has the same sites (`local`)."""
        by_key = {f.name: layer for f, layer in zip(figures, report.layers)}
        flagged = {id(layer) for layer in report.flagged}
        producers = self._producers() if local else {}
        for f, layer in zip(figures, report.layers):
            key = f.name
            if id(layer) not in flagged or not layer.dead_units or f.last_fired is None:
                continue
            around = self._sitemap.get(key, {}) if local else None
            bias = around.shift(self._capture.model) if around is not None else None
            if bias is not None and (type(bias[0].detach()) is not torch.Tensor  # FSDP's DTensor: a shard here
                                     or bias[0].numel() != len(f.last_fired)):
                bias = None
            feeding = by_key.get(self._sitemap.inputs.get(key)) if local else None
            producer = producers.get(key)
            spans, ratios = self._updates.of(f"{producer}.weight") if producer else ([], [])
            layer.causes = causes.explain(causes.Evidence(
                dead_units=layer.dead_units, last_fired=np.where(f.last_fired >= 0, f.last_fired + 1, -1),
                bias=bias[0].detach().float().cpu().numpy() if bias is not None else None,
                bias_name=bias[1] if bias is not None else None,
                lr_changes=self._lr_changes,
                input_site=feeding.name if feeding is not None else None,
                input_dead_fraction=feeding.dead_fraction if feeding is not None else None,
                update_layer=f"{producer}.weight" if producer else None, update_spans=spans, update_ratios=ratios))

    def _check_strict(self, names: list[str]) -> None:
        """load_state_dict(strict=True) at the first report: raise when saved sites have not run, on every
        rank alike (one rank raising while the others go on into the next collective would hang them)."""
        pending = {_rank(): sorted(self._capture.pending)} if self._capture.pending else {}
        if sync.distributed():
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, pending)
            pending = {rank: sites for part in everyone for rank, sites in part.items()}
        if pending:
            where = "; ".join(f"{sites} on rank {rank}" for rank, sites in sorted(pending.items())) \
                if sync.distributed() else str(next(iter(pending.values())))
            raise DeadwatchError(f"load_state_dict(strict=True): saved sites have not run by the first report: "
                                 f"{where}; sites now: {', '.join(names) or 'none'}. Pass strict=False to let them go")

    def _warn_if_methods_compiled(self, names: list[str]) -> None:
        """torch.compile puts tensor methods (x.relu()) in its graphs without calling deadwatch's wrapper:
        their sites count eager steps only. Say so once, when compiled graphs have run."""
        if self._warned_methods or not any(c.traced for c in self._registry.by_device.values()):
            return
        methods = [name for name in names if name.startswith("Tensor.") or ".Tensor." in name]
        if methods:
            self._warned_methods = True
            warnings.warn(f"deadwatch: sites {', '.join(methods)} are tensor methods (x.relu()), which torch.compile "
                          f"runs without letting deadwatch see them: they count eager steps only (idle or "
                          f"undercounted). Call the function form instead (F.relu(x), torch.sigmoid(x))",
                          RuntimeWarning, stacklevel=3)

    def _warn_if_no_step(self) -> None:
        if self.steps == 0 and self._registry.sites and not self._warned_no_step:
            self._warned_no_step = True
            warnings.warn("deadwatch: the model ran forwards but no training step was completed, so nothing "
                          "is judged yet: call monitor.step() once per training step, after optimizer.step()",
                          RuntimeWarning, stacklevel=3)

    def _first_step_warnings(self) -> None:
        if self._used_logdir and not self._resumed:
            warnings.warn(f"deadwatch: logdir {self.logdir!r} already holds a run; the run log starts a new run "
                          f"there ('deadwatch summary' shows the latest), but TensorBoard will overlay both runs' "
                          f"curves. Use a new logdir, or call monitor.load_state_dict() to continue that run",
                          RuntimeWarning, stacklevel=3)
        why = self._capture.unwatched()
        if why is not None:
            warnings.warn(f"deadwatch: {why}", RuntimeWarning, stacklevel=3)

    def _certify(self, report: analysis.Report) -> None:
        """Certified units: dead for every input, from the weights (and, training, the optimizer)."""
        from . import certify
        layers, kinds = certify.site_map(self)
        certify.annotate(report, self._capture.model, layers, kinds, self.optimizer, training=not self._scan)

    def _final_report_after(self, error: BaseException) -> None:
        try:
            report = self.report()
        except Exception as e:  # the run failed already: say why there is no verdict, raise the loop's error
            warnings.warn(f"deadwatch: no final report after the error ({e})", RuntimeWarning, stacklevel=4)
            return
        report.error = f"{type(error).__name__}: {error}"
        self._emit(report)

    def _periodic_report(self) -> None:
        report = self.report()
        self._reported_step = self.steps
        self._registry.reset_interval()
        self._emit(report)

    def _auto_recycle(self) -> None:
        """Automatic recycling, one step after every recycle.every-th report: never at the last report
        (a run that ends there leaves its log, summary and report() in agreement, and no unit is
        recycled that could not train), on a verdict that includes the step just ended. It warns and
        training goes on where it cannot run."""
        try:
            self._recycle(self.report(), self.optimizer, None, self.config.recycle_units,
                          self.config.recycle_max_fraction)
        except Exception as e:
            warnings.warn(f"deadwatch: automatic recycling at step {self.steps} failed ({type(e).__name__}: {e}); "
                          f"nothing was recycled, training goes on", RuntimeWarning, stacklevel=3)

    def _emit(self, report: analysis.Report) -> None:
        for reporter in list(self._reporters):
            try:
                reporter.emit(report)
            except Exception as e:  # a reporter must never stop training
                self._drop(reporter, e)

    def _drop(self, reporter: Any, error: Exception) -> None:
        warnings.warn(f"deadwatch: {type(reporter).__name__} failed ({error}); it is turned off, training goes on",
                      RuntimeWarning, stacklevel=3)
        self._reporters.remove(reporter)
        try:
            reporter.close()
        except Exception:
            pass

    def _close_reporters(self) -> None:
        for reporter in list(self._reporters):
            try:
                reporter.close()
            except Exception as e:
                self._drop(reporter, e)
        self._reporters = []

    def _reporter_specs(self) -> list[str | Reporter]:
        """The reporters to build (names) or use (objects); raises ConfigError for a missing or unusable logdir."""
        specs = list(self.config.reporters)
        files = [s for s in specs if isinstance(s, str) and s in FILE_REPORTERS]
        if self.logdir is None:
            if files and self.config.reporters_given:
                raise ConfigError(f"reporters {files} write files and need a logdir: "
                                  f"pass watch(..., logdir=DIR) or drop them from reporters")
            specs = [s for s in specs if s not in files]
        elif files:
            try:
                os.makedirs(self.logdir, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"logdir {self.logdir!r} cannot be created: {e.strerror}") from None
            if not os.access(self.logdir, os.W_OK):
                raise ConfigError(f"logdir {self.logdir!r} is not writable")
            self._used_logdir = _rank() == 0 and _holds_a_run(self.logdir)
        return specs

    def _make_reporters(self, specs: list[str | Reporter]) -> list[Reporter]:
        reporters: list[Reporter] = []
        try:
            for spec in specs:
                reporters.append(_reporter(spec, self) if isinstance(spec, str) else spec)
        except BaseException as e:
            for reporter, spec in zip(reporters, specs):
                if isinstance(spec, str):  # built here; objects passed in are closed by their owner then
                    reporter.close()
            if isinstance(e, OSError):
                raise ConfigError(f"logdir {self.logdir!r} cannot be written: {e.strerror or e}") from None
            raise
        return reporters


def _innermost(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers (Lightning's LightningOptimizer, accelerate's AcceleratedOptimizer):
    its step() is the one that runs the step hooks."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _rates(optimizer: Any) -> tuple:
    return tuple(g.get("lr") for g in optimizer.param_groups)


def _lr_recorder(monitor: weakref.ref) -> Any:
    """An optimizer step pre-hook keeping the rates that step runs with; it holds the monitor weakly."""
    def record(optimizer: Any, args: Any, kwargs: Any) -> None:
        me = monitor()
        if me is not None:
            me._lr_used = _rates(optimizer)
    return record


def _abandoned(capture: Capture, lr_hook: Any, sizes: updates.UpdateSizes) -> None:
    """What close() and the garbage collector's finalizer both undo: the model's hooks, the function
    patch and the compiler stance (capture.detach), the optimizer's hook, the update measurements."""
    capture.detach()
    if lr_hook is not None:
        lr_hook.remove()
    sizes.stop()


def _holds_a_run(logdir: str) -> bool:
    from .reporters.runlog import FILENAME
    return any(name == FILENAME or name.startswith("events.out.tfevents.") for name in os.listdir(logdir))


def _check_state(state: Any) -> dict[str, dict]:
    """The saved sites of a state_dict(), checked whole; a version 1 state (no last_ran) is read too."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"load_state_dict(): {what}; pass what Monitor.state_dict() returned")

    if not isinstance(state, Mapping) or state.get("version") not in (1, 2):
        raise bad("the state must be a mapping with version 1 or 2")
    for key in ("steps", "reported_step"):
        if isinstance(state.get(key), bool) or not isinstance(state.get(key), int) or state[key] < 0:
            raise bad(f"{key!r} must be a non-negative integer, got {state.get(key)!r}")
    if not isinstance(state.get("interval_reset_pending"), bool):
        raise bad("'interval_reset_pending' must be true or false")
    sites = state.get("sites")
    if not isinstance(sites, Mapping):
        raise bad(f"'sites' must be a mapping of site name to counters, got {type(sites).__name__}")
    out = {}
    for name, saved in sites.items():
        if not isinstance(saved, Mapping):
            raise bad(f"site {name!r} must be a mapping")
        saved = dict(saved)
        if state["version"] == 1:  # saved before last_ran was kept: the site ran at the checkpoint's last step
            saved.setdefault("last_ran", state["steps"] - 1)
        for key in ("units", "first_step", "observations"):
            if isinstance(saved.get(key), bool) or not isinstance(saved.get(key), int) or saved[key] < 0:
                raise bad(f"site {name!r}: {key!r} must be a non-negative integer, got {saved.get(key)!r}")
        if isinstance(saved.get("last_ran"), bool) or not isinstance(saved.get("last_ran"), int) or saved["last_ran"] < -1:
            raise bad(f"site {name!r}: 'last_ran' must be an integer >= -1, got {saved.get('last_ran')!r}")
        for key in stats.SAVED:
            if key in stats.ADDED_LATER and key not in saved:
                continue
            t = saved.get(key)
            if not isinstance(t, torch.Tensor) or t.shape != (saved["units"],):
                raise bad(f"site {name!r}: {key!r} must be a tensor of {saved['units']} values")
        out[name] = saved
    return out


def _reporter(name: str, monitor: Monitor) -> Reporter:
    if name == "console":
        from .reporters.console import ConsoleReporter
        return ConsoleReporter()
    if name == "jsonl":
        from .reporters.runlog import RunLogReporter
        return RunLogReporter(monitor.logdir, monitor.config, resumed=lambda: monitor._resumed)
    if name == "wandb":
        from .reporters.wandb import WandbReporter
        return WandbReporter(monitor.config, monitor.logdir)
    if name == "mlflow":
        from .reporters.mlflow import MlflowReporter
        return MlflowReporter(monitor.config)
    from .reporters.tensorboard import TensorBoardReporter
    return TensorBoardReporter(monitor.logdir, monitor.config)
