"""Recycling dead units (ReDo) during training: the same network trained twice, plain and recycled.

A ReLU MLP learns scikit-learn's bundled 8x8 digits (no download) with Adam at a learning rate high
enough (0.05) to kill 30% of its units early on. The second run turns on deadwatch's automatic recycling
(`recycle: {every: 1, units: dead, max_fraction: ...}`): one step after every report, dead units get fresh incoming
weights, zeroed outgoing weights and a clean optimizer state. Both runs print their dead fraction and
loss over time and their final accuracy on held-out digits.

    python examples/recycle_dead_units.py [--logdir runs/examples/recycle]
"""

import argparse
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import deadwatch

STEPS, BATCH, LR = 600, 64, 0.05
REPORT_EVERY = 100           # steps between reports, and between recyclings in the recycled run
RECYCLE = {"every": 1, "units": "dead", "max_fraction": 0.5}


def data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:400], order[400:]
    return x[train], y[train], x[test], y[test]


def model():
    torch.manual_seed(0)                        # the same initial weights in both runs
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


class Reports:
    """A reporter of our own: keeps the periodic reports (made before that step's recycling)."""

    def __init__(self):
        self.reports = []

    def emit(self, report):
        self.reports.append(report)

    def close(self):
        pass


def run(name, logdir, x, y, x_test, y_test, recycle):
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    g = torch.Generator().manual_seed(1)        # the same batches in both runs
    losses, kept = [], Reports()
    config = {"window": REPORT_EVERY, "report_every": REPORT_EVERY, "reporters": ["jsonl", "tensorboard", kept]}
    if recycle:
        config["recycle"] = RECYCLE
    with deadwatch.watch(net, config=config, logdir=os.path.join(logdir, name), optimizer=opt) as monitor:
        for _ in range(STEPS):
            idx = torch.randint(0, len(x), (BATCH,), generator=g)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            monitor.step()                      # reports every REPORT_EVERY steps; with `recycle`, recycles one step later
    rows = [(r.step, r.dead_fraction, sum(losses[r.step - REPORT_EVERY:r.step]) / REPORT_EVERY) for r in kept.reports]
    with torch.no_grad():
        accuracy = (net.eval()(x_test).argmax(1) == y_test).float().mean().item()
    recycled = sum(len(r["units"][site]) for _, r in deadwatch.reporters.runlog.read(
        os.path.join(logdir, name)).recycles for site in r["units"])
    return rows, accuracy, recycled


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "recycle"))
    logdir = parser.parse_args().logdir
    x, y, x_test, y_test = data()
    plain, plain_acc, _ = run("plain", logdir, x, y, x_test, y_test, recycle=False)
    recycled, recycled_acc, units = run("recycled", logdir, x, y, x_test, y_test, recycle=True)

    print(f"Adam lr {LR}, {STEPS} steps; dead fraction (window {REPORT_EVERY} steps) and mean loss per "
          f"{REPORT_EVERY} steps (the dead fraction at each report; recycling follows one step later)")
    print(f"{'step':>6} | {'plain dead':>10} {'loss':>7} | {'recycled dead':>13} {'loss':>7}")
    for (step, dead_a, loss_a), (_, dead_b, loss_b) in zip(plain, recycled):
        print(f"{step:>6} | {100 * dead_a:>9.1f}% {loss_a:>7.3f} | {100 * dead_b:>12.1f}% {loss_b:>7.3f}")
    print(f"test accuracy (400 held-out digits): plain {100 * plain_acc:.1f}%, recycled {100 * recycled_acc:.1f}% "
          f"({units} units recycled)")
    print(f"\ndeadwatch logs: {os.path.join(logdir, 'recycled')}")
    print(f"  deadwatch summary {os.path.join(logdir, 'recycled')}")
    print(f"  deadwatch compare {os.path.join(logdir, 'plain')} {os.path.join(logdir, 'recycled')}")
    print(f"  tensorboard --logdir {logdir}")


if __name__ == "__main__":
    main()
