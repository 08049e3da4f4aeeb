"""The fused statistics pass: what stats.record() folds for one CPU output, in one call and one read of it.

The eager ops of record() cost a few microseconds of dispatch each, about ten per site and call, and inside
a training step (caches full of the layers' data) twice what they cost alone: on a MobileNetV3-small step
that was about as much as reading every activation once. fold.cpp does it all in one loop per output:
the per-unit max over every value, and on the counted rows the fired count, the sum of |output| and, at
bounded sites, the near-a-bound count, written (first call of a step) or added into the site's buffers.

It is plain C++ with no torch headers, so it builds in about a second: on a background thread, the first
time a CPU site is watched, into a cache directory (one build per machine and source); until it is ready,
and wherever it cannot serve, record() takes the eager ops. The training thread never waits for it.

Measured here, it is not used (and torch.compile'd kernels were no better, see docs/overhead.md):
* outputs not on the CPU: on a GPU every op is a kernel launch, not a loop of ours;
* dtypes other than float32, float64 and bfloat16 (float16: the eager ops);
* outputs of more than PARALLEL_FROM values when torch runs on several threads (the eager ops use them);
* a unit axis first, an output whose dims cannot be viewed as (lead, units, trail), or whose dtype differs
  from the site's buffers (autocast switched on mid-run);
* with `fused: false`, where no C++ compiler is found (silently), and, with one warning, where the build or
  the load fails.

Exactness: the max, the counts and the near-a-bound counts are the eager ops' to the bit (the limits are
rounded to the output's dtype first, as the eager ops round them; a value compares as `value - limit`
rounded to the dtype). A sum of |output| is taken in double, where the eager ops sum large calls in float32:
the two agree to float32 rounding, not to the bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .stats import Site

SOURCE = Path(__file__).with_name("fold.cpp")
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
PARALLEL_FROM = 1 << 16  # values: above, torch's own ops split the work over its threads (when it has several)
POSITIVE, BOUNDED, FIRST = 1, 2, 4  # flags, as fold.cpp reads them
LOCKED = 300  # seconds: the longest a build may take, and others wait for it


def _flags() -> list[str]:
    """The build's flags: AVX2 where this CPU has it (the cache key holds the flags, so a machine loads only a
    build made for what it has); the 64-bit baseline (SSE2, NEON) elsewhere."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w"]
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
        try:
            cpu = Path("/proc/cpuinfo").read_text()
        except OSError:
            return flags
        features = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), [])
        if {"avx2", "fma"} <= set(features):
            flags += ["-mavx2", "-mfma"]
    return flags


FLAGS = _flags()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deadwatch"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


class Kernel:
    """The built fold.cpp of this process: loaded from the cache, or built there on a background thread."""

    def __init__(self) -> None:
        self.fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
        self.started = False
        self.failed = False
        self.lock = threading.Lock()

    def start(self) -> None:
        """Load the cached build, or start building it; returns at once either way."""
        with self.lock:
            if self.started:
                return
            self.started = True
        target = self.target()
        if target is not None and target.exists():
            self.load(target)
        elif target is not None:
            threading.Thread(target=self.build, args=(target,), name="deadwatch-fold", daemon=True).start()

    def target(self) -> Path | None:
        cxx = compiler()
        if cxx is None or sys.platform == "win32":
            return None  # no compiler: the eager ops, silently (a supported setup, not an error)
        key = hashlib.sha256(SOURCE.read_bytes() + f"{cxx}|{FLAGS}|{platform.machine()}|{sys.platform}".encode()).hexdigest()[:16]
        return cache_dir() / f"fold-{key}.so"

    def build(self, target: Path) -> None:
        """Build fold.cpp into `target` (this thread waits for the compiler: the training thread does not). One
        process builds; others starting meanwhile (DDP ranks) wait for its library (LOCKED seconds at most)."""
        lock = target.with_suffix(".lock")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                if time.time() - lock.stat().st_mtime < LOCKED:
                    while not target.exists() and lock.exists() and time.time() - lock.stat().st_mtime < LOCKED:
                        time.sleep(0.2)
                    if target.exists():
                        self.load(target)
                        return
                lock.unlink(missing_ok=True)  # its builder died: build here
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            # Built next to the target and renamed into place: never a half-written library under its name.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                done = subprocess.run([compiler() or "c++", *FLAGS, "-o", tmp, str(SOURCE)],
                                      capture_output=True, text=True, timeout=LOCKED)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
                lock.unlink(missing_ok=True)
            self.load(target)
        except Exception as e:  # noqa: BLE001 - any failure: the eager ops count the same figures
            self.fail(e)

    def load(self, target: Path) -> None:
        try:
            lib = ctypes.CDLL(str(target))
            fn = lib.deadwatch_fold
            i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
            fn.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, f64, f64, f64,
                           ctypes.c_int]
            fn.restype = ctypes.c_int
            self.fn = fn
        except Exception as e:  # noqa: BLE001
            self.fail(e)

    def fail(self, error: Exception) -> None:
        self.failed = True
        warnings.warn(f"deadwatch: the fused statistics pass is off for this run ({type(error).__name__}: "
                      f"{str(error)[:200]}); the eager ops count the same figures, at a higher cost per call "
                      f"(fused: false skips trying)", RuntimeWarning, stacklevel=2)


KERNEL = Kernel()  # one per process: every monitor shares the build


def rounded(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype`, as the eager ops round a Python scalar they compare against."""
    if dtype == torch.float64:
        return value
    single = struct.unpack("<f", struct.pack("<f", value))[0]
    if dtype == torch.float32:
        return single
    bits = struct.unpack("<I", struct.pack("<f", single))[0]  # bfloat16: nearest, ties to even
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000) & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def fold(site: Site, out: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Fold `out` into the site's buffers with the kernel; False (nothing done) where record()'s eager ops must."""
    fn = KERNEL.fn
    if fn is None or type(out) is not torch.Tensor or out.device.type != "cpu":
        return False  # a tensor subclass (fake, distributed): its storage is not its values
    code = DTYPES.get(out.dtype)
    counters = site.counters
    if code is None or out.dtype != counters.dtype or site.axis == 0 or out.numel() == 0:
        return False
    if out.numel() > PARALLEL_FROM and torch.get_num_threads() > 1:
        return False
    shape, axis = out.shape, site.axis
    lead = 1
    for size in shape[:axis]:
        lead *= size
    trail = out.numel() // (lead * site.units)
    try:
        x = out.view(lead, site.units, trail)  # no copy: fails where the dims do not merge, and on sparse tensors
    except RuntimeError:
        return False
    keep = None
    if mask is not None and tuple(mask.shape) == tuple(shape[d] for d in site.dims):
        keep = mask.to(device=out.device, dtype=torch.bool).reshape(lead, trail).contiguous()
    counted = site.counted_rows(shape[0]) * (lead // shape[0])
    limits = site.limits
    if limits is None:  # once per site: its dtype is its buffers'
        bounded = site.bounds is not None
        limits = site.limits = (rounded(site.threshold, out.dtype), rounded(site.middle, out.dtype) if bounded else 0.0,
                                rounded(site.reach, out.dtype) if bounded else 0.0)
    flags = (POSITIVE if site.positive else 0) | (BOUNDED if site.bounds is not None else 0) | \
        (FIRST if site.starts_step() else 0)
    stride = x.stride()
    fn(code, x.data_ptr(), lead, site.units, trail, stride[0], stride[1], stride[2], counted,
       keep.data_ptr() if keep is not None else None, site.step_max.data_ptr(), site.step_fired.data_ptr(),
       site.step_abs.data_ptr(), site.step_near.data_ptr(), limits[0], limits[1], limits[2], flags)
    site.seen = counters.fold_count
    site.step_observations = site.step_observations + (keep[: counted].sum() if keep is not None else counted * trail)
    return True
