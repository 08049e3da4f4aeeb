"""deadwatch as a Hugging Face Trainer callback: `Trainer(..., callbacks=[DeadwatchCallback()])`.

A thin adapter: it opens a deadwatch Monitor on the model when training begins, calls
monitor.step() once per optimizer step (on_step_end) and closes the monitor when training ends.
Every decision about activations, steps and reports is the Monitor's.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError('deadwatch.integrations.transformers needs transformers: '
                      'pip install "deadwatch[transformers]"') from None

from .. import config as config_mod
from ..analysis import Report
from ..monitor import Monitor, watch


class DeadwatchCallback(TrainerCallback):
    """Watch the model's activations during `trainer.train()`.

    `config`, `logdir` and `overrides` are those of `deadwatch.watch()`. Without a `logdir`, files go
    to `<args.logging_dir>/deadwatch`, or `<args.output_dir>/deadwatch` where TrainingArguments has no
    logging_dir (transformers 5).
    """

    def __init__(self, config: str | os.PathLike | Mapping | None = None,
                 logdir: str | os.PathLike | None = None, **overrides: Any):
        self._config = config_mod.load(config, **overrides)  # a bad key fails here, when the Trainer is built
        self._logdir = logdir
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
        self.monitor = watch(model, self._config, logdir,
                             optimizer=optimizer if hasattr(optimizer, "param_groups") else None)
        # Padding is not data: the batch's attention_mask says which positions count.
        self._mask_hook = model.register_forward_pre_hook(self._take_mask, with_kwargs=True)

    def _take_mask(self, module: Any, args: Any, kwargs: dict) -> None:
        if self.monitor is not None:
            self.monitor.mask(kwargs.get("attention_mask"))

    # on_step_end comes once per optimizer step, after all gradient_accumulation_steps micro-batches.
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()
