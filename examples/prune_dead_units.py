"""Certify dead channels and cut them out: a small CNN on scikit-learn's bundled 8x8 digits (no download).

The network is Conv(bias=False) -> BatchNorm -> ReLU, twice, then a linear head. It is trained with plain
SGD (no momentum) and a sparsity step on each BatchNorm channel: after every optimizer step, a channel's
(scale, shift) pair is shrunk towards 0 and set to exactly 0 once it is small (a proximal group-lasso step,
as in network slimming). Channels the task does not need end with scale 0 and shift 0: their output is 0
for every input and their gradient is 0, so plain SGD cannot bring them back. deadwatch, watching the
training with the optimizer, certifies them; deadwatch.prune() removes them (the conv rows, the norm
channels, the next layer's columns) with Torch-Pruning; the example prints parameters, multiply-accumulates
and CPU latency before and after, and the test accuracy of both models.

    python examples/prune_dead_units.py [--logdir runs/examples/prune]
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import deadwatch

EPOCHS, BATCH, LR, SHRINK = 12, 64, 0.1, 0.06   # SHRINK: the group-lasso weight (per step: LR * SHRINK)
REPORT_EVERY = 50


def data():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0   # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:400], order[400:]
    return x[train], y[train], x[test], y[test]


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 10))


def shrink(net, amount):
    """Proximal group-lasso step on every BatchNorm channel's (scale, shift): exactly 0 once small."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                norm = torch.sqrt(m.weight ** 2 + m.bias ** 2)
                factor = (1 - amount / norm.clamp_min(1e-12)).clamp_min(0)
                m.weight.mul_(factor)
                m.bias.mul_(factor)


def latency(net, x, repeats=30):
    """Median CPU time of one forward of `x`, in milliseconds."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "prune"))
    logdir = parser.parse_args().logdir
    torch.set_num_threads(1)                     # latency on one core: comparable between the two models
    x, y, x_test, y_test = data()
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=LR)   # no momentum: a zeroed channel cannot come back
    g = torch.Generator().manual_seed(1)
    with deadwatch.watch(net, logdir=logdir, optimizer=opt, report_every=REPORT_EVERY, window=REPORT_EVERY,
                         reporters=["jsonl", "tensorboard"]) as monitor:
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(x), generator=g).split(BATCH):
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                shrink(net, LR * SHRINK)
                monitor.step()
        trained = monitor.report()
    net.eval()
    during = {layer.name: len(layer.certified_units) for layer in trained.layers}
    report = deadwatch.scan(net, [x_test])          # eval mode, over the held-out digits
    result = deadwatch.prune(net, report, x_test)
    small = result.model
    with torch.no_grad():
        acc_before = (net(x_test).argmax(1) == y_test).float().mean().item()
        acc_after = (small(x_test).argmax(1) == y_test).float().mean().item()
        same = bool((net(x_test).argmax(1) == small(x_test).argmax(1)).all())
    one = x_test[:1]
    ms_before, ms_after = latency(net, one), latency(small, one)

    print(f"trained {EPOCHS} epochs, SGD lr {LR} without momentum, group-lasso step {LR * SHRINK:g} per step")
    print("certified at the last training report (dead through its window, optimizer checked): "
          + ", ".join(f"{site} {n}" for site, n in during.items()))
    for layer in report.layers:
        print(f"  {layer.name}: {len(layer.certified_units)} of {layer.units} channels certified, "
              f"{len(layer.dead_units)} dead on the test digits")
    print("\n".join(result.lines()))
    print(f"{'':>12} {'params':>8} {'MACs':>10} {'latency':>9} {'accuracy':>9}")
    print(f"{'before':>12} {result.params_before:>8,} {result.macs_before:>10,.0f} {ms_before:>7.3f}ms "
          f"{100 * acc_before:>8.1f}%")
    print(f"{'after':>12} {result.params_after:>8,} {result.macs_after:>10,.0f} {ms_after:>7.3f}ms "
          f"{100 * acc_after:>8.1f}%")
    print(f"same predictions on all {len(x_test)} test digits: {same}; largest output difference "
          f"{result.max_difference:.2g}")
    print(f"\ndeadwatch logs: {logdir}")
    print(f"  deadwatch summary {logdir}")
    print(f"  tensorboard --logdir {logdir}")


if __name__ == "__main__":
    main()
