"""The size of each optimizer update relative to the weights it changes, per producer layer: evidence
for the large_update cause (causes.py).

Every EVERY-th step, ||dW|| / ||W|| of each watched site's producer weight over that one step: the
weights (or a fixed sample of SAMPLE of their values, for big layers) are copied at the end of the
step before and compared at the end of the step itself. Everything stays on the weights' device and
the training path never waits for it: the ratios reach the host in the report path. The history is
a fixed buffer of CAPACITY measurements per weight: when it is full, neighbouring entries merge
(the larger ratio kept) and the stride doubles, so a long run keeps its whole history at a coarser
grain, in constant memory.

Cost, every EVERY-th step only: one copy of at most SAMPLE values per layer, then a subtraction and
two norms over all layers of a device at once (foreach ops) and one write. No optimizer is needed:
the update is whatever changed the weights between two steps.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

EVERY = 10        # measure the update of every EVERY-th step (0: never; benchmarks/overhead.py --update-every)
SAMPLE = 1 << 16  # weights with more values are measured on a fixed sample of this many
CAPACITY = 128    # measurements kept per weight before neighbours merge


class _Device:
    """The measured weights on one device, and their history: CAPACITY rows, one column per weight."""

    def __init__(self, device: torch.device) -> None:
        self.params: list[tuple[nn.Module, str]] = []  # (layer, attribute): read at each copy, the layer's own
        self.index: list[torch.Tensor | None] = []     # the sampled positions of big weights
        self.before: list[torch.Tensor] | None = None  # copies taken at the end of the step before
        self.history = torch.full((CAPACITY, 0), float("nan"), device=device)

    def add(self, layer: nn.Module, attr: str, w: torch.Tensor, seed: int) -> None:
        self.params.append((layer, attr))
        n = w.numel()
        if n > SAMPLE:  # a fixed sample, the same on every rank; the global RNG is left alone
            g = torch.Generator().manual_seed(seed)
            self.index.append(torch.randint(0, n, (SAMPLE,), generator=g).to(w.device))
        else:
            self.index.append(None)
        self.history = torch.cat([self.history, self.history.new_full((CAPACITY, 1), float("nan"))], 1)

    def values(self) -> list[torch.Tensor]:
        weights = [getattr(layer, attr).detach() for layer, attr in self.params]
        # index_select of the flat view: the same values as torch.take, about 4x faster on CPU
        return [w.reshape(-1).clone() if i is None else w.reshape(-1).index_select(0, i) for w, i in zip(weights, self.index)]

    def measure(self, row: int) -> None:
        before, now = self.before, self.values()
        moved = torch._foreach_norm(torch._foreach_sub(now, before))
        size = torch._foreach_norm(before)
        ratio = torch.stack(moved).float() / torch.stack(size).float().clamp_min(torch.finfo(torch.float32).tiny)
        self.history[row].copy_(ratio)


class UpdateSizes:
    def __init__(self, every: int | None = None) -> None:
        self.every = EVERY if every is None else every
        self.names: list[str] = []                        # every measured weight
        self.where: dict[str, tuple[_Device, int]] = {}   # name -> its device group and column there
        self.devices: dict[torch.device, _Device] = {}
        self.spans = np.zeros((CAPACITY, 2), dtype=np.int32)  # (first, last step) each row stands for
        self.rows = 0
        self.taken_for = -1                               # the step the copies in `before` are for

    def track(self, weights: Iterable[tuple[str, nn.Module, str]]) -> None:
        """Measure these weights too: (name, layer, attribute); names already tracked are skipped. Only plain
        tensors that train: a sharded one (FSDP's DTensor) holds part of the weights on each rank."""
        for name, layer, attr in weights:
            w = getattr(layer, attr, None)
            if name in self.where or not isinstance(w, torch.Tensor) or not w.requires_grad or w.is_meta \
                    or type(w.detach()) is not torch.Tensor:
                continue
            group = self.devices.setdefault(w.device, _Device(w.device))
            group.add(layer, attr, w, seed=len(self.names) + 1)
            group.before = None  # copies of the old set of weights do not match the new one
            self.where[name] = (group, len(group.params) - 1)
            self.names.append(name)

    def end_of_step(self, step: int) -> None:
        """At the end of training step `step` (from 1): measure its update if the step before kept copies;
        keep copies if the next step is measured."""
        with torch.no_grad():
            measured = False
            for group in self.devices.values():
                if group.before is not None and self.taken_for == step:
                    group.measure(self.rows)
                    measured = True
                group.before = None
            if measured:
                self.spans[self.rows] = (step - self.every + 1, step)
                self.rows += 1
                if self.rows == CAPACITY:
                    self._coarsen()
            if self.every and (step + 1) % self.every == 0:
                for group in self.devices.values():
                    group.before = group.values() if group.params else None
                self.taken_for = step + 1

    def _coarsen(self) -> None:
        half = CAPACITY // 2
        for group in self.devices.values():
            h = group.history
            h[:half] = torch.fmax(h[0::2], h[1::2])  # fmax: a weight not measured yet (NaN) takes the other
            h[half:] = float("nan")
        self.spans[:half] = np.stack([self.spans[0::2, 0], self.spans[1::2, 1]], 1)
        self.spans[half:] = 0
        self.rows = half
        self.every *= 2

    def of(self, name: str) -> tuple[list[tuple[int, int]], list[float]]:
        """(spans, ratios) of one weight's measured updates, on the host (report path only)."""
        if name not in self.where or not self.rows:
            return [], []
        group, column = self.where[name]
        values = group.history[:self.rows, column].cpu().numpy().astype(float)
        kept = np.isfinite(values)
        return [tuple(span) for span in self.spans[:self.rows][kept].tolist()], values[kept].tolist()

    def stop(self) -> None:
        """No more measurements (the monitor closed): drop the copies and the references to the weights;
        the history stays for reports made after close()."""
        for group in self.devices.values():
            group.before = None
            group.params = []
            group.index = []
