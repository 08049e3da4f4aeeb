"""Tiny models with planted dead units, shared by the test files, and their reference figures.

Expected figures come from a plain re-computation of each training step's activations
(F.linear + relu on the same weights and inputs), not from deadwatch's own counters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch


class MLP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.act = nn.ModuleList(nn.ReLU() for _ in sizes[1:])

    def forward(self, x):
        for fc, act in zip(self.fc, self.act):
            x = act(fc(x))
        return x


def make_net(sizes, planted, seed=0):
    """Weights N(0, 0.5), biases 0.3; planted[i] = unit indices of layer i killed with a -1e4 bias."""
    torch.manual_seed(seed)
    net = MLP(sizes)
    with torch.no_grad():
        for i, fc in enumerate(net.fc):
            fc.weight.normal_(0.0, 0.5)
            fc.bias.fill_(0.3)
            if planted.get(i):
                fc.bias[list(planted[i])] = -1e4
    return net


def step_figures(net, x):
    """Per site: (values > 0 per unit, unit-step nonfinite, values per unit), recomputed by hand."""
    figures = {}
    h = x
    for i, fc in enumerate(net.fc):
        h = F.linear(h, fc.weight, fc.bias).clamp_min(0.0)   # relu; NaN stays NaN
        bad = ~torch.isfinite(h.amax(0))
        counts = (h > 0).sum(0).masked_fill(bad, 0)
        figures[f"act.{i}"] = (counts.numpy().astype(np.int64), bad.numpy(), h.shape[0])
    return figures


def report_ends(steps, report_every):
    """The steps at which a report is made: every `report_every` steps, and at the end."""
    ends = list(range(report_every, steps + 1, report_every))
    if steps % report_every:
        ends.append(steps)
    return ends


def watch_planted(logdir, *, sizes, planted, steps, report_every, window, batch, seed, reporters,
                  on_report=None, **overrides):
    """Forwards (train mode, no optimiser: weights stay put) of make_net(sizes, planted, seed) under
    deadwatch.watch. Returns (per-step figures, deadwatch's own Reports taken right after each periodic
    report and at the end)."""
    net = make_net(sizes, planted, seed)
    g = torch.Generator().manual_seed(seed + 1)
    history, own = [], []
    with deadwatch.watch(net, logdir=logdir, reporters=list(reporters), report_every=report_every,
                         window=window, **overrides) as monitor:
        for _ in range(steps):
            x = torch.randn(batch, sizes[0], generator=g)
            with torch.no_grad():
                net(x)
                history.append(step_figures(net, x))
            monitor.step()
            if monitor.steps % report_every == 0:
                own.append(monitor.report())
                if on_report is not None:
                    on_report(monitor.steps)
    if steps % report_every:
        own.append(monitor.report())
    return history, own


class Affine(nn.Module):
    """x * w + b per feature: unit u of the ReLU sees exactly input column u."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.b = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * self.w + self.b
