"""The benchmark scripts still run: the CUDA-graphs check on CPU (its smoke mode, as no GPU is here) and a
few steps of the overhead script. These check the scripts, not the figures: timings are never tested."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark(name: str):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cuda_graphs_script_smoke_on_cpu():
    """Compiled (fullgraph, mode="reduce-overhead") and eager watched runs agree on the planted dead units."""
    done = run("benchmarks/cuda_graphs.py", "--device", "cpu", "--steps", "12")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 graph breaks" in done.stdout and done.stdout.rstrip().endswith("OK"), done.stdout


def test_overhead_script_runs():
    done = run("benchmarks/overhead.py", "--models", "small", "--steps", "4", "--warmup", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "small" in done.stdout and "worst watched/plain" in done.stdout, done.stdout


def test_overhead_script_times_the_pruned_boundaries():
    done = run("benchmarks/overhead.py", "--boundaries", "--models", "cnn", "--steps", "2", "--warmup", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hooked modules   5 pruned,   6 all" in done.stdout, done.stdout  # the ReLU called twice keeps its block


def test_overhead_script_times_a_cold_start_and_runs_without_the_fused_pass():
    done = run("benchmarks/overhead.py", "--cold-start", "--models", "small", "--steps", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "small step   1:" in done.stdout and ("kernel ready" in done.stdout or "kernel not ready" in done.stdout)
    done = run("benchmarks/overhead.py", "--no-fused", "--models", "small", "--steps", "3", "--warmup", "1")
    assert done.returncode == 0 and "fused pass off (--no-fused)" in done.stdout, done.stdout + done.stderr


def test_ratio_pairs_each_step_with_the_plain_step_of_its_round():
    """Steps that switch between a quiet and a contended speed (1.45x): a copy 5% slower than plain whose two
    steps after a switch were contended while plain's were not reads 1.24 by the ratio of the two medians,
    1.05 paired with the plain step of the same round."""
    overhead = benchmark("overhead")
    plain_speed = [1.0] * 10 + [1.45] * 10
    watched_speed = [1.0] * 8 + [1.45] * 12  # rounds 9 and 10: the switch came between the two steps
    run = overhead.Timed([[0.2 * s for s in plain_speed], [0.21 * s for s in watched_speed]])
    assert run.median(1) / run.median(0) == pytest.approx(1.243, abs=1e-3)
    assert run.ratio(1) == pytest.approx(1.05)
    assert run.ratio(0) == 1.0


def test_versus_script_runs_against_another_checkout(tmp_path):
    """Both versions watch their own copy in the same rounds (here this checkout against itself)."""
    done = run("benchmarks/versus.py", ROOT, "--models", "small", "--steps", "3", "--warmup", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("small"), done.stdout
    done = run("benchmarks/versus.py", str(tmp_path), "--steps", "1")
    assert done.returncode != 0 and "has no deadwatch/ package" in done.stderr, done.stdout + done.stderr


def test_plain_copies_run_with_the_original_functions_under_two_versions_wrappers():
    """versus.py: both versions wrap F.relu, one around the other; the plain copies' steps see neither."""
    import torch.nn.functional as F
    overhead = benchmark("overhead")
    original = F.relu

    def inner(*a, **k):
        return original(*a, **k)

    def outer(*a, **k):
        return inner(*a, **k)
    inner.__deadwatch_original__, outer.__deadwatch_original__ = original, inner
    F.relu = outer
    try:
        seen = overhead.Unpatched().wrap(lambda: F.relu)()
        assert F.relu is outer
    finally:
        F.relu = original
    assert seen is original
