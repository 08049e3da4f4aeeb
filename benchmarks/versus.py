"""This deadwatch against another checkout of it, in one process: is a change slower than before?

Two runs of overhead.py, one per version, differ by the VM's noise (about 1% on this one, the a/a column) and
by each run's share of quiet and contended stretches. Here both versions watch their own copy of each model in
the same rounds: a plain copy, a copy watched by this checkout's deadwatch, a copy watched by the other one (its
`deadwatch` package imported under another name, from a temporary copy), and a second plain copy, their steps
rotated through rounds as in overhead.py and each divided by the plain step of its round.

    python benchmarks/versus.py OTHER_CHECKOUT [--models mlp,cnn,transformer] [--steps 150] [--warmup 10]
    git worktree add /tmp/old 0d636c3 && python benchmarks/versus.py /tmp/old

Columns: plain median; this and other = each watched copy against plain; a/a = the second plain copy against
the first (the run's own error); this/other = the median over rounds of this version's step over the other's.
Both versions wrap the activation functions (F.relu, ...) for the whole process, so each watched copy also goes
through the other's wrappers (a check and a return); the plain copies go through neither.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import warnings

import torch

import deadwatch
import overhead


def load_other(checkout: str):
    """The other checkout's `deadwatch` package, as `deadwatch_other` (its imports are relative)."""
    source = os.path.join(checkout, "deadwatch")
    if not os.path.isfile(os.path.join(source, "__init__.py")):
        sys.exit(f"versus.py: {checkout!r} has no deadwatch/ package: give the root of another deadwatch checkout")
    where = tempfile.mkdtemp(prefix="deadwatch-versus-")
    shutil.copytree(source, os.path.join(where, "deadwatch_other"))
    sys.path.insert(0, where)
    return importlib.import_module("deadwatch_other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkout", help="the root of another deadwatch checkout (a git worktree of an older commit)")
    ap.add_argument("--models", default="mlp,cnn,transformer", help="as in overhead.py")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loads = overhead.workloads(None)
    names = args.models.split(",")
    unknown = [n for n in names if n not in loads]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(loads)}")
    other = load_other(args.checkout)
    warnings.simplefilter("ignore")  # the two versions' first-step notes
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} rounds; this checkout against "
          f"{args.checkout}; fused pass {overhead.fused_ready()}")
    print(f"{'model':<12} {'plain ms':>9} {'this':>7} {'other':>7} {'a/a':>7} {'this/other':>10}")
    bare = overhead.Unpatched().wrap
    for name in names:
        model, x, y = loads[name]()
        mine, theirs, again = (copy.deepcopy(model) for _ in range(3))
        with deadwatch.watch(mine, reporters=[]) as this_monitor, other.watch(theirs, reporters=[]) as other_monitor:
            steps = [bare(overhead.make_step(model, x, y)), overhead.make_step(mine, x, y, this_monitor),
                     overhead.make_step(theirs, x, y, other_monitor), bare(overhead.make_step(again, x, y))]
            run = overhead.interleave(steps, args.steps, args.warmup)
        versus = statistics.median(a / b for a, b in zip(run.times[1], run.times[2]))
        print(f"{name:<12} {1e3 * run.median(0):>9.2f} {run.ratio(1):>7.3f} {run.ratio(2):>7.3f} {run.ratio(3):>7.3f} "
              f"{versus:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
