"""Training-step overhead of deadwatch at defaults (reporters off), paired against plain steps.

A plain, a watched and a naively counted copy of each model live in one process;
their steps are interleaved one by one, rotating which goes first, and the
medians are compared: whole-run timings on a shared machine drift by more than
the effect. Every activation site is watched, the functional GELU included.
The naive reference counts (out > 0) per unit in three passes, as a hand-written
hook would.

    python benchmarks/overhead.py [--steps 300] [--rounds 1] [--threads 1] [--models mlp,cnn,transformer]

`--models small` times a small CNN on 8x8 digit-sized inputs (batch 64, steps of about 2 ms), where
deadwatch's fixed cost per step and per site shows most.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import deadwatch


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class CNN(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[BasicBlock(c) for _ in range(3)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))  # functional activation, as many models do


class Transformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.out = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.emb(x)))


class SmallCNN(nn.Module):
    """Digits-sized: 1x8x8 -> conv 16 -> pool -> conv 32 -> linear 64 -> 10; three ReLU sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        self.fc, self.act3 = nn.Linear(32 * 4 * 4, 64), nn.ReLU()
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.act1(self.conv1(x)), 2)
        h = self.act2(self.conv2(h)).flatten(1)
        return self.out(self.act3(self.fc(h)))


def workloads() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": (MLP(), torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)),
        "cnn": (CNN(), torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)),
        "transformer": (Transformer(), torch.randint(0, 1000, (16, 64), generator=g),
                        torch.randint(0, 1000, (16, 64), generator=g)),
        "small": (SmallCNN(), torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)),
    }


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, monitor=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        t0 = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step()
        return time.perf_counter() - t0
    return step


class NaiveCounter:
    """The reference to beat: a forward hook per activation (and a wrapper for the functional GELU)
    counting (out > 0) per unit in three passes: compare, cast, sum."""

    def __init__(self, model: nn.Module) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        for m in model.modules():
            if isinstance(m, (nn.ReLU, nn.GELU)):
                m.register_forward_hook(lambda mod, args, out: self.count(id(mod), out))
        self.gelu = F.gelu

    def count(self, key: int, out: torch.Tensor) -> None:
        unit = -1 if out.ndim == 3 else 1
        dims = tuple(d for d in range(out.ndim) if d != unit % out.ndim)
        fired = (out.detach() > 0).float().sum(dims)
        self.counts[key] = self.counts[key] + fired if key in self.counts else fired

    def __enter__(self) -> None:
        F.gelu = lambda x, *a, **k: self._gelu(x, *a, **k)

    def _gelu(self, x, *a, **k):
        out = self.gelu(x, *a, **k)
        self.count(id(self._gelu), out)
        return out

    def __exit__(self, *exc) -> None:
        F.gelu = self.gelu


def interleave(steps: list, n: int, warmup: int) -> list[float]:
    """Run the steps one after another, rotating which goes first; the median time of each."""
    times: list[list[float]] = [[] for _ in steps]
    for i in range(warmup + n):
        order = [(i + j) % len(steps) for j in range(len(steps))]
        for j in order:
            t = steps[j]()
            if i >= warmup:
                times[j].append(t)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each pairing, report the median round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loads = workloads()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} interleaved steps each, medians "
          f"(median round of {args.rounds})")
    print(f"{'model':<12} {'plain ms':>9} {'watched ms':>11} {'ratio':>7} {'naive ms':>9} {'naive ratio':>12}")
    worst = 0.0
    for name in args.models.split(","):
        model, x, y = loads[name]
        twin, naive_twin = copy.deepcopy(model), copy.deepcopy(model)
        naive = NaiveCounter(naive_twin)
        naive_step = make_step(naive_twin, x, y)

        def naive_counted() -> float:
            with naive:
                return naive_step()

        with deadwatch.watch(twin, reporters=[]) as monitor:
            steps = [make_step(model, x, y), make_step(twin, x, y, monitor), naive_counted]
            rounds = sorted((interleave(steps, args.steps, args.warmup) for _ in range(args.rounds)),
                            key=lambda r: r[1] / r[0])
            p, w, n = rounds[len(rounds) // 2]
        worst = max(worst, w / p)
        print(f"{name:<12} {1e3 * p:>9.2f} {1e3 * w:>11.2f} {w / p:>7.3f} {1e3 * n:>9.2f} {n / p:>12.3f}"
              f"   (+{1e3 * (w - p):.2f} ms a step)")
    print(f"worst ratio {worst:.3f}")


if __name__ == "__main__":
    main()
