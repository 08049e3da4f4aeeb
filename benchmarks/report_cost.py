"""Cost of a report and size of the monitor's state.

    python benchmarks/report_cost.py [--sites 200] [--units 16384] [--repeat 20]

Builds a model with SITES ReLU sites of UNITS units each, runs a few watched steps, then
times monitor.report() (median of REPEAT) and counts the host transfers (Tensor.cpu) and
collectives it makes. Prints the monitor's state in bytes per unit for two batch sizes (it
must not depend on them). --distributed runs the same under a one-rank gloo process group:
the packed path every multi-process or GPU run takes (one buffer, one all_reduce, one copy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

import deadwatch


class ManySites(nn.Module):
    def __init__(self, sites: int) -> None:
        super().__init__()
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(sites))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(act(x) for act in self.acts)


def state_bytes(monitor: deadwatch.Monitor) -> int:
    """Every per-unit buffer the counters declare (stats.BUFFERS), and any other tensor they hold."""
    total = 0
    for counters in monitor._registry.by_device.values():
        for t in vars(counters).values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def run(sites: int, units: int, batch: int, repeat: int) -> tuple[float, int, float]:
    model = ManySites(sites)
    with deadwatch.watch(model, reporters=[], report_every=10**9) as monitor:
        for _ in range(3):
            model(torch.randn(batch, units))
            monitor.step()
        monitor.report()  # warm-up
        calls = {"cpu": 0, "all_reduce": 0}
        originals = {"cpu": torch.Tensor.cpu, "all_reduce": torch.distributed.all_reduce}

        def counting(name):
            def call(*a, **k):
                calls[name] += 1
                return originals[name](*a, **k)
            return call

        torch.Tensor.cpu = counting("cpu")
        torch.distributed.all_reduce = counting("all_reduce")
        try:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                monitor.report()
                times.append(time.perf_counter() - t0)
        finally:
            torch.Tensor.cpu = originals["cpu"]
            torch.distributed.all_reduce = originals["all_reduce"]
        per_report = {k: v / repeat for k, v in calls.items()}
        return statistics.median(times), per_report, state_bytes(monitor) / (sites * units)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=200)
    ap.add_argument("--units", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--distributed", action="store_true", help="under a one-rank gloo process group")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.distributed:
        store = os.path.join(tempfile.mkdtemp(), "store")
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    mode = "one-rank gloo group (packed path)" if args.distributed else "single CPU process (buffers read in place)"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.sites} sites x {args.units} units, {mode}")
    for batch in (2, 32):
        seconds, calls, per_unit = run(args.sites, args.units, batch, args.repeat)
        print(f"batch {batch:>3}: report() {1e3 * seconds:7.1f} ms (median of {args.repeat}), per report "
              f"{calls['cpu']:g} host transfer(s) and {calls['all_reduce']:g} all_reduce(s); "
              f"state {per_unit:.1f} bytes per unit")
    if args.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
