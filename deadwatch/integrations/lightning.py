"""deadwatch as a Lightning callback: `Trainer(callbacks=[DeadwatchCallback()])`.

A thin adapter: it opens a deadwatch Monitor on the LightningModule when fit starts, calls
monitor.step() once per optimizer step, and closes the monitor when fit ends or fails. Every
decision about activations, steps and reports is the Monitor's.

With `trainer_logs=True` (the default) every report's scalars (reporters/scalars.py) also go to the
trainer's own loggers (`trainer.loggers`: CSV, W&B, MLflow, ...), at the training step: where the team
already looks. A TensorBoardLogger is skipped while deadwatch writes its own TensorBoard events (the
`tensorboard` reporter, under <trainer.log_dir>/deadwatch by default), which would draw every curve twice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

try:
    from lightning.pytorch import Callback
except ImportError:
    try:  # the standalone package, same API
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError('deadwatch.integrations.lightning needs Lightning: pip install "deadwatch[lightning]"') from None

from .. import config as config_mod
from ..analysis import Report
from ..monitor import Monitor, watch
from ..reporters.scalars import scalars


class TrainerLoggers:
    """A reporter: each report's scalars to the trainer's loggers (rank 0 only, as every reporter)."""

    def __init__(self, trainer: Any, own_tensorboard: bool):
        self.trainer = trainer
        self.own_tensorboard = own_tensorboard  # deadwatch writes TensorBoard events itself

    def loggers(self) -> list[Any]:
        return [logger for logger in self.trainer.loggers
                if not (self.own_tensorboard and type(logger).__name__ == "TensorBoardLogger")]

    def emit(self, report: Report) -> None:
        values = scalars(report)
        for logger in self.loggers():
            logger.log_metrics(values, step=report.step)

    def close(self) -> None:
        pass


class DeadwatchCallback(Callback):
    """Watch the LightningModule's activations during `trainer.fit`.

    `config`, `logdir` and `overrides` are those of `deadwatch.watch()`. Without a `logdir`, files go
    to `<trainer.log_dir>/deadwatch` (the logger's version directory, or `default_root_dir` without
    a logger). The monitor's state is saved in Lightning checkpoints and restored on resume.
    `trainer_logs`: also log the scalars through `trainer.loggers` (see the module's docstring).
    """

    def __init__(self, config: str | os.PathLike | Mapping | None = None,
                 logdir: str | os.PathLike | None = None, trainer_logs: bool = True, **overrides: Any):
        self._config = config_mod.load(config, **overrides)  # a bad key fails here, when the Trainer is built
        self._logdir = logdir
        self._trainer_logs = trainer_logs
        self.monitor: Monitor | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._seen_global_step = 0

    def report(self) -> Report:
        """The latest verdict (collective under DDP: call it on every rank)."""
        if self.monitor is None:
            raise RuntimeError("deadwatch: no report before trainer.fit() has started")
        return self.monitor.report()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.monitor = None  # a new fit gets a new monitor; a checkpoint may load into it next

    # on_fit_start rather than setup: modules built in configure_model exist by then.
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        logdir = self._logdir
        if logdir is None:
            logdir = os.path.join(trainer.log_dir, "deadwatch")  # log_dir is a broadcast: every rank asks
        # The optimizer: evidence for the causes (its learning rates), and what automatic recycling resets.
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        config = self._config
        if self._trainer_logs:
            own = TrainerLoggers(trainer, own_tensorboard="tensorboard" in config.reporters)
            config = dataclasses.replace(config, reporters=(*config.reporters, own))
        self.monitor = watch(pl_module, config, logdir, optimizer=optimizers[0] if len(optimizers) == 1 else None)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._seen_global_step = trainer.global_step  # restored from the checkpoint by now

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps: the micro-batches of gradient accumulation are one step.
        if self.monitor is not None and trainer.global_step != self._seen_global_step:
            self._seen_global_step = trainer.global_step
            self.monitor.step()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close(error=exception)  # no collective: the other ranks may not get here

    # Lightning calls load_state_dict before on_fit_start, or after it for strategies that restore
    # checkpoints after setup (FSDP, DeepSpeed): keep the state until the monitor exists.
    def state_dict(self) -> dict[str, Any]:
        if self.monitor is None:
            return dict(self._pending_state or {})
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor is None:
            self._pending_state = state_dict
        else:
            self.monitor.load_state_dict(state_dict)
