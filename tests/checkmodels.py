"""Architectures and data for `deadwatch check --model/--data` in the tests (MODULE:CALLABLE)."""

from __future__ import annotations

import torch
from torch import nn

# Planted: BN channels 1, 3 scale 0 with shift <= 0 (certified); conv2 row 2 zero with bias < 0 (certified);
# conv2 bias 4 at -100 (dead on the data only).
CERTIFIED = {"2": [1, 3], "4": [2]}


def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 4))


def planted(dead_on_data=True):
    torch.manual_seed(0)
    m = build()
    with torch.no_grad():
        m[1].weight[[1, 3]] = 0.0
        m[1].bias[[1, 3]] = -0.2
        m[3].weight[2] = 0.0
        m[3].bias[2] = -0.1
        if dead_on_data:
            m[3].bias[4] = -100.0
    return m.eval()


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.zeros(4)) for _ in range(3)]


def not_iterable():
    return 3


def not_a_module():
    return "a string"
