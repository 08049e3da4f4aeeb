"""The Monitor: ties capture -> stats -> analysis -> reporters to one training loop."""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from . import analysis, config as config_mod, stats
from .capture import Capture
from .config import FILE_REPORTERS, Config
from .errors import ConfigError


def watch(model: nn.Module, config: str | os.PathLike | Mapping | None = None,
          logdir: str | os.PathLike | None = None, **overrides: Any) -> Monitor:
    """Start watching `model`'s activations. Call monitor.step() once per training step."""
    return Monitor(model, config_mod.load(config, **overrides), logdir)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Monitor:
    def __init__(self, model: nn.Module, config: Config, logdir: str | os.PathLike | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"deadwatch.watch() needs a torch.nn.Module, got {type(model).__name__}")
        self.config = config
        self.logdir = os.fspath(logdir) if logdir is not None else None
        self.steps = 0                     # completed training steps (calls of step())
        self._reported_step = 0            # step of the last periodic report
        self._closed = False
        self._warned_no_step = False
        self._resumed = False              # load_state_dict() was called: the run log marks the run resumed
        self._used_logdir = False          # the logdir held an earlier run when watch() was called
        self._registry = stats.Registry()
        self._capture = Capture(model, config, self._registry, lambda: self.steps)
        names = self._reporter_names()      # checked on every rank, so no rank trains on alone
        self._reporters = self._make_reporters(names) if _rank() == 0 else []
        try:
            self._capture.attach()
        except BaseException:
            self._close_reporters()
            raise

    # -- public API
    def step(self) -> None:
        """Mark the end of one training step; every report_every steps, report."""
        if self._closed:
            raise RuntimeError("deadwatch: step() called on a closed monitor")
        if self._used_logdir and not self._resumed:  # asked at the first step: load_state_dict() comes after watch()
            self._used_logdir = False
            warnings.warn(f"deadwatch: logdir {self.logdir!r} already holds a run; the run log starts a new run "
                          f"there ('deadwatch summary' shows the latest), but TensorBoard will overlay both runs' "
                          f"curves. Use a new logdir, or call monitor.load_state_dict() to continue that run",
                          RuntimeWarning, stacklevel=2)
        self._registry.fold(self.steps)
        self.steps += 1
        self._capture.new_step(self.steps)
        if self.steps % self.config.report_every == 0:
            self._periodic_report()

    def report(self) -> analysis.Report:
        """The verdict now; resets nothing. Collective under torch.distributed."""
        self._warn_if_no_step()
        figures = self._registry.snapshot(self._capture.layout(), self.steps, self.config.window)
        names = self._capture.names([f.name for f in figures])  # final names, once the ranks agree on sites
        layers = [analysis.layer_report(f._replace(name=name), self.config) for f, name in zip(figures, names)]
        return analysis.Report(step=self.steps, window=self.config.window, layers=layers)

    def state_dict(self) -> dict[str, Any]:
        """Counters, last-fired steps and the step counter, for a checkpoint (take it after step())."""
        return {"version": 1, "steps": self.steps, "reported_step": self._reported_step,
                "interval_reset_pending": self._registry.reset_pending,
                "sites": self._registry.state(self._capture.site_names())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state_dict(): a window spanning the restart gives the verdict of an unbroken run.
        Sites are matched by name when they first run (or now, if they already have). The state is
        checked whole before anything changes."""
        _check_state(state)
        self.steps = state["steps"]
        self._reported_step = state["reported_step"]
        self._registry.reset_pending = state["interval_reset_pending"]
        self._capture.load(state["sites"])
        self._capture.new_step(self.steps)
        self._resumed = True

    def close(self, error: BaseException | None = None) -> None:
        """Report the steps not yet reported, remove every hook, close the reporters. Idempotent.

        With `error` (the training loop failed), no final collective report is made: other ranks
        may never get there."""
        if self._closed:
            return
        self._closed = True
        try:
            if error is None:
                self._warn_if_no_step()
                if self.steps > self._reported_step:
                    self._periodic_report()
        finally:
            self._capture.detach()
            self._close_reporters()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(error=exc if exc_type is not None else None)

    # -- internals
    def _warn_if_no_step(self) -> None:
        if self.steps == 0 and self._registry.sites and not self._warned_no_step:
            self._warned_no_step = True
            warnings.warn("deadwatch: the model ran forwards but no training step was completed, so nothing "
                          "is judged yet: call monitor.step() once per training step, after optimizer.step()",
                          RuntimeWarning, stacklevel=3)

    def _periodic_report(self) -> None:
        report = self.report()
        self._reported_step = self.steps
        self._registry.reset_interval()
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

    def _reporter_names(self) -> list[str]:
        """The reporters to build; raises ConfigError for a missing or unusable logdir."""
        names = list(self.config.reporters)
        if self.logdir is None:
            wanted = [n for n in names if n in FILE_REPORTERS]
            if wanted and self.config.reporters_given:
                raise ConfigError(f"reporters {wanted} write files and need a logdir: "
                                  f"pass watch(..., logdir=DIR) or drop them from reporters")
            names = [n for n in names if n not in FILE_REPORTERS]
        elif any(n in FILE_REPORTERS for n in names):
            try:
                os.makedirs(self.logdir, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"logdir {self.logdir!r} cannot be created: {e.strerror}") from None
            if not os.access(self.logdir, os.W_OK):
                raise ConfigError(f"logdir {self.logdir!r} is not writable")
            self._used_logdir = _rank() == 0 and _holds_a_run(self.logdir)
        return names

    def _make_reporters(self, names: list[str]) -> list[Any]:
        reporters: list[Any] = []
        try:
            for name in names:
                reporters.append(_reporter(name, self))
        except BaseException as e:
            for reporter in reporters:
                reporter.close()
            if isinstance(e, OSError):
                raise ConfigError(f"logdir {self.logdir!r} cannot be written: {e.strerror or e}") from None
            raise
        return reporters


def _holds_a_run(logdir: str) -> bool:
    from .reporters.runlog import FILENAME
    return any(name == FILENAME or name.startswith("events.out.tfevents.") for name in os.listdir(logdir))


def _check_state(state: Any) -> None:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"load_state_dict(): {what}; pass what Monitor.state_dict() returned")

    if not isinstance(state, Mapping) or state.get("version") != 1:
        raise bad("the state must be a mapping with version 1")
    for key in ("steps", "reported_step"):
        if isinstance(state.get(key), bool) or not isinstance(state.get(key), int) or state[key] < 0:
            raise bad(f"{key!r} must be a non-negative integer, got {state.get(key)!r}")
    if not isinstance(state.get("interval_reset_pending"), bool):
        raise bad("'interval_reset_pending' must be true or false")
    sites = state.get("sites")
    if not isinstance(sites, Mapping):
        raise bad(f"'sites' must be a mapping of site name to counters, got {type(sites).__name__}")
    for name, saved in sites.items():
        if not isinstance(saved, Mapping):
            raise bad(f"site {name!r} must be a mapping")
        for key in ("units", "first_step", "observations"):
            if isinstance(saved.get(key), bool) or not isinstance(saved.get(key), int) or saved[key] < 0:
                raise bad(f"site {name!r}: {key!r} must be a non-negative integer, got {saved.get(key)!r}")
        for key in ("last_fired", "last_nonfinite", "fired"):
            t = saved.get(key)
            if not isinstance(t, torch.Tensor) or t.shape != (saved["units"],):
                raise bad(f"site {name!r}: {key!r} must be a tensor of {saved['units']} values")


def _reporter(name: str, monitor: Monitor) -> Any:
    if name == "console":
        from .reporters.console import ConsoleReporter
        return ConsoleReporter()
    if name == "jsonl":
        from .reporters.runlog import RunLogReporter
        return RunLogReporter(monitor.logdir, monitor.config, resumed=lambda: monitor._resumed)
    from .reporters.tensorboard import TensorBoardReporter
    return TensorBoardReporter(monitor.logdir, monitor.config)
