"""deadwatch as a Hugging Face Trainer callback: `Trainer(..., callbacks=[DeadwatchCallback()])`.

A thin adapter: it opens a deadwatch Monitor on the model when training begins, calls
monitor.step() once per optimizer step (on_step_end) and closes the monitor when training ends
(at the last step already, so that its final report is logged too). Every decision about activations,
steps and reports is the Monitor's.

With `trainer_logs=True` (the default) each report's scalars (reporters/scalars.py) are added to the
Trainer's `logs`, so every `report_to` integration (W&B, MLflow, TensorBoard, ...) and every callback's
on_log gets them: the callback asks for a log at each report step (unless logging_strategy is "no") and
adds the scalars to it. The Trainer calls its report_to integrations before the callbacks a user passes, so
this callback moves itself to the front of the Trainer's list when training begins.

Resuming: the monitor's state is saved into each checkpoint (`checkpoint-N/deadwatch_state.pt`) and,
when train(resume_from_checkpoint=...) continues at step N, loaded from `<output_dir>/checkpoint-N/`,
so the resumed run's verdicts equal an unbroken run's. A checkpoint elsewhere, or one without that file:
a warning, and the monitor starts afresh.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, Mapping

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError('deadwatch.integrations.transformers needs transformers: '
                      'pip install "deadwatch[transformers]"') from None

from .. import config as config_mod
from ..analysis import Report
from ..monitor import Monitor, watch
from ..reporters.scalars import scalars

STATE_FILE = "deadwatch_state.pt"


class TrainerLogs:
    """A reporter: keeps each report's scalars until the callback adds them to the Trainer's next logs."""

    def __init__(self) -> None:
        self.pending: dict[str, float] | None = None

    def emit(self, report: Report) -> None:
        self.pending = scalars(report)

    def close(self) -> None:
        pass


class DeadwatchCallback(TrainerCallback):
    """Watch the model's activations during `trainer.train()`.

    `config`, `logdir` and `overrides` are those of `deadwatch.watch()`. Without a `logdir`, files go
    to `<args.logging_dir>/deadwatch`, or `<args.output_dir>/deadwatch` where TrainingArguments has no
    logging_dir (transformers 5). `trainer_logs`: add the scalars to the Trainer's logs (see the module's
    docstring).
    """

    def __init__(self, config: str | os.PathLike | Mapping | None = None,
                 logdir: str | os.PathLike | None = None, trainer_logs: bool = True, **overrides: Any):
        self._config = config_mod.load(config, **overrides)  # a bad key fails here, when the Trainer is built
        self._logdir = logdir
        self._logs: TrainerLogs | None = TrainerLogs() if trainer_logs else None
        self.monitor: Monitor | None = None
        self._mask_hook: Any = None

    def report(self) -> Report:
        """The latest verdict (collective under torch.distributed: call it on every rank)."""
        if self.monitor is None:
            raise RuntimeError("deadwatch: no report before trainer.train() has started")
        return self.monitor.report()

    def close(self, error: BaseException | None = None) -> None:
        """Let go of the model. The Trainer has no hook for a failed train(): call this with the exception."""
        if self._mask_hook is not None:
            self._mask_hook.remove()
            self._mask_hook = None
        if self.monitor is not None:
            self.monitor.close(error=error)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.close(error=RuntimeError("a new train() began"))  # a previous train() that raised left it open
        logdir = self._logdir
        if logdir is None:
            logdir = os.path.join(getattr(args, "logging_dir", None) or args.output_dir, "deadwatch")
        # The optimizer (the Trainer hands it to every callback): evidence for the causes (its learning
        # rates), and what automatic recycling resets.
        optimizer = kwargs.get("optimizer")
        config = self._config
        if self._logs is not None:
            self._logs.pending = None
            config = dataclasses.replace(config, reporters=(*config.reporters, self._logs))
            self._go_first()
        self.monitor = watch(model, config, logdir, optimizer=optimizer if hasattr(optimizer, "param_groups") else None)
        if state.global_step > 0:  # train(resume_from_checkpoint=...): continue the monitor's state too
            self._resume(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        # Padding is not data: the batch's attention_mask says which positions count.
        self._mask_hook = model.register_forward_pre_hook(self._take_mask, with_kwargs=True)

    def _go_first(self) -> None:
        """Move to the front of the Trainer's callback list, before its report_to integrations, so that on_log
        adds the scalars before they read `logs`. The list belongs to the CallbackHandler, which calls every
        event and is found up the stack as the `self` whose `callbacks` hold this callback; not found (another
        caller), the order stays and the integrations listed before this callback miss the scalars."""
        frame = sys._getframe(1)
        while frame is not None:
            callbacks = getattr(frame.f_locals.get("self"), "callbacks", None)
            if isinstance(callbacks, list) and any(c is self for c in callbacks):
                callbacks.remove(self)
                callbacks.insert(0, self)
                return
            frame = frame.f_back

    def _resume(self, checkpoint: str) -> None:
        import torch

        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            warnings.warn(f"deadwatch: training resumed at step {os.path.basename(checkpoint).split('-')[-1]} but "
                          f"{path} does not exist (a checkpoint from another output_dir, or saved without "
                          f"deadwatch): the monitor starts afresh", RuntimeWarning, stacklevel=3)
            return
        self.monitor.load_state_dict(torch.load(path, weights_only=True))

    def _take_mask(self, module: Any, args: Any, kwargs: dict) -> None:
        if self.monitor is not None:
            self.monitor.mask(kwargs.get("attention_mask"))

    # on_step_end comes once per optimizer step, after all gradient_accumulation_steps micro-batches.
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self.monitor.step()
        if state.max_steps and state.global_step >= state.max_steps:
            self.close()  # the final report now, while a log can still carry it
        if self._logs is not None and self._logs.pending is not None and args.logging_strategy != "no":
            control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self._logs is not None and self._logs.pending is not None and logs is not None:
            logs.update(self._logs.pending)
            self._logs.pending = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The monitor's state into the checkpoint just written (collective under torch.distributed)."""
        if self.monitor is None:
            return
        import torch

        saved = self.monitor.state_dict()
        if args.should_save:
            torch.save(saved, os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()
