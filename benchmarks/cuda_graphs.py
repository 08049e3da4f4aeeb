"""CUDA graphs on a watched model: torch.compile(mode="reduce-overhead") runs, stays correct, makes no host sync.

    python benchmarks/cuda_graphs.py [--device cuda|cpu] [--steps 20] [--warmup 8] [--no-fullgraph]

An MLP (a ReLU and a GELU layer) with planted dead units: a bias of -1e4 keeps a unit's
pre-activation below zero for every input, so it never fires and gets no gradient. Two runs from
the same weights on the same batches, each step forward, backward, SGD step and monitor.step():
watched then compiled (fullgraph=True, mode="reduce-overhead"), and watched eager. Checks:
(a) the compiled run runs (and on CUDA, that inductor did not skip CUDA graphs);
(b) every site's dead units are the planted ones, in both runs;
(c) on CUDA, no host sync in the compiled steps after --warmup: they run under
    torch.cuda.set_sync_debug_mode("error") (the warm-up steps compile and record the graphs;
    monitor.report(), allowed its one transfer, is outside).
`--device cpu` smoke-tests the script: on CPU "reduce-overhead" has no CUDA graphs and compiles as
the default mode, and the sync check needs CUDA. Prints one line per check; exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import deadwatch

PLANTED = {"act1": [3, 17, 40], "act2": [5, 60]}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(32, 64), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(64, 64), nn.GELU()
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))


def fail(reason: str) -> None:
    print(f"FAIL: {reason}")
    sys.exit(1)


def train(model: nn.Module, data: list, args: argparse.Namespace, compiled: bool) -> dict[str, list[int]]:
    """Train watched, compiled or eager; the dead units of every site."""
    cuda = args.device == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with deadwatch.watch(model, reporters=[], report_every=10**9) as monitor:
        net = torch.compile(model, mode="reduce-overhead", fullgraph=not args.no_fullgraph) if compiled else model
        for i, (x, y) in enumerate(data):
            checked = cuda and compiled and i >= args.warmup
            if checked:
                torch.cuda.set_sync_debug_mode("error")
            try:
                if cuda and compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                monitor.step()
            except Exception as e:  # noqa: BLE001 - one line, then exit 1
                what = "host sync" if checked and "synchroniz" in str(e) else type(e).__name__
                first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
                fail(f"{'compiled' if compiled else 'eager'} step {i + 1}: {what}: {first[:200]}")
            finally:
                if checked:
                    torch.cuda.set_sync_debug_mode("default")
        report = monitor.report()
    return {layer.name: layer.dead_units for layer in report.layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8, help="steps before the sync check starts (eager steps that "
                    "find sites, compilation, CUDA-graph recording)")
    ap.add_argument("--no-fullgraph", action="store_true", help="let the compiled model graph-break")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("CUDA is not available here; --device cpu runs the smoke test")
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        for site, units in PLANTED.items():
            getattr(model, "fc" + site[-1]).bias[units] = -1e4
    model = model.to(device)
    data = [(torch.randn(64, 32, generator=g).to(device), torch.randint(0, 10, (64,), generator=g).to(device))
            for _ in range(args.steps)]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{args.steps} steps, fullgraph={not args.no_fullgraph}")

    torch._dynamo.utils.counters.clear()
    dead = train(copy.deepcopy(model), data, args, compiled=True)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    if not graphs:
        fail("nothing was compiled: every compiled step ran eagerly")
    print(f"(a) compiled run ran: {graphs} graph(s), {breaks} graph breaks"
          + (f", CUDA graphs skipped {skips} time(s)" if device.type == "cuda" else ", no CUDA graphs on CPU"))
    if device.type == "cuda" and skips:
        fail(f"inductor skipped CUDA graphs {skips} time(s) (TORCH_LOGS=perf_hints says why)")
    eager = train(copy.deepcopy(model), data, args, compiled=False)
    if dead != eager:
        fail(f"compiled and eager verdicts differ: compiled {dead}, eager {eager}")
    if dead != PLANTED:
        fail(f"dead units {dead}, planted {PLANTED}")
    print(f"(b) dead units = planted = eager: {dead}")
    if device.type == "cuda":
        print(f"(c) no host sync in {args.steps - args.warmup} compiled steps (sync debug mode 'error')")
    else:
        print("(c) not checked: the host-sync check needs CUDA")
    print("OK")


if __name__ == "__main__":
    main()
