"""Workers for tests/test_scale.py, spawned with torch.multiprocessing (gloo, file:// store).

Not a test module: it lives in tests/ so that the spawned children can import it by name.

Each worker runs several scenarios one after another in one process group and writes one JSON
file per scenario and rank (`<scenario>.rank<r>.json`), so that a scenario that fails or hangs
late does not hide the results of the earlier ones. Every site's values are also recorded by
the models themselves ("taps", float64 copies taken in forward, independent of deadwatch), per
step; the test merges the taps of every rank into a single-process brute-force reference.

Every tap is taken so that a value fires when it is > 0: the output of a ReLU-like module, or
the pre-activation fed to an activation function.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

STEPS = 5
WINDOW = 3          # smaller than STEPS: the window is merged across ranks too
PG_TIMEOUT_S = 20   # a collective that never matches fails after this long instead of hanging


def batch_size(rank: int) -> int:
    return 3 + rank  # different per rank: observations must add up


def rank_data(rank: int, world: int, step: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * seed + 100 * rank + step)
    x = torch.randn(batch_size(rank), 3, generator=g)
    x[:, 0] = 1.0 if rank == world - 1 else 0.0   # only the last rank's data reaches planted unit 2
    return x


class Taps:
    """Per step: site name -> list of (units, values) float64 arrays."""

    def __init__(self) -> None:
        self.enabled = True
        self.steps: list[dict[str, list[np.ndarray]]] = []
        self.current: dict[str, list[np.ndarray]] = {}

    def __call__(self, name: str, t: torch.Tensor) -> None:
        if not self.enabled:
            return
        a = t.detach().to(torch.float64).cpu().numpy()
        a = np.moveaxis(a, -1, 0).reshape(a.shape[-1], -1)
        self.current.setdefault(name, []).append(a.copy())

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = {}

    def dump(self) -> list[dict[str, list[list[float]]]]:
        return [{name: np.concatenate(arrays, axis=1).tolist() for name, arrays in step.items()}
                for step in self.steps]


def _plant_fc1(fc1: nn.Linear) -> None:
    """Units: 0 always fires, 1 and 4 planted dead, 2 fires iff x[:, 0] > 0.5 (the last rank only)."""
    with torch.no_grad():
        fc1.weight[0].abs_()
        fc1.weight[2].zero_()
        fc1.weight[2, 0] = 1.0
        fc1.bias[0] = 10.0
        fc1.bias[1] = -1e4
        fc1.bias[2] = -0.5
        if fc1.out_features > 4:
            fc1.bias[4] = -1e4


class Planted(nn.Module):
    """fc1 (3->6) -> act (ReLU module) -> fc2 (6->4) -> F.relu (function site of the root) -> fc3 (4->2)."""

    def __init__(self, taps: Taps, prefix: str = ""):
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 4)
        self.fc3 = nn.Linear(4, 2)
        _plant_fc1(self.fc1)
        with torch.no_grad():
            self.fc2.bias[1] = -1e4   # relu#0 unit 1 planted dead
            self.fc2.bias[0] = 10.0
        self._taps = [taps]
        self._prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.fc1(x))
        self._taps[0](self._prefix + "act", a)
        h = self.fc2(a)
        self._taps[0](self._prefix + "relu#0", h)
        return self.fc3(F.relu(h))


class OneExtra(nn.Module):
    """act -> on rank 1 only: extra (ReLU6 module) -> fc2 -> F.relu (`relu#0`): rank 1's sites are a
    superset of every other rank's."""

    def __init__(self, rank: int, taps: Taps):
        super().__init__()
        self.rank = rank
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.extra = nn.ReLU6()
        self.fc2 = nn.Linear(4, 3)
        _plant_fc1(self.fc1)
        self._taps = [taps]

    def _act_extra(self, x: torch.Tensor) -> torch.Tensor:
        """act (all ranks) -> on rank 1 only: extra, added to act's output."""
        tap = self._taps[0]
        a = self.act(self.fc1(x))
        tap("act", a)
        if self.rank == 1:
            e = self.extra(a - 0.5)
            tap("extra", e)
            a = a + e
        return a

    def _head(self, a: torch.Tensor) -> torch.Tensor:
        h = self.fc2(a)
        self._taps[0]("relu#0", h)
        return F.relu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self._act_extra(x))


class Branchy(OneExtra):
    """Different site sets per rank.

    act (all ranks) -> on rank 1 only: extra (ReLU6 module, called on rank 1 only) ->
    on rank 0 only, from step 1 on: F.silu (site `silu#0`, discovered on rank 0 at step 1) ->
    fc2 -> F.relu (site `relu#0`, all ranks).
    """

    def __init__(self, rank: int, taps: Taps):
        super().__init__(rank, taps)
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._act_extra(x)
        if self.rank == 0 and self.step >= 1:
            pre = a[:, :2] - 0.5
            self._taps[0]("silu#0", pre)
            a = torch.cat([a[:, :2] + F.silu(pre), a[:, 2:]], dim=1)
        return self._head(a)


class Reused(nn.Module):
    """The same activation module called once per forward on rank 0 and twice on rank 1."""

    def __init__(self, rank: int, taps: Taps):
        super().__init__()
        self.rank = rank
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()
        _plant_fc1(self.fc1)
        self._taps = [taps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.fc1(x))
        self._taps[0]("call0", a)
        if self.rank == 1:
            b = self.act(a - 0.5)
            self._taps[0]("call1", b)
            a = a + b
        return a


class Conflict(nn.Module):
    """Site `act` has 4 + rank units: the ranks do not run the same model."""

    def __init__(self, rank: int):
        super().__init__()
        self.fc1 = nn.Linear(3, 4 + rank)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(x))


# ---- collective counting ---------------------------------------------------------------------

_COUNTED = ("all_reduce", "all_gather_object", "all_gather", "all_gather_into_tensor", "broadcast",
            "broadcast_object_list", "reduce", "reduce_scatter", "gather", "gather_object", "scatter",
            "scatter_object_list", "barrier", "all_to_all", "send", "recv")


def _op_name(op: Any) -> str:
    for name in ("SUM", "MAX", "MIN", "PRODUCT", "AVG", "BAND", "BOR", "BXOR"):
        if hasattr(dist.ReduceOp, name) and op == getattr(dist.ReduceOp, name):
            return name
    return repr(op)


@contextmanager
def counting_collectives():
    """Wrap torch.distributed's collectives (as deadwatch calls them: dist.NAME) with counters."""
    calls: list[dict[str, Any]] = []
    originals = {name: getattr(dist, name) for name in _COUNTED if hasattr(dist, name)}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            entry: dict[str, Any] = {"name": name}
            if name == "all_reduce":
                tensor = args[0] if args else kwargs["tensor"]
                op = args[1] if len(args) > 1 else kwargs.get("op", dist.ReduceOp.SUM)
                entry.update(op=_op_name(op), numel=tensor.numel(), dtype=str(tensor.dtype))
            calls.append(entry)
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# ---- scenarios ---------------------------------------------------------------------------------

def _train_planted(rank: int, world: int, outdir: str, wrapper: str) -> dict[str, Any]:
    import deadwatch

    taps = Taps()
    torch.manual_seed(0)
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        inner = Planted(taps, prefix="module.")
        model: nn.Module = DDP(inner)
        logdir = os.path.join(outdir, "logdir_ddp")
        reporters = ["console", "jsonl", "tensorboard"]
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = Planted(taps)
        fully_shard(model.fc1, mesh=mesh)
        fully_shard(model.fc2, mesh=mesh)
        fully_shard(model, mesh=mesh)
        logdir = os.path.join(outdir, "logdir_fsdp2")
        reporters = ["jsonl", "tensorboard"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with deadwatch.watch(model, logdir=logdir, reporters=reporters, report_every=1000, window=WINDOW,
                         count_subsample=1) as monitor:
        for step in range(STEPS):
            opt.zero_grad()
            model(rank_data(rank, world, step)).square().mean().backward()
            opt.step()
            monitor.step()
            taps.end_step()
        with counting_collectives() as calls:
            report = monitor.report()
    return {"report": report.to_dict(), "collectives": calls, "taps": taps.dump(),
            "fsdp_class": type(model).__name__}


def scenario_ddp(rank: int, world: int, outdir: str) -> dict[str, Any]:
    return _train_planted(rank, world, outdir, "ddp")


def scenario_fsdp2(rank: int, world: int, outdir: str) -> dict[str, Any]:
    return _train_planted(rank, world, outdir, "fsdp2")


def scenario_branch(rank: int, world: int, outdir: str) -> dict[str, Any]:
    import deadwatch

    taps = Taps()
    torch.manual_seed(0)
    model = Branchy(rank, taps)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with deadwatch.watch(model, reporters=[], report_every=1000, window=WINDOW,
                         count_subsample=1) as monitor:
        for step in range(STEPS):
            model.step = step
            opt.zero_grad()
            model(rank_data(rank, world, step, seed=1)).sum().backward()
            opt.step()
            monitor.step()
            taps.end_step()
        with counting_collectives() as calls:
            report = monitor.report()
    return {"report": report.to_dict(), "collectives": calls, "taps": taps.dump()}


def scenario_superset(rank: int, world: int, outdir: str) -> dict[str, Any]:
    import deadwatch

    taps = Taps()
    torch.manual_seed(0)
    model = OneExtra(rank, taps)
    with deadwatch.watch(model, reporters=[], report_every=1000, window=WINDOW, count_subsample=1) as monitor:
        for step in range(STEPS):
            model(rank_data(rank, world, step, seed=3)).sum().backward()
            monitor.step()
            taps.end_step()
        with counting_collectives() as calls:
            report = monitor.report()
    return {"report": report.to_dict(), "collectives": calls, "taps": taps.dump()}


def scenario_reused(rank: int, world: int, outdir: str) -> dict[str, Any]:
    import deadwatch

    taps = Taps()
    torch.manual_seed(0)
    model = Reused(rank, taps)
    with deadwatch.watch(model, reporters=[], report_every=1000, window=WINDOW,
                         count_subsample=1) as monitor:
        for step in range(STEPS):
            model(rank_data(rank, world, step, seed=2)).sum().backward()
            monitor.step()
            taps.end_step()
        report = monitor.report()
    return {"report": report.to_dict(), "taps": taps.dump()}


def scenario_conflict(rank: int, world: int, outdir: str) -> dict[str, Any]:
    import deadwatch

    def caught(e: Exception) -> dict[str, Any]:
        return {"type": type(e).__name__, "is_deadwatch_error": isinstance(e, deadwatch.DeadwatchError),
                "message": str(e)}

    torch.manual_seed(0)
    model = Conflict(rank)
    error = close_error = None
    monitor = deadwatch.watch(model, reporters=[], report_every=1000, window=WINDOW, count_subsample=1)
    try:
        for step in range(2):
            model(rank_data(rank, world, step)).sum().backward()
            monitor.step()
        monitor.report()
    except Exception as e:  # what is raised, and on which ranks, is what the test checks
        error = caught(e)
    finally:
        try:
            monitor.close()  # reports the unreported steps: collective, so the same error is expected
        except Exception as e:
            close_error = caught(e)
    return {"error": error, "close_error": close_error, "hooks_left": _hooks_left(model)}


def scenario_resume(rank: int, world: int, outdir: str) -> dict[str, Any]:
    """A run stopped after RESTART steps and resumed from rank 0's copy of the monitor's state (what
    Lightning saves), against the same run unbroken. Unit 2 of `act` fires on the last rank's data,
    before the restart only: it must stay alive across the restart (the window spans it)."""
    import deadwatch

    restart, window = 2, 10

    def data(step: int) -> torch.Tensor:
        x = rank_data(rank, world, step, seed=4)
        if step >= restart:
            x[:, 0] = 0.0
        return x

    def run(steps: range, state: dict | None = None) -> tuple[Any, dict]:
        torch.manual_seed(0)
        model = Planted(Taps())
        with deadwatch.watch(model, reporters=[], report_every=1000, window=window, count_subsample=1) as monitor:
            if state is not None:
                monitor.load_state_dict(state)
            for step in steps:
                model(data(step))
                monitor.step()
            saved = monitor.state_dict()          # collective: every rank's counters, merged
            report = monitor.report()
        return report, saved

    straight, _ = run(range(STEPS))
    _, saved = run(range(restart))
    box = [saved if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)        # every rank resumes from rank 0's copy
    resumed, _ = run(range(restart, STEPS), box[0])
    return {"straight": straight.to_dict(), "resumed": resumed.to_dict()}


def scenario_recycle(rank: int, world: int, outdir: str) -> dict[str, Any]:
    """Monitor.recycle() on every rank of a DDP job with Adam: units 1 and 5 of the first ReLU are dead
    (planted), unit 6 fires on the last rank's data only (alive in the merged report). Every rank must
    recycle the same units, draw the same rows, and stay a replica of the others through the next steps.
    Then the same call under FSDP2, whose sharded rows cannot be reset: skipped on every rank alike."""
    import warnings

    import deadwatch
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make() -> nn.Sequential:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        with torch.no_grad():
            net[0].weight[6].zero_()
            net[0].weight[6, 0] = 1.0
            net[0].bias[6] = -0.5   # fires only where x[:, 0] = 1: the last rank's data
            net[0].bias[[1, 5]] = -1e4
        return net

    def data(step: int) -> torch.Tensor:
        return rank_data(rank, world, step, seed=5)

    net = make()
    model = DDP(net)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with deadwatch.watch(model, reporters=[], report_every=1000, window=WINDOW, optimizer=opt) as monitor:
        for step in range(STEPS):
            opt.zero_grad()
            model(data(step)).square().mean().backward()
            opt.step()
            monitor.step()
        before = {name: p.detach().flatten().tolist() for name, p in net.named_parameters()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recycled = monitor.recycle()
        after = {name: p.detach().flatten().tolist() for name, p in net.named_parameters()}
        moments = {name: opt.state[p]["exp_avg"].flatten().tolist() for name, p in net.named_parameters()}
        for step in range(STEPS, STEPS + 2):  # DDP goes on: the replicas must stay equal
            opt.zero_grad()
            model(data(step)).square().mean().backward()
            opt.step()
            monitor.step()
        later = {name: p.detach().flatten().tolist() for name, p in net.named_parameters()}

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = make()
    fully_shard(sharded[0], mesh=init_device_mesh("cpu", (world,)))
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    opt2 = torch.optim.SGD(sharded.parameters(), lr=1e-3)
    with deadwatch.watch(sharded, reporters=[], report_every=1000, window=WINDOW, optimizer=opt2) as monitor:
        for step in range(STEPS):
            sharded(data(step)).sum().backward()
            monitor.step()
        with warnings.catch_warnings(record=True) as fsdp_caught:
            warnings.simplefilter("always")
            fsdp_recycled = monitor.recycle()
    return {"recycled": recycled, "warnings": [str(w.message) for w in caught], "before": before, "after": after,
            "moments": moments, "later": later, "fsdp_recycled": fsdp_recycled,
            "fsdp_warnings": [str(w.message) for w in fsdp_caught]}


class StrictResume(nn.Module):
    """fc1 -> ReLU `act`, then F.gelu (site gelu#0) on the ranks in `extra` only."""

    def __init__(self, extra: bool):
        super().__init__()
        self.extra = extra
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.fc1(x))
        return a + F.gelu(a) if self.extra else a


def scenario_strict(rank: int, world: int, outdir: str) -> dict[str, Any]:
    """load_state_dict(strict=True) of a run in which every rank ran gelu#0, into one where only the last
    rank runs it: the ranks must decide alike (all raise), not one raise while the others go on into the
    next collective. A barrier afterwards shows they are still in step."""
    import deadwatch

    def run(extra: bool, state: dict | None) -> tuple[dict, str | None]:
        torch.manual_seed(0)
        model = StrictResume(extra)
        error = None
        with deadwatch.watch(model, reporters=[], report_every=1000, window=WINDOW) as monitor:
            if state is not None:
                monitor.load_state_dict(state, strict=True)
            for step in range(2):
                model(rank_data(rank, world, step, seed=6)).sum().backward()
                monitor.step()
            try:
                monitor.report()
            except deadwatch.DeadwatchError as e:
                error = str(e)
            saved = monitor.state_dict()
        return saved, error

    saved, first = run(True, None)
    _, error = run(rank == world - 1, saved)
    dist.barrier()
    return {"first_error": first, "error": error}


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


SCENARIOS = {"ddp": scenario_ddp, "fsdp2": scenario_fsdp2, "branch": scenario_branch,
             "reused": scenario_reused, "conflict": scenario_conflict, "superset": scenario_superset,
             "resume": scenario_resume, "recycle": scenario_recycle, "strict": scenario_strict}


def worker(rank: int, world: int, store: str, outdir: str, scenarios: list[str]) -> None:
    out = open(os.path.join(outdir, f"stdout{rank}.txt"), "w", buffering=1)
    os.dup2(out.fileno(), 1)
    sys.stdout = out
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        for name in scenarios:
            try:
                result = SCENARIOS[name](rank, world, outdir)
                result["exception"] = None
            except Exception as e:
                result = {"exception": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
            with open(os.path.join(outdir, f"{name}.rank{rank}.json"), "w") as f:
                json.dump(result, f)
            sys.stdout.flush()
            if result["exception"] is not None:
                break  # the ranks may be out of step now: stop here rather than hang in the next scenario
    finally:
        try:
            dist.destroy_process_group()
        finally:
            sys.stdout.flush()
            out.close()
