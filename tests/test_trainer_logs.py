"""The trainer's own loggers and the HF Trainer's checkpoints.

Lightning: with CSVLogger, metrics.csv holds deadwatch's scalars at each report's step, equal to the run
log; a TensorBoardLogger is skipped while deadwatch writes its own TensorBoard events, used otherwise.
HF Trainer: the scalars reach a callback's on_log (report_to="none") and a report_to integration (HF's own
TensorBoard callback), equal to the run log; and a run interrupted at step N and resumed from checkpoint-N
ends with the unbroken run's verdict (dead units, last_fired, observations, report.step).
"""

from __future__ import annotations

import csv
import glob
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tensorboard.backend.event_processing import event_accumulator as ea

from deadwatch.reporters import runlog
from test_wandb_mlflow import expected  # the scalars a run-log record stands for
from test_integrations import (FIRES, GATE_DEAD, GATE_UNITS, RESTART, TOTAL, WINDOW, Gated, Planted, lightning_trainer,
                               planted_data)

REPORT_EVERY = 3


# ---- Lightning ----------------------------------------------------------------------------------------

@pytest.fixture
def LightningCallback():
    pytest.importorskip("lightning")
    from deadwatch.integrations.lightning import DeadwatchCallback
    return DeadwatchCallback


def test_lightning_csv_logger_gets_the_scalars(tmp_path, LightningCallback):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    callback = LightningCallback(reporters=["jsonl"], window=3, report_every=REPORT_EVERY, count_subsample=1)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = lightning_trainer(tmp_path, [callback], logger=logger)
    trainer.fit(Planted(), planted_data())
    log = runlog.read(os.path.join(trainer.log_dir, "deadwatch"))
    assert [r["step"] for r in log.records] == [3, 6, 9, 10]              # the last at close, step 10
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = {int(row["step"]): {k: float(v) for k, v in row.items() if k.startswith("deadwatch/") and v != ""}
              for row in rows if any(row[k] for k in row if k.startswith("deadwatch/"))}
    assert logged == {r["step"]: pytest.approx(expected(r)) for r in log.records}
    assert "deadwatch/dead_fraction/head.relu#0" in rows[0]


def test_lightning_trainer_logs_off(tmp_path, LightningCallback):
    from lightning.pytorch.loggers import CSVLogger

    callback = LightningCallback(reporters=[], window=3, report_every=REPORT_EVERY, trainer_logs=False)
    logger = CSVLogger(tmp_path, name="csv")
    lightning_trainer(tmp_path, [callback], logger=logger).fit(Planted(), planted_data())
    path = os.path.join(logger.log_dir, "metrics.csv")
    assert not os.path.exists(path) or "deadwatch/" not in open(path).read()


@pytest.mark.parametrize("reporters, doubled", [(["jsonl", "tensorboard"], False), (["jsonl"], True)])
def test_lightning_tensorboard_logger_skipped_while_deadwatch_writes_tensorboard(tmp_path, LightningCallback,
                                                                                reporters, doubled):
    from lightning.pytorch.loggers import TensorBoardLogger

    callback = LightningCallback(reporters=reporters, window=3, report_every=REPORT_EVERY)
    logger = TensorBoardLogger(tmp_path, name="tb")
    lightning_trainer(tmp_path, [callback], logger=logger).fit(Planted(), planted_data())
    (events,) = glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))   # Lightning's own, not deadwatch/
    acc = ea.EventAccumulator(events)
    acc.Reload()
    assert ("deadwatch/dead_fraction/all" in acc.Tags()["scalars"]) == doubled
    if not doubled:   # the curves are in deadwatch's own events, once
        acc = ea.EventAccumulator(os.path.join(logger.log_dir, "deadwatch"))
        acc.Reload()
        assert "deadwatch/dead_fraction/all" in acc.Tags()["scalars"]


# ---- Hugging Face Trainer -----------------------------------------------------------------------------

def hf_trainer(tmp_path, model, data, callbacks, **args):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                   learning_rate=0.05, report_to="none", save_strategy="no", logging_strategy="steps",
                   logging_steps=1000, use_cpu=True, disable_tqdm=True, seed=0, train_sampling_strategy="sequential")
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**{**options, **args}),
                                train_dataset=data, callbacks=callbacks)


class GatedHF(nn.Module):
    """test_integrations.Gated for the HF Trainer: forward(x, labels) returns the loss."""

    def __init__(self):
        super().__init__()
        gated = Gated()
        self.gate, self.act, self.fc, self.fc_act, self.out = gated.gate, gated.act, gated.fc, gated.fc_act, gated.out

    def forward(self, x, labels):
        y = self.out(self.fc_act(self.fc(self.act(self.gate(x))))).squeeze(1)
        return {"loss": F.mse_loss(y, labels)}


def gated_rows():
    """Two micro-batches of 3 rows per step; unit u is on in the first micro-batch of the steps FIRES[u]."""
    x = torch.zeros(TOTAL, 2, 3, GATE_UNITS)
    for unit, steps in FIRES.items():
        x[list(steps), 0, :, unit] = 1.0
    y = torch.randn(TOTAL * 6, generator=torch.Generator().manual_seed(2))
    return [{"x": row, "labels": label} for row, label in zip(x.reshape(-1, GATE_UNITS), y)]


def hf_callback(**overrides):
    from deadwatch.integrations.transformers import DeadwatchCallback
    return DeadwatchCallback(**{"reporters": ["jsonl"], "window": WINDOW, "report_every": 5, "count_subsample": 1,
                                **overrides})


def test_hf_logs_reach_a_callbacks_on_log(tmp_path):
    transformers = pytest.importorskip("transformers")

    class Reader(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append((state.global_step, dict(logs)))

    seen = []
    callback = hf_callback(logdir=str(tmp_path / "dw"))
    trainer = hf_trainer(tmp_path, GatedHF(), gated_rows(), [Reader(), callback], max_steps=TOTAL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "deadwatch" in str(w.message)]   # a fresh run resumes nothing
    log = runlog.read(str(tmp_path / "dw"))
    assert [r["step"] for r in log.records] == [5, 10, 12]        # the last at the final step, before the Trainer ends
    ours = [(step, {k: v for k, v in logs.items() if k.startswith("deadwatch/")}) for step, logs in seen]
    assert [(step, values) for step, values in ours if values] == [(r["step"], expected(r)) for r in log.records]
    assert "loss" in next(logs for step, logs in seen if step == 5)    # on the Trainer's own log of that step


def test_hf_logs_reach_a_report_to_integration(tmp_path):
    """report_to integrations come before the user's callbacks in the Trainer's list: the callback goes first."""
    callback = hf_callback(logdir=str(tmp_path / "dw"))
    trainer = hf_trainer(tmp_path / "out", GatedHF(), gated_rows(), [callback], max_steps=TOTAL,
                         report_to=["tensorboard"])
    assert trainer.callback_handler.callbacks[-2] is callback    # after the integration, before train()
    trainer.train()
    log = runlog.read(str(tmp_path / "dw"))
    (events,) = glob.glob(str(tmp_path / "out" / "**" / "events.out.tfevents.*"), recursive=True)   # HF's own
    acc = ea.EventAccumulator(events)
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if "deadwatch/dead_fraction/all" in t]
    assert len(tags) == 1, acc.Tags()["scalars"]                 # HF's TensorBoard callback writes train/<key>
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tags[0])] == [
        (r["step"], r["dead_fraction"]) for r in log.records]


def test_hf_trainer_logs_off(tmp_path):
    transformers = pytest.importorskip("transformers")

    class Reader(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    seen = []
    trainer = hf_trainer(tmp_path, GatedHF(), gated_rows(), [Reader(), hf_callback(trainer_logs=False)],
                         max_steps=TOTAL, logging_steps=4)
    trainer.train()
    assert seen and not [k for logs in seen for k in logs if k.startswith("deadwatch/")]


def test_hf_resume_equals_the_unbroken_run(tmp_path):
    def train(out, resume=None, max_steps=TOTAL):
        callback = hf_callback(logdir=str(tmp_path / f"dw_{os.path.basename(out)}"))
        trainer = hf_trainer(out, GatedHF(), gated_rows(), [callback], max_steps=max_steps, save_strategy="steps",
                             save_steps=RESTART)
        trainer.train(resume_from_checkpoint=resume)
        assert trainer.state.global_step == max_steps
        return callback.report(), trainer

    straight, _ = train(tmp_path / "straight")
    interrupted, _ = train(tmp_path / "broken", max_steps=RESTART)          # stops at step 6: checkpoint-6
    assert os.path.isfile(tmp_path / "broken" / f"checkpoint-{RESTART}" / "deadwatch_state.pt")
    assert interrupted.step == RESTART
    resumed, trainer = train(tmp_path / "broken", resume=str(tmp_path / "broken" / f"checkpoint-{RESTART}"))

    assert straight.step == resumed.step == trainer.state.global_step == TOTAL
    assert straight.layer("act").dead_units == GATE_DEAD == [1, 2, 5]
    assert resumed.layer("act").last_fired == straight.layer("act").last_fired
    assert resumed == straight    # every site: dead units, status, observations, last_fired, causes


def test_hf_resume_without_the_monitor_state_warns_and_starts_afresh(tmp_path):
    callback = hf_callback(logdir=str(tmp_path / "dw1"))
    hf_trainer(tmp_path / "a", GatedHF(), gated_rows(), [callback], max_steps=RESTART, save_strategy="steps",
               save_steps=RESTART).train()
    checkpoint = tmp_path / "a" / f"checkpoint-{RESTART}"
    os.remove(checkpoint / "deadwatch_state.pt")
    callback = hf_callback(logdir=str(tmp_path / "dw2"))
    trainer = hf_trainer(tmp_path / "a", GatedHF(), gated_rows(), [callback], max_steps=TOTAL)
    with pytest.warns(RuntimeWarning, match=r"resumed at step 6 but .*deadwatch_state.pt does not exist.*afresh"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert callback.report().step == TOTAL - RESTART       # counted from the resume only


def test_hf_no_extra_logs_when_logging_is_off(tmp_path):
    """logging_strategy="no": the callback asks for no log of its own (only the Trainer's final metrics log)."""
    transformers = pytest.importorskip("transformers")

    class Reader(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append((state.global_step, sorted(logs)))

    seen = []
    trainer = hf_trainer(tmp_path, GatedHF(), gated_rows(), [Reader(), hf_callback(logdir=str(tmp_path / "dw"))],
                         max_steps=TOTAL, logging_strategy="no")
    trainer.train()
    assert [step for step, _ in seen] == [TOTAL] and "train_runtime" in seen[0][1]
