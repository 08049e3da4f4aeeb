"""Resilience: failing reporters, exceptions in the training loop, memory, several monitors.

* A reporter that fails warns once (RuntimeWarning), turns itself off, and training goes on; the
  other reporters keep working: a logdir made read-only mid-run (as an unprivileged user: we run
  as root), a full disk (the run log swapped for a symlink to /dev/full), a vanished logdir, a
  TensorBoard writer that raises.
* An exception in the user's loop: hooks removed and logs flushed before it propagates.
* Memory: the monitor's state is O(units): RSS and the number of live tensors stay flat over
  2,000 steps with large activations.
* One monitor per model: a second watch() of the same model (or of a part of it) is refused
  until the first closes; two models, one monitor each, work independently.
"""

from __future__ import annotations

import copy
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn

import deadwatch
import deadwatch.monitor  # noqa: F401  (lazy in deadwatch/__init__: import it before a fork)
import deadwatch.reporters.runlog  # noqa: F401  (imported before a forked child drops privileges)
import deadwatch.reporters.tensorboard  # noqa: F401
from deadwatch.reporters import runlog
from torch.utils.tensorboard import SummaryWriter

deadwatch.config.default_mapping()  # imports what reading the packaged defaults needs, before any fork

pytest.register_assert_rewrite("reference")
from reference import Probe, check_report, reference  # noqa: E402

REPORT_EVERY = 5
BREAK_AT = 10      # the reporters are broken after this many steps (reports at 5 and 10 are written)
TOTAL = 25         # reports at 5, 10, 15, 20, 25


class Net(nn.Module):
    """fc1 -> ReLU module `act` -> fc2 -> F.relu (`relu#0`); units 0, 1 of act and 2 of relu#0 planted dead."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 4)
        with torch.no_grad():
            self.fc1.bias[[0, 1]] = -1e4
            self.fc2.bias[2] = -1e4

    def forward(self, x):
        return F.relu(self.fc2(self.act(self.fc1(x))))


def batch(step: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(step))


def train(model, monitor, steps, opt=None) -> int:
    done = 0
    for step in steps:
        if opt is not None:
            opt.zero_grad()
        model(batch(step)).sum().backward()
        if opt is not None:
            opt.step()
        monitor.step()
        done += 1
    return done


def ours(caught) -> list[warnings.WarningMessage]:
    return [w for w in caught if "deadwatch" in str(w.message)]


def tb_steps(logdir, tag="deadwatch/dead_fraction/all") -> list[int]:
    acc = ea.EventAccumulator(str(logdir), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [e.step for e in acc.Scalars(tag)]


def jsonl_steps(path) -> list[int]:
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f) if r["type"] == "report"]


def run_with_breakage(logdir: Path, reporters: list[str], breakage, capture=None):
    """Train TOTAL steps with a report every REPORT_EVERY; call breakage() after BREAK_AT steps."""
    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with deadwatch.watch(model, logdir=logdir, reporters=reporters, report_every=REPORT_EVERY,
                             window=50) as monitor:
            done = train(model, monitor, range(BREAK_AT))
            breakage()
            done += train(model, monitor, range(BREAK_AT, TOTAL))
        report = monitor.report()
    return done, report, ours(caught)


def assert_one_warning_for(warned, reporter: str) -> None:
    assert len(warned) == 1, "\n".join(str(w.message) for w in warned)
    assert issubclass(warned[0].category, RuntimeWarning)
    assert reporter in str(warned[0].message), str(warned[0].message)


# ---- (a) the logdir made read-only mid-run, as an unprivileged user ---------------------------------

NOBODY = 65534


def _in_child_as_nobody(fn, timeout: float = 60.0) -> dict:
    """Fork; in the child drop to uid/gid 65534 and run fn() (modules already imported, no exec);
    return what it returned (JSON over a pipe). {'skip': reason} when privileges cannot be dropped."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as e:
                payload = {"skip": f"cannot drop privileges to uid {NOBODY}: {e}"}
            else:
                torch.set_num_threads(1)
                payload = fn()
        except BaseException:
            payload = {"error": traceback.format_exc()}
            code = 1
        try:
            os.write(w, json.dumps(payload).encode())
            os.close(w)
        finally:
            os._exit(code)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the unprivileged child did not finish within {timeout}s")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'{"error": "the child wrote nothing"}')


@pytest.fixture
def shared_tmp():
    """A temporary directory that uid 65534 can reach and write (pytest's tmp_path is root-only)."""
    path = tempfile.mkdtemp(prefix="deadwatch-ro-", dir="/tmp")
    os.chmod(path, 0o777)
    yield Path(path)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    shutil.rmtree(path, ignore_errors=True)


def _make_read_only(logdir: str) -> None:
    for root, dirs, files in os.walk(logdir):
        for f in files:
            os.chmod(os.path.join(root, f), 0o444)
    for root, dirs, files in os.walk(logdir, topdown=False):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o555)
    os.chmod(logdir, 0o555)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_read_only_logdir_turns_off_the_file_reporters_once_each(shared_tmp):
    """The logdir and its files made read-only mid-run (uid 65534, so that permissions apply).

    The run log cannot be appended to any more: one RuntimeWarning, turned off. TensorBoard's writer
    (tensorboard's own file layer, without TensorFlow) re-opens its event file for every append, so
    it may fail too: then once, with its earlier events intact; if it keeps its file open, it keeps
    writing. The console keeps printing every report, and training goes on.
    """
    logdir = str(shared_tmp / "run")
    probe_dir = shared_tmp / "root-only"
    probe_dir.mkdir()
    os.chmod(probe_dir, 0o755)   # owned by root: uid 65534 must not be able to write here

    def child() -> dict:
        try:
            open(probe_dir / "x", "w").close()
            return {"skip": "file permissions are not enforced for uid 65534 here"}
        except PermissionError:
            pass
        enforced = {}

        def breakage():
            _make_read_only(logdir)
            try:
                open(os.path.join(logdir, "deadwatch.jsonl"), "a").close()
                enforced["ok"] = False
            except PermissionError:
                enforced["ok"] = True

        console = io.StringIO()
        saved, sys.stdout = sys.stdout, console
        try:
            done, report, warned = run_with_breakage(Path(logdir), ["console", "jsonl", "tensorboard"], breakage)
        finally:
            sys.stdout = saved
        return {"uid": os.getuid(), "done": done, "step": report.step, "enforced": enforced.get("ok"),
                "console": console.getvalue(),
                "warnings": [{"category": w.category.__name__, "message": str(w.message)} for w in warned]}

    result = _in_child_as_nobody(child)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, result["error"]
    assert result["uid"] == NOBODY and result["enforced"], result
    assert result["done"] == TOTAL and result["step"] == TOTAL
    warned = result["warnings"]
    listing = "\n".join(f"{w['category']}: {w['message']}" for w in warned)
    assert all(w["category"] == "RuntimeWarning" for w in warned), listing
    assert sum("RunLogReporter" in w["message"] for w in warned) == 1, listing
    tb_warnings = sum("TensorBoardReporter" in w["message"] for w in warned)
    assert tb_warnings <= 1, listing
    assert len(warned) == 1 + tb_warnings, listing
    assert jsonl_steps(os.path.join(logdir, "deadwatch.jsonl")) == [5, 10]
    assert tb_steps(logdir) == ([5, 10] if tb_warnings else [5, 10, 15, 20, 25])
    for step in (5, 10, 15, 20, 25):
        assert f"deadwatch: step {step}," in result["console"], f"the console stopped before step {step}"


# ---- (b) full disk --------------------------------------------------------------------------------

def test_full_disk_turns_off_the_run_log_and_tensorboard_goes_on(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    logdir = tmp_path / "run"
    path = logdir / "deadwatch.jsonl"

    def breakage():
        os.rename(path, logdir / "before.jsonl")
        os.symlink("/dev/full", path)

    done, report, warned = run_with_breakage(logdir, ["jsonl", "tensorboard"], breakage)
    assert done == TOTAL and report.step == TOTAL
    assert_one_warning_for(warned, "RunLogReporter")
    assert jsonl_steps(logdir / "before.jsonl") == [5, 10]
    assert tb_steps(logdir) == [5, 10, 15, 20, 25]


# ---- (c) the logdir vanishes --------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # tensorboard's writer thread
def test_vanished_logdir_warns_and_training_goes_on(tmp_path):
    logdir = tmp_path / "run"
    done, report, warned = run_with_breakage(logdir, ["jsonl", "tensorboard"], lambda: shutil.rmtree(logdir))
    assert done == TOTAL and report.step == TOTAL
    messages = [str(w.message) for w in warned]
    assert any("RunLogReporter" in m for m in messages), messages
    for name in ("RunLogReporter", "TensorBoardReporter"):
        assert sum(name in m for m in messages) <= 1, f"{name} warned more than once: {messages}"
    assert all(issubclass(w.category, RuntimeWarning) for w in warned)
    assert report.layer("act").dead_units == [0, 1]


# ---- (d) TensorBoard fails -------------------------------------------------------------------------------

def test_tensorboard_error_turns_off_tensorboard_only(tmp_path, monkeypatch, capsys):
    logdir = tmp_path / "run"

    def broken(*args, **kwargs):
        raise OSError("simulated TensorBoard failure")

    done, report, warned = run_with_breakage(
        logdir, ["console", "jsonl", "tensorboard"], lambda: monkeypatch.setattr(SummaryWriter, "add_scalar", broken))
    assert done == TOTAL and report.step == TOTAL
    assert_one_warning_for(warned, "TensorBoardReporter")
    assert "simulated TensorBoard failure" in str(warned[0].message)
    assert jsonl_steps(logdir / "deadwatch.jsonl") == [5, 10, 15, 20, 25]
    out = capsys.readouterr().out
    for step in (5, 10, 15, 20, 25):
        assert f"deadwatch: step {step}," in out, f"the console stopped at step {step}"
    monkeypatch.undo()
    assert tb_steps(logdir) == [5, 10]


# ---- an exception in the user's loop ------------------------------------------------------------------

def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["between_steps", "inside_forward"])
def test_exception_in_loop_removes_hooks_and_flushes_logs(tmp_path, where):
    logdir = tmp_path / "run"
    torch.manual_seed(0)
    model = Net()
    functions = (F.relu, torch.relu, F.gelu)
    original_forward = Net.forward
    with pytest.raises(Boom):
        with deadwatch.watch(model, logdir=logdir, reporters=["jsonl", "tensorboard"], report_every=REPORT_EVERY,
                             window=50) as monitor:
            for step in range(8):
                if step == 7 and where == "inside_forward":
                    def exploding(self, x):
                        self.act(self.fc1(x))
                        raise Boom("inside forward")
                    Net.forward = exploding
                try:
                    model(batch(step)).sum().backward()
                finally:
                    Net.forward = original_forward
                monitor.step()
                if step == 6 and where == "between_steps":
                    raise Boom("between steps")
    assert _hooks(model) == 0, "hooks left on the model"
    assert (F.relu, torch.relu, F.gelu) == functions, "activation functions still wrapped"
    log = runlog.read(str(logdir))
    # a single process still leaves its verdict: the final report, marked with the loop's error
    assert [r.step for r in log.reports] == [5, 7]
    assert [r.error for r in log.reports] == [None, f"Boom: {where.replace('_', ' ')}"]
    assert tb_steps(logdir) == [5, 7]
    # the monitor let go of the model: watching it again works, and counts from scratch
    with deadwatch.watch(model, reporters=[], window=50, count_subsample=1) as again:
        train(model, again, range(3))
    assert again.report().layer("act").observations == 3 * 16
    assert again.report().layer("act").dead_units == [0, 1]


# ---- memory --------------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, os, sys, time
    libc = ctypes.CDLL("libc.so.6")
    # no mmap for big blocks (M_MMAP_THRESHOLD) and one arena (M_ARENA_MAX), so that every tensor lives in
    # the heap that mallinfo2 counts; no trimming (M_TRIM_THRESHOLD), so that RSS moves less
    libc.mallopt(-3, 32 << 20); libc.mallopt(-1, 1 << 30); libc.mallopt(-8, 1)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = MallInfo2

    import torch, torch.nn.functional as F
    from torch import nn
    import deadwatch

    STEPS, WARMUP, BATCH, UNITS = (int(v) for v in sys.argv[1:5])
    LEAK_BYTES = int(sys.argv[5])          # > 0 plants a leak of that many bytes per step, outside Python objects

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(UNITS))
            self.b = nn.Parameter(torch.zeros(UNITS))
            self.act = nn.ReLU()
        def forward(self, x):
            return F.relu(self.act(x * self.w + self.b) - 0.1)   # sites act and relu#0, UNITS units each

    def in_use():
        # bytes malloc has handed out and not had back: what is kept, whatever the allocator does with pages
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def tensors():
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    torch.manual_seed(0)
    model = Wide()
    kept = []
    if LEAK_BYTES:
        model.act.register_forward_hook(
            lambda m, i, o: kept.append(torch.empty(LEAK_BYTES, dtype=torch.uint8).untyped_storage()) and None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, UNITS)
    samples = []
    start = time.monotonic()
    with deadwatch.watch(model, reporters=[], window=50, report_every=100) as monitor:
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            model(x).mean().backward()
            opt.step()
            monitor.step()
            if (step + 1) >= WARMUP and (step + 1) % 100 == 0:
                gc.collect()
                samples.append({"step": step + 1, "in_use": in_use(), "rss": rss(), "tensors": tensors(),
                                "blocks": sys.getallocatedblocks()})
        report = monitor.report()
    print(json.dumps({"samples": samples, "seconds": time.monotonic() - start,
                      "sites": [(l.name, l.units) for l in report.layers], "step": report.step}))
""")


def run_memory_script(steps, warmup, batch, units, leak_bytes=0):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    argv = [str(v) for v in (steps, warmup, batch, units, leak_bytes)]
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *argv], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# what a run may keep after warm-up, for the 1000 steps it is measured over: the unwatched loop keeps ~8 KB
# (Python's caches); one 4096-unit float vector a step is 16 MB, one copy of the state a report is 2.5 MB
LATE_IN_USE_LIMIT = 256 * 1024
LATE_BLOCKS_LIMIT = 2000           # Python objects; one leaked small object a step is 1000
# pages, for memory outside malloc; fragmentation alone has moved RSS by 16 MB here (4 MB, one activation, at a
# time) with bytes in use flat, and a leaked activation a step would pass this in 32 steps
RSS_LIMIT = 128 * 2**20


def memory_growth(samples):
    """What grew over the last 1000 sampled steps, as messages; none means flat."""
    late = [s for s in samples if s["step"] >= samples[-1]["step"] - 1000]
    base = late[0]
    trace = lambda key, scale: [(s["step"], round(s[key] / scale, 3)) for s in samples]
    problems = []
    grown = max(s["in_use"] for s in late) - base["in_use"]
    if grown >= LATE_IN_USE_LIMIT:
        problems.append(f"bytes in use grew {grown / 1024:.0f} KB over the last 1000 steps "
                        f"(step, MB): {trace('in_use', 2**20)}")
    grown = max(s["blocks"] for s in late) - base["blocks"]
    if grown >= LATE_BLOCKS_LIMIT:
        problems.append(f"Python allocated {grown} more blocks over the last 1000 steps: {trace('blocks', 1)}")
    grown = max(s["rss"] for s in samples) - samples[0]["rss"]
    if grown >= RSS_LIMIT:
        problems.append(f"RSS grew {grown / 2**20:.0f} MB after warm-up (step, MB): {trace('rss', 2**20)}")
    if len({s["tensors"] for s in samples}) != 1:
        problems.append(f"live tensors changed: {trace('tensors', 1)}")
    return problems


@pytest.mark.slow
def test_monitor_memory_stays_flat_over_2000_large_steps():
    result = run_memory_script(steps=2000, warmup=500, batch=256, units=4096)
    assert result["step"] == 2000
    assert result["sites"] == [["act", 4096], ["relu#0", 4096]]
    samples = result["samples"]
    assert samples[0]["step"] == 500 and samples[-1]["step"] == 2000
    assert memory_growth(samples) == []


@pytest.mark.slow
def test_memory_check_catches_a_leak_of_1_kb_a_step():
    # a storage kept per step is no Python tensor and no Python block: only the bytes in use can show it
    result = run_memory_script(steps=1300, warmup=300, batch=64, units=1024, leak_bytes=1024)
    problems = memory_growth(result["samples"])
    assert any(p.startswith("bytes in use grew") for p in problems), problems


# ---- several monitors -------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """A submodule whose activation is a function call: no activation module in it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return F.relu(self.fc(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = Encoder()
        self.block = nn.Sequential(nn.Linear(6, 5), nn.ReLU())

    def forward(self, x):
        return self.block(self.enc(x))


def test_second_monitor_on_the_same_model_is_refused():
    model = Net()
    first = deadwatch.watch(model, reporters=[], count_subsample=1)
    try:
        with pytest.raises(deadwatch.DeadwatchError, match="already watched"):
            deadwatch.watch(model, reporters=[])
        train(model, first, range(2))
        assert first.report().layer("act").observations == 2 * 16, "the refused monitor disturbed the first"
    finally:
        first.close()
    with deadwatch.watch(model, reporters=[], count_subsample=1) as again:   # after close: allowed
        train(model, again, range(3))
    assert again.report().layer("act").observations == 3 * 16
    assert again.report().layer("relu#0").observations == 3 * 16


@pytest.mark.parametrize("part", ["block", "enc"])
def test_watching_a_submodule_of_a_watched_model_is_refused(part):
    """`block` holds an activation module; `enc` only calls F.relu in its forward: both are parts of the
    watched model, and a second monitor on them would count their activations a second time."""
    torch.manual_seed(0)
    model = Outer()
    with deadwatch.watch(model, reporters=[], count_subsample=1) as first:
        with pytest.raises(deadwatch.DeadwatchError, match="already watched"):
            second = deadwatch.watch(getattr(model, part), reporters=[])
            second.close()
        train(model, first, range(2))
    names = [layer.name for layer in first.report().layers]
    assert names == ["enc.relu#0", "block.1"]
    for layer in first.report().layers:
        assert layer.observations == 2 * 16, layer.name
    with deadwatch.watch(getattr(model, part), reporters=[]) as sub:   # after close: allowed
        model(batch(0)).sum().backward()
        sub.step()
    assert len(sub.report().layers) == 1


def test_watching_the_parent_of_a_watched_submodule_is_refused():
    torch.manual_seed(0)
    model = Outer()
    with deadwatch.watch(model.enc, reporters=[]):
        with pytest.raises(deadwatch.DeadwatchError, match="already watched"):
            deadwatch.watch(model, reporters=[]).close()


def _probes(model: Net) -> dict[str, Probe]:
    return {"act": Probe(model.act, axis=1), "relu#0": Probe(model.fc2, axis=1)}


def test_two_models_two_monitors_are_independent():
    torch.manual_seed(0)
    a, b = Net(), Net()
    with torch.no_grad():   # different planted units, so a mix-up shows
        b.fc1.bias.normal_()
        b.fc1.bias[[5, 6, 7]] = -1e4
        b.fc2.bias.normal_()
        b.fc2.bias[0] = -1e4
    steps_a = [batch(s) for s in range(6)]
    steps_b = [batch(100 + s) * 2 for s in range(6)]
    twin_a, twin_b = copy.deepcopy(a), copy.deepcopy(b)
    refs_a = reference(twin_a, steps_a, _probes(twin_a))
    refs_b = reference(twin_b, steps_b, _probes(twin_b))
    window = 4
    with deadwatch.watch(a, reporters=[], window=window, count_subsample=1) as ma, \
            deadwatch.watch(b, reporters=[], window=window, count_subsample=1) as mb:
        for s in range(6):
            a(steps_a[s]).sum().backward()
            b(steps_b[s]).sum().backward()
            ma.step()
            mb.step()
        report_a, report_b = ma.report(), mb.report()
        # closing one leaves the other working
        ma.close()
        b(batch(200)).sum().backward()
        mb.step()
        assert mb.report().step == 7
    check_report(report_a, refs_a, window)
    check_report(report_b, refs_b, window)
    assert report_a.layer("act").dead_units == [0, 1]
    assert report_b.layer("act").dead_units[:3] != [0, 1] and {5, 6, 7} <= set(report_b.layer("act").dead_units)
