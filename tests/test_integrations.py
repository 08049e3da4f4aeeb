"""The Lightning and Hugging Face Trainer callbacks, on real tiny runs on CPU.

Each run uses gradient accumulation over 2 micro-batches and planted dead units (a bias of -1e4
kills a unit exactly). Checked against what the run itself did (the micro-batches each
training step saw, recorded as they ran): one deadwatch step per optimizer step, one site per
activation (the second micro-batch of a step is not a second call), observations counting every
micro-batch of the report interval, dead units exactly the planted ones, and no hook left behind.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import deadwatch
from deadwatch.capture import active_function_patches
from deadwatch.reporters import runlog
from planted import make_net

SIZES = [6, 16, 12, 8]                     # make_net: sites net.act.0, net.act.1, net.act.2
PLANTED = {0: [2, 5], 1: [7]}              # dead units of net.act.0 and net.act.1
HEAD_PLANTED = [1, 3]                      # dead units of head.relu#0 (F.relu in a submodule's forward)
ROWS, BATCH, EPOCHS, REPORT_EVERY = 34, 4, 2, 4
MICRO_BATCHES = math.ceil(ROWS / BATCH)  # per epoch: 9, the last one of 2 rows


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'the model'}"
    assert active_function_patches() == 0
    deadwatch.watch(model, reporters=[]).close()  # the model is free to be watched again


def last_interval_rows(seen: list[tuple[int, int]], steps: int, report_every: int) -> int:
    """Rows of the micro-batches in the last report interval; seen = (optimizer steps before it, rows)."""
    start = (steps - 1) // report_every * report_every
    return sum(rows for step, rows in seen if step >= start)


def test_import_deadwatch_imports_no_framework():
    code = ("import sys, deadwatch, deadwatch.integrations; "
            "print(sorted(set(sys.modules) & {'lightning', 'pytorch_lightning', 'transformers', 'accelerate'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


# ---- Lightning ------------------------------------------------------------------------------------

try:
    import lightning as L
except ImportError:  # the Lightning tests skip; the classes below still need bases
    L = None
LightningModule, Callback = (L.LightningModule, L.Callback) if L else (nn.Module, object)


@pytest.fixture
def LightningCallback():
    pytest.importorskip("lightning")
    from deadwatch.integrations.lightning import DeadwatchCallback
    return DeadwatchCallback


class Head(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        with torch.no_grad():
            self.fc.bias.fill_(0.3)
            self.fc.bias[HEAD_PLANTED] = -1e4

    def forward(self, x):
        return F.relu(self.fc(x))


class Planted(LightningModule):
    """training_step calls the submodules, never the LightningModule's own forward."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = make_net(SIZES, PLANTED)
        self.head = Head(SIZES[-1], 5)
        self.fail_at = fail_at
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("training_step failed")
        x, y = batch
        self.seen.append((self.trainer.global_step, len(x)))
        return F.mse_loss(self.head(self.net(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def planted_data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(ROWS, SIZES[0], generator=g), torch.randn(ROWS, 5, generator=g)),
                      batch_size=BATCH)


def lightning_trainer(root, callbacks, **kwargs):
    options = dict(accelerator="cpu", devices=1, max_epochs=EPOCHS, accumulate_grad_batches=2, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=root, num_sanity_val_steps=0, log_every_n_steps=1)
    return L.Trainer(callbacks=callbacks, **{**options, **kwargs})


class ReportAtEpochEnd(Callback):
    """callback.report() during fit, with the trainer's step at that moment."""

    def __init__(self, watched):
        self.watched, self.reports = watched, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.reports.append((trainer.global_step, self.watched.report()))


def test_lightning_accumulation(tmp_path, LightningCallback):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model = Planted()
    callback = LightningCallback(reporters=["jsonl"], window=3, report_every=REPORT_EVERY, count_subsample=1)
    probe = ReportAtEpochEnd(callback)
    trainer = lightning_trainer(tmp_path, [callback, probe], logger=CSVLogger(tmp_path))
    with pytest.raises(RuntimeError, match="before trainer.fit"):
        callback.report()
    with pytest.raises(deadwatch.ConfigError, match="windw"):  # when the callback is built, not at fit
        LightningCallback(windw=3)
    assert_no_hooks(model)
    trainer.fit(model, planted_data())

    steps = trainer.global_step
    assert len(model.seen) == EPOCHS * MICRO_BATCHES  # every micro-batch ran
    assert steps == len({step for step, _ in model.seen}) < len(model.seen)  # accumulation did happen
    report = callback.report()
    assert report.step == steps
    assert [r.step for _, r in probe.reports] == [step for step, _ in probe.reports] and probe.reports[0][0] > 0
    assert [layer.name for layer in report.layers] == ["net.act.0", "net.act.1", "net.act.2", "head.relu#0"]
    rows = last_interval_rows(model.seen, steps, REPORT_EVERY)
    assert {layer.name: layer.observations for layer in report.layers} == dict.fromkeys(
        ["net.act.0", "net.act.1", "net.act.2", "head.relu#0"], rows)
    assert {layer.name: layer.dead_units for layer in report.layers} == {
        "net.act.0": PLANTED[0], "net.act.1": PLANTED[1], "net.act.2": [], "head.relu#0": HEAD_PLANTED}
    assert_no_hooks(model)
    # Without a logdir, the run log goes to <trainer.log_dir>/deadwatch
    assert runlog.read(os.path.join(trainer.log_dir, "deadwatch")).last == report


def test_lightning_exception_leaves_no_hook(tmp_path, LightningCallback):
    model = Planted(fail_at=3)
    callback = LightningCallback(logdir=tmp_path, reporters=["jsonl"])
    with pytest.raises(RuntimeError, match="training_step failed"):
        lightning_trainer(tmp_path, [callback]).fit(model, planted_data())
    assert callback.monitor is not None
    assert_no_hooks(model)


def test_pytorch_lightning_trainer(tmp_path, LightningCallback):
    """The standalone pytorch_lightning package runs the same callback."""
    pl = pytest.importorskip("pytorch_lightning")

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(SIZES, PLANTED)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1][:, :1].expand(-1, SIZES[-1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model, callback = Tiny(), LightningCallback(reporters=[], window=3)
    pl.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, callbacks=[callback], logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=tmp_path).fit(model, planted_data())
    report = callback.report()
    assert report.step == math.ceil(MICRO_BATCHES / 2)
    assert [layer.dead_units for layer in report.layers][:2] == [PLANTED[0], PLANTED[1]]
    assert_no_hooks(model)


# Resume: the units of site `act` are gated by the data, so that around the restart (after step 6 of 12,
# window 8: the final verdict looks at steps 4-11) only a restored window gets them right.
GATE_UNITS, TOTAL, RESTART, WINDOW = 6, 12, 6, 8
FIRES = {0: range(TOTAL), 2: [1], 3: [5], 4: [9], 5: [2, 3]}   # unit 1 is planted dead
GATE_DEAD = [u for u in range(GATE_UNITS) if not any(TOTAL - WINDOW <= s < TOTAL for s in FIRES.get(u, []))]


class Gated(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(GATE_UNITS, GATE_UNITS)
        with torch.no_grad():
            self.gate.weight.copy_(2 * torch.eye(GATE_UNITS))
            self.gate.bias.fill_(-0.5)
            self.gate.bias[1] = -1e4
        self.gate.requires_grad_(False)  # the gating stays as designed; fc and out train
        self.act = nn.ReLU()
        self.fc = nn.Linear(GATE_UNITS, 4)
        self.fc_act = nn.ReLU()
        self.out = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.out(self.fc_act(self.fc(self.act(self.gate(x))))).squeeze(1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class EpochSampler(Sampler):
    """Epoch e reads its own rows: the data of step s is the same whether or not the fit was resumed."""

    def __init__(self, rows_per_epoch: int):
        self.rows, self.epoch = rows_per_epoch, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this, also after a resume
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.epoch * self.rows, (self.epoch + 1) * self.rows))

    def __len__(self):
        return self.rows


def gated_data() -> DataLoader:
    """Two micro-batches of 3 rows per step; unit u is on in the first micro-batch of the steps FIRES[u]."""
    x = torch.zeros(TOTAL, 2, 3, GATE_UNITS)
    for unit, steps in FIRES.items():
        x[list(steps), 0, :, unit] = 1.0
    y = torch.randn(TOTAL * 6, generator=torch.Generator().manual_seed(2))
    return DataLoader(TensorDataset(x.reshape(-1, GATE_UNITS), y), batch_size=3,
                      sampler=EpochSampler(RESTART * 6))


def test_lightning_resume(tmp_path, LightningCallback):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(model, ckpt_path=None, checkpoints=()):
        callback = LightningCallback(reporters=[], window=WINDOW, report_every=5, count_subsample=1)
        trainer = lightning_trainer(tmp_path, [callback, *checkpoints], enable_checkpointing=bool(checkpoints),
                                    max_epochs=TOTAL // RESTART)
        trainer.fit(model, gated_data(), ckpt_path=ckpt_path)
        assert trainer.global_step == TOTAL
        return callback.report()

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight = fit(Gated(), checkpoints=[saver])
    resumed = fit(Gated(), ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={RESTART}.ckpt")

    assert straight.step == resumed.step == TOTAL
    assert straight.layer("act").dead_units == GATE_DEAD == [1, 2, 5]
    assert resumed == straight  # every site: dead units, status, observations, zero fractions


# ---- Hugging Face Trainer -------------------------------------------------------------------------

VOCAB, LENGTH = 40, 8
BERT_PLANTED = {0: [0, 36], 1: [17]}
BERT_SITES = [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]


def hf_parts(tmp_path, callbacks, reporters=("jsonl",), real=None, **overrides):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from deadwatch.integrations.transformers import DeadwatchCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=LENGTH, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    for layer, units in BERT_PLANTED.items():
        with torch.no_grad():
            model.bert.encoder.layer[layer].intermediate.dense.bias[units] = -1e4
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": label} for ids, label in
            zip(torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g), torch.randint(0, 2, (ROWS,), generator=g))]
    if real is not None:  # the first `real` tokens of each row are real, the rest padding
        for row in data:
            row["attention_mask"] = (torch.arange(LENGTH) < real).long()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none", save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    callback = DeadwatchCallback(reporters=list(reporters), window=3,
                                 report_every=REPORT_EVERY, count_subsample=1, exclude=[r"\.pooler\."], **overrides)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, *callbacks])
    return model, trainer, callback


def test_hf_trainer_accumulation(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    class ReportAtEpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            reports.append((state.global_step, callback.report()))

    reports = []
    model, trainer, callback = hf_parts(tmp_path, [ReportAtEpochEnd()])
    with pytest.raises(RuntimeError, match="before trainer.train"):
        callback.report()
    with pytest.raises(deadwatch.ConfigError, match="windw"):
        type(callback)(windw=3)
    seen = []  # (optimizer steps before, rows) per micro-batch, recorded by the model's own forward
    recorder = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((trainer.state.global_step, len(kwargs["input_ids"]))), with_kwargs=True)
    trainer.train()
    recorder.remove()

    steps = trainer.state.global_step
    assert len(seen) == EPOCHS * MICRO_BATCHES
    assert steps == len({step for step, _ in seen}) < len(seen)
    report = callback.report()
    assert report.step == steps
    assert [r.step for _, r in reports] == [step for step, _ in reports] and reports[0][0] > 0
    assert [layer.name for layer in report.layers] == BERT_SITES
    rows = last_interval_rows(seen, steps, REPORT_EVERY)
    assert [layer.observations for layer in report.layers] == [rows * LENGTH] * 2
    assert [layer.dead_units for layer in report.layers] == [BERT_PLANTED[0], BERT_PLANTED[1]]
    assert_no_hooks(model)
    # Without a logdir, the run log goes to <logging_dir>/deadwatch (<output_dir>/deadwatch in transformers 5)
    logging_dir = getattr(trainer.args, "logging_dir", None) or trainer.args.output_dir
    assert runlog.read(os.path.join(logging_dir, "deadwatch")).last == report


def test_hf_trainer_counts_real_tokens_only(tmp_path):
    """The callback passes each batch's attention_mask to the monitor: padding is not data."""
    model, trainer, callback = hf_parts(tmp_path, [], real=5)
    seen = []
    recorder = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((trainer.state.global_step, len(kwargs["input_ids"]))), with_kwargs=True)
    trainer.train()
    recorder.remove()
    rows = last_interval_rows(seen, trainer.state.global_step, REPORT_EVERY)
    report = callback.report()
    assert [layer.observations for layer in report.layers] == [rows * 5] * 2
    assert [layer.dead_units for layer in report.layers] == [BERT_PLANTED[0], BERT_PLANTED[1]]
    assert_no_hooks(model)


def test_hf_trainer_failed_train_then_retry(tmp_path):
    """The Trainer has no exception hook: close(error=...) lets go, and a retried train() works."""
    model, trainer, callback = hf_parts(tmp_path, [], reporters=())

    def fail(module, args, kwargs):
        raise RuntimeError("forward failed")

    failing = model.register_forward_pre_hook(fail, with_kwargs=True)
    with pytest.raises(RuntimeError, match="forward failed"):
        trainer.train()
    failing.remove()
    trainer.train()  # the monitor left open by the failed train() is closed, a new one opened
    assert callback.report().step == trainer.state.global_step
    assert_no_hooks(model)

    failing = model.register_forward_pre_hook(fail, with_kwargs=True)
    with pytest.raises(RuntimeError, match="forward failed") as failure:
        trainer.train()
    failing.remove()
    callback.close(error=failure.value)  # what docs/integrations.md tells users to do
    assert_no_hooks(model)


# ---- the optimizer reaches the monitor: causes' evidence and automatic recycling ------------------

RECYCLE_ALL = {"every": 1, "units": "dead", "max_fraction": 1.0}


class PlantedSequential(LightningModule):
    """An nn.Sequential MLP (recycling reads its layers from the Sequential) with units 1 and 4 of its first
    ReLU dead."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(SIZES[0], 8), nn.ReLU(), nn.Linear(8, 5))
        with torch.no_grad():
            self.net[0].bias[[1, 4]] = -1e4

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_lightning_callback_passes_the_optimizer_and_recycles(tmp_path, LightningCallback):
    torch.manual_seed(0)
    model = PlantedSequential()
    callback = LightningCallback(logdir=str(tmp_path / "dw"), reporters=["jsonl"], window=3,
                                 report_every=REPORT_EVERY, count_subsample=1, recycle=RECYCLE_ALL)
    trainer = lightning_trainer(tmp_path, [callback])
    trainer.fit(model, planted_data())
    assert callback.monitor.optimizer is trainer.optimizers[0]
    recycled = runlog.read(str(tmp_path / "dw")).recycles
    assert recycled, "automatic recycling never ran"
    assert recycled[0][1]["units"] == {"net.1": [1, 4]}


def test_hf_callback_passes_the_optimizer(tmp_path):
    """The Trainer's optimizer reaches the monitor, so the automatic recycling can be turned on. (BERT's
    intermediate activations are read by a layer of another module, BertOutput: the site map finds it.)"""
    model, trainer, callback = hf_parts(tmp_path, [], recycle=RECYCLE_ALL)
    trainer.train()
    assert callback.monitor.optimizer is trainer.optimizer
    logging_dir = getattr(trainer.args, "logging_dir", None) or trainer.args.output_dir
    recycled = runlog.read(os.path.join(logging_dir, "deadwatch")).recycles
    assert recycled and recycled[0][1]["units"] == {BERT_SITES[0]: BERT_PLANTED[0], BERT_SITES[1]: BERT_PLANTED[1]}
