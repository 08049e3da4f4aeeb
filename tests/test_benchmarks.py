"""The benchmark scripts still run: the CUDA-graphs check on CPU (its smoke mode, as no GPU is here) and a
few steps of the overhead script. These check the scripts, not the figures: timings are never tested."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
