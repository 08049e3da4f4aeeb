"""The size of each optimizer update relative to the weights it changes, per producer layer: evidence
for the large_update cause (causes.py).

Every EVERY-th step, ||dW|| / ||W|| of each watched site's producer weight over that one step: the
weights (or a fixed sample of SAMPLE of their values, for big layers) are copied at the end of the
step before and compared at the end of the step itself. Everything stays on the weights' device and
the training path never waits for it: the ratios reach the host in the report path. The history is
a fixed buffer of CAPACITY measurements per weight: when it is full, neighbouring entries merge
(the larger ratio kept) and the stride doubles, so a long run keeps its whole history at a coarser
grain, in constant memory.

Cost, on 2 steps of every EVERY only (the others return at once): a copy of at most SAMPLE values per
layer (one gather per big layer, one foreach copy for the others), then one subtraction and one norm
op over the copies of all layers of a device and dtype. benchmarks/overhead.py's upd% column times it
where it runs. A random sample of 4096 values reads a dense update's ratio within 5% of the whole
weight's (200 trials with per-unit update sizes spread uniformly: median error 1%, largest 4.6%). No
optimizer is needed: the update is whatever changed the weights between two steps; a recycling in
between (forget()) is not one.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

EVERY = 20        # measure the update of every EVERY-th step (0: never; benchmarks/overhead.py --update-every)
SAMPLE = 1 << 12  # weights with more values are measured on a fixed sample of this many
NOW, BEFORE = 0, 1  # the rows of a group's copies: history rows hold (update norm, weight norm) in this order
CAPACITY = 128    # measurements kept per weight before neighbours merge


class _Group:
    """The measured weights of one device and dtype, and their history.

    The copies live in one (2, weights, width) buffer: [BEFORE] the values at the end of the step before,
    [NOW] those at the end of the step itself, then the update (now - before); zero past each weight's own
    values. So one op gives the norms of the update and of the old values for every weight of the group,
    straight into history[row] ((CAPACITY, 2, weights): update norm, weight norm); the ratios are taken
    on the host in the report path."""

    def __init__(self) -> None:
        self.params: list[tuple[nn.Module, str, int]] = []  # (layer, attribute, seed): read at each copy
        self.history: torch.Tensor | None = None
        self.layout: list[tuple] | None = None   # (shape, dtype, device) of each weight the buffer is for
        self.index: list[torch.Tensor | None] = []  # the sampled positions of big weights
        self.views: list[list[torch.Tensor]] = []   # [into][k]: weight k's slots in buffer[into]
        self.buffer: torch.Tensor | None = None     # the copies, from a copy step to the next measurement
        self.before = False                         # buffer[BEFORE] holds copies for the next measure

    def add(self, layer: nn.Module, attr: str, seed: int) -> None:
        self.params.append((layer, attr, seed))
        self.layout = None  # laid out again for the new set of weights
        self.drop()
        if self.history is not None:
            self.history = torch.cat([self.history, self.history.new_full((CAPACITY, 2, 1), float("nan"))], 2)

    def lay_out(self) -> None:
        """The samples and the history's shape for the weights (when the set of weights changes, and again if
        a weight changed shape, dtype or device: any copies taken before are dropped)."""
        weights = [getattr(layer, attr) for layer, attr, _ in self.params]
        first = weights[0]
        self.index = []
        for (_, _, seed), w in zip(self.params, weights):
            if w.numel() > SAMPLE:  # a fixed sample, the same on every rank; the global RNG is left alone
                g = torch.Generator().manual_seed(seed)  # distinct positions, in memory order
                self.index.append(torch.randperm(w.numel(), generator=g)[:SAMPLE].sort().values.to(w.device))
            else:
                self.index.append(None)
        wide = torch.promote_types(first.dtype, torch.float32)  # bf16/fp16 copies summed in float32
        if self.history is None or self.history.device != first.device or self.history.dtype != wide:
            old = self.history
            self.history = torch.full((CAPACITY, 2, len(weights)), float("nan"), dtype=wide, device=first.device)
            if old is not None:
                self.history.copy_(old)
        self.layout = [(w.shape, w.dtype, w.device) for w in weights]
        self.drop()

    def drop(self) -> None:
        """No copies held: the buffer lives from the copy to the measurement only (one step in EVERY)."""
        self.buffer, self.views, self.before = None, [], False

    def copy(self, into: int) -> bool:
        """The weights' values (or samples) now, into buffer[into]: a gather per big weight, one foreach
        copy for the others. False (and nothing copied) when the weights changed shape, dtype or device
        since the copies before were taken."""
        weights = [getattr(layer, attr) for layer, attr, _ in self.params]
        if self.layout != [(w.shape, w.dtype, w.device) for w in weights]:
            self.lay_out()
            if into == NOW:
                return False
        if self.buffer is None:
            width = max(min(w.numel(), SAMPLE) for w in weights)
            self.buffer = torch.zeros(2, len(weights), width, dtype=weights[0].dtype, device=weights[0].device)
            self.views = [[self.buffer[k, j, :w.numel()].view(w.shape) if i is None else self.buffer[k, j, :SAMPLE]
                           for j, (w, i) in enumerate(zip(weights, self.index))] for k in range(2)]
        views, small, into_small = self.views[into], [], []
        for w, index, view in zip(weights, self.index, views):
            if index is None:
                small.append(w)
                into_small.append(view)
            else:
                torch.index_select(w.reshape(-1), 0, index, out=view)
        if small:
            torch._foreach_copy_(into_small, small)
        return True

    def measure(self, row: int) -> None:
        """This step's update against the copies the step before took: norms into history[row]; the copies
        are dropped."""
        if self.copy(NOW):
            self.buffer[NOW].sub_(self.buffer[BEFORE])
            torch.linalg.vector_norm(self.buffer, dim=2, dtype=self.history.dtype, out=self.history[row])
        self.drop()


class UpdateSizes:
    def __init__(self, every: int | None = None) -> None:
        self.every = EVERY if every is None else every
        self.names: list[str] = []                        # every measured weight
        self.where: dict[str, tuple[_Group, int]] = {}    # name -> its group and column there
        self.devices: dict[tuple[torch.device, torch.dtype], _Group] = {}
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
            group = self.devices.setdefault((w.device, w.dtype), _Group())
            group.add(layer, attr, seed=len(self.names) + 1)  # copies of the old set are dropped
            self.where[name] = (group, len(group.params) - 1)
            self.names.append(name)
        for group in self.devices.values():
            if group.layout is None and group.params:  # laid out now: the state keeps one size from here on
                group.lay_out()

    def end_of_step(self, step: int) -> None:
        """At the end of training step `step` (from 1): measure its update if the step before kept copies;
        keep copies if the next step is measured. Every other step returns at once."""
        copy = bool(self.every) and (step + 1) % self.every == 0
        if not copy and self.taken_for != step:
            return
        with torch.no_grad():
            measured = False
            for group in self.devices.values():
                if group.before and self.taken_for == step:
                    group.measure(self.rows)
                    measured = True
                group.drop()
            if measured:
                self.spans[self.rows] = (step - self.every + 1, step)
                self.rows += 1
                if self.rows == CAPACITY:
                    self._coarsen()
            if copy:
                for group in self.devices.values():
                    if group.params:
                        group.before = group.copy(BEFORE)
                self.taken_for = step + 1

    def forget(self) -> None:
        """The weights were changed outside the optimizer (recycling): the copies taken are no longer the
        start of the next update; the next measurement is skipped."""
        self.taken_for = -1
        for group in self.devices.values():
            group.drop()

    def _coarsen(self) -> None:
        half = CAPACITY // 2
        for group in self.devices.values():
            h = group.history
            if h is None:
                continue
            ratio = h[:, NOW] / h[:, BEFORE].clamp_min(torch.finfo(h.dtype).tiny)
            odd = (ratio[1::2] > ratio[0::2]) | ratio[0::2].isnan()  # the larger; a NaN (not measured) loses
            h[:half] = torch.where(odd[:, None], h[1::2], h[0::2])
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
        if group.history is None:
            return [], []
        norms = group.history[:self.rows, :, column].cpu().numpy().astype(float)
        values = norms[:, NOW] / np.maximum(norms[:, BEFORE], np.finfo(np.float32).tiny)
        kept = np.isfinite(values)
        return [tuple(span) for span in self.spans[:self.rows][kept].tolist()], values[kept].tolist()

    def stop(self) -> None:
        """No more measurements (the monitor closed): drop the copies and the references to the weights;
        the history stays for reports made after close()."""
        for group in self.devices.values():
            group.drop()
            group.layout = None
            group.params = []
            group.index = []
