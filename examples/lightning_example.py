"""deadwatch in Lightning: `Trainer(callbacks=[DeadwatchCallback(...)])`.

A small CNN learns scikit-learn's bundled 8x8 digits (no download) with gradient accumulation over
2 batches: deadwatch counts one step per optimizer step. Its logs go next to Lightning's, under the
logger's version directory (`<trainer.log_dir>/deadwatch`).

    python examples/lightning_example.py [--logdir runs/examples/lightning]
"""

import argparse
import os

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deadwatch.integrations.lightning import DeadwatchCallback


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))                   # an activation function: site "net.relu#0"
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # "net.relu#1"; units are the 32 channels
        return self.fc(x.flatten(1))


class DigitClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ConvNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "lightning"),
                        help="Lightning's root dir: its logs, checkpoints and deadwatch's")
    root = parser.parse_args().logdir

    L.seed_everything(0, verbose=False)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    data = DataLoader(TensorDataset(x, torch.tensor(digits.target)), batch_size=32, shuffle=True)

    deadwatch_cb = DeadwatchCallback(window=50, report_every=50)  # logdir: <trainer.log_dir>/deadwatch
    trainer = L.Trainer(max_epochs=4, accumulate_grad_batches=2, callbacks=[deadwatch_cb],
                        logger=TensorBoardLogger(root, name="digits"), default_root_dir=root,
                        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=10)
    trainer.fit(DigitClassifier(), data)

    report = deadwatch_cb.report()
    print(f"\n{report.step} optimizer steps ({trainer.global_step} in Lightning), "
          f"{len(report.flagged)} site(s) flagged")
    logdir = deadwatch_cb.monitor.logdir
    print(f"deadwatch logs: {logdir}")
    print(f"  deadwatch summary {logdir}")
    print(f"  tensorboard --logdir {root}   (Lightning's curves and deadwatch's dashboards together)")


if __name__ == "__main__":
    main()
