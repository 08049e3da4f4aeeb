"""deadwatch in a plain PyTorch training loop: two lines, `with deadwatch.watch(...)` and `monitor.step()`.

A small MLP learns scikit-learn's bundled 8x8 digits (no download). Its `hidden2` block starts with
biases of -1 and the learning rate is too high, the textbook way to kill ReLUs: deadwatch flags it.
The config is examples/custom.yaml (include/exclude, thresholds, reporters).

    python examples/plain_loop.py [--logdir runs/examples/plain_loop]
"""

import argparse
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import deadwatch

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom.yaml")
STEPS, BATCH = 300, 64


def block(n_in, n_out):
    return nn.Sequential(OrderedDict(fc=nn.Linear(n_in, n_out), act=nn.ReLU()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "plain_loop"))
    logdir = parser.parse_args().logdir

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)

    model = nn.Sequential(OrderedDict(
        encoder=block(64, 128), hidden1=block(128, 128), hidden2=block(128, 128), head=nn.Linear(128, 10)))
    model.encoder.requires_grad_(False)          # stands in for a frozen pretrained part
    nn.init.constant_(model.hidden2.fc.bias, -1.0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3, momentum=0.9)

    g = torch.Generator().manual_seed(1)
    with deadwatch.watch(model, config=CONFIG, logdir=logdir) as monitor:
        for _ in range(STEPS):
            idx = torch.randint(0, len(x), (BATCH,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()                         # once per training step

    report = monitor.report()
    for layer in report.flagged:
        print(f"flagged: {layer.name} {layer.status}, {len(layer.dead_units)}/{layer.units} units dead")
    print(f"\ndeadwatch logs: {logdir}")
    print(f"  deadwatch summary {logdir}")
    print(f"  tensorboard --logdir {logdir}")


if __name__ == "__main__":
    main()
