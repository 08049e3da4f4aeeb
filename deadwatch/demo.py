"""The demo: two small ReLU networks on real data, one healthy and one that kills its units.

Data: scikit-learn's bundled `load_digits` (8x8 handwritten digits, shipped inside
the package, no download); generated blobs when scikit-learn is absent.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .monitor import watch

STEPS = 300
BATCH = 64


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(10, 64, generator=g) * 3
        y = torch.randint(0, 10, (1800,), generator=g)
        return centres[y] + torch.randn(1800, 64, generator=g), y, "generated blobs (scikit-learn not installed)"
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(digits.target), "scikit-learn load_digits (1797 8x8 digits)"


class DigitNet(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.hidden1 = nn.Linear(64, width)
        self.act1 = nn.ReLU()
        self.hidden2 = nn.Linear(width, width)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.hidden2(self.act1(self.hidden1(x)))))


def healthy() -> tuple[nn.Module, float]:
    """He initialisation, a sane learning rate."""
    net = DigitNet()
    for layer in (net.hidden1, net.hidden2, net.out):
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    return net, 0.05


def dying() -> tuple[nn.Module, float]:
    """Biases initialised negative and a learning rate too high: the textbook way to kill ReLUs."""
    net = DigitNet()
    nn.init.constant_(net.hidden2.bias, -1.0)
    return net, 0.3


def train(name: str, make: Callable[[], tuple[nn.Module, float]], x: torch.Tensor, y: torch.Tensor,
          logdir: str | None) -> None:
    torch.manual_seed(0)
    net, lr = make()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    with watch(net, logdir=logdir, window=50, report_every=20, reporters=["jsonl", "tensorboard"] if logdir else [],
               optimizer=opt) as monitor:
        for _ in range(STEPS):
            idx = torch.randint(0, len(x), (BATCH,), generator=g)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    print(f"{name}: lr={lr}, final loss {loss.item():.3f}, accuracy {accuracy:.1%}")
    return monitor.report()


def _clear(logdir: str) -> None:
    """The demo starts its runs afresh: remove what an earlier demo wrote there (its run log and event files)."""
    if not os.path.isdir(logdir):
        return
    for name in os.listdir(logdir):
        if name == "deadwatch.jsonl" or name.startswith("events.out.tfevents."):
            os.remove(os.path.join(logdir, name))


def run(logdir: str | None = None) -> dict[str, object]:
    """Train both networks; returns their final reports by name."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x, y, source = load_data()
    print(f"data: {source}; {STEPS} steps of batch {BATCH}, window 50 steps")
    reports = {}
    for name, make in (("healthy", healthy), ("dying", dying)):
        if logdir:
            _clear(os.path.join(logdir, name))
        reports[name] = train(name, make, x, y, os.path.join(logdir, name) if logdir else None)
    return reports
