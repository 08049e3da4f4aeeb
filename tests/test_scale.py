"""Scale: DistributedDataParallel and FSDP2 with 2 and 3 gloo processes.

One spawn per world size runs every scenario of tests/dist_workers.py in one process group,
one after another (DDP, FSDP2, ranks with different site sets, one module called a different
number of times per rank, a conflicting site, one rank with a site more than the others). Each rank writes one JSON file per scenario with
its Report.to_dict(), the collectives report() made, and the values of every site recorded by
the model itself (independent of deadwatch). The expected verdict is a brute-force count over
the values of all ranks together, as a single process would see them.
"""

from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import pytest
import torch.multiprocessing as mp

pytest.register_assert_rewrite("reference")
import dist_workers  # noqa: E402
from dist_workers import STEPS, WINDOW, batch_size  # noqa: E402
from reference import RefSite  # noqa: E402

SCENARIOS = ["ddp", "fsdp2", "branch", "reused", "conflict", "resume", "recycle", "strict", "superset"]  # superset last: it may wedge
JOIN_DEADLINE_S = 90  # a hung collective fails after dist_workers.PG_TIMEOUT_S; this is the backstop


def _fsdp2_available() -> str | None:
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch.distributed.fsdp.fully_shard not importable: {e}"
    return None


def spawn(world: int, tmp: str, scenarios: list[str]) -> dict:
    """Run the scenarios on `world` gloo processes; never wait longer than JOIN_DEADLINE_S."""
    start = time.monotonic()
    ctx = mp.start_processes(dist_workers.worker, args=(world, os.path.join(tmp, "store"), tmp, scenarios),
                             nprocs=world, join=False, start_method="spawn")
    hung, crashed = False, None
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() - start > JOIN_DEADLINE_S:
                hung = True
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(5)
                break
    except Exception as e:  # a worker died outside the per-scenario error handling
        crashed = f"{type(e).__name__}: {e}"
    results = {}
    for name in scenarios:
        per_rank = []
        for rank in range(world):
            path = os.path.join(tmp, f"{name}.rank{rank}.json")
            if os.path.exists(path):
                with open(path) as f:
                    per_rank.append(json.load(f))
            else:
                per_rank.append(None)
        results[name] = per_rank
    stdout = []
    for rank in range(world):
        path = os.path.join(tmp, f"stdout{rank}.txt")
        stdout.append(open(path).read() if os.path.exists(path) else None)
    return {"world": world, "tmp": tmp, "hung": hung, "crashed": crashed, "results": results,
            "stdout": stdout, "seconds": time.monotonic() - start}


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def run(request, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp(f"scale{request.param}"))
    return spawn(request.param, tmp, SCENARIOS)


def results_of(run: dict, scenario: str) -> list[dict]:
    """Every rank's result of one scenario; fails with the reason when a rank has none or raised."""
    per_rank = run["results"][scenario]
    problems = []
    for rank, result in enumerate(per_rank):
        if result is None:
            problems.append(f"rank {rank}: no result (hung: {run['hung']}, crashed: {run['crashed']})")
        elif result.get("exception"):
            problems.append(f"rank {rank}: {result['exception']}")
    assert not problems, f"{scenario} on {run['world']} ranks:\n" + "\n".join(problems)
    return per_rank


# ---- the single-process reference over all ranks' values ---------------------------------------

def merged_reference(per_rank: list[dict], rename: dict[str, str] | None = None,
                     ranks: list[int] | None = None) -> dict[str, RefSite]:
    """RefSites counting the values of `ranks` (default: all) together, step by step."""
    rename = rename or {}
    ranks = list(range(len(per_rank))) if ranks is None else ranks
    values: dict[str, list[list[np.ndarray]]] = {}
    for rank in ranks:
        taps = per_rank[rank]["taps"]
        assert len(taps) == STEPS
        for s, step in enumerate(taps):
            for name, v in step.items():
                values.setdefault(rename.get(name, name), [[] for _ in range(STEPS)])[s].append(np.array(v))
    refs = {}
    for name, per_step in values.items():
        units = next(a.shape[0] for step in per_step for a in step)
        ran = np.zeros(STEPS, bool)
        fired = np.zeros((STEPS, units), bool)
        counts = np.zeros((STEPS, units), np.int64)
        obs = np.zeros(STEPS, np.int64)
        for s, arrays in enumerate(per_step):
            if not arrays:
                continue
            v = np.concatenate(arrays, axis=1)
            ran[s] = True
            obs[s] = v.shape[1]
            for u in range(units):
                counts[s, u] = int(np.sum(v[u] > 0))
                fired[s, u] = counts[s, u] > 0
        refs[name] = RefSite(name, units, ran, fired, counts, np.zeros((STEPS, units), bool), obs)
    return refs


def check_against(layer: dict, ref: RefSite) -> None:
    where = f"site {layer['name']!r}"
    assert layer["units"] == ref.units, where
    assert layer["dead_units"] == ref.dead(WINDOW), where
    assert layer["dead_fraction"] == pytest.approx(len(ref.dead(WINDOW)) / ref.units), where
    assert layer["observations"] == int(ref.obs.sum()), where
    assert layer["zero_fraction"] == pytest.approx(ref.zero_fraction(), abs=1e-12), where
    assert layer["status"] == ref.status(WINDOW), where


def check_global_report(per_rank: list[dict], refs: dict[str, RefSite]) -> None:
    reports = [r["report"] for r in per_rank]
    for rank, report in enumerate(reports[1:], 1):
        assert report == reports[0], f"rank {rank}'s report differs from rank 0's"
    report = reports[0]
    assert report["step"] == STEPS and report["window"] == WINDOW
    assert sorted(layer["name"] for layer in report["layers"]) == sorted(refs)
    for layer in report["layers"]:
        check_against(layer, refs[layer["name"]])
    assert report["units"] == sum(ref.units for ref in refs.values())
    dead = sum(len(ref.dead(WINDOW)) for ref in refs.values())
    assert report["dead_fraction"] == pytest.approx(dead / report["units"])


def check_collectives_matching_layout(calls: list[dict], units: int) -> None:
    """report() with every rank on the same sites: one small MAX (layout check), one SUM (the data)."""
    names = [c["name"] for c in calls]
    assert names == ["all_reduce", "all_reduce"], f"collectives made by report(): {calls}"
    ops = sorted(c["op"] for c in calls)
    assert ops == ["MAX", "SUM"], calls
    check = next(c for c in calls if c["op"] == "MAX")
    data = next(c for c in calls if c["op"] == "SUM")
    assert check["numel"] <= 4, f"the layout check should be a few numbers, not {check['numel']}"
    assert data["numel"] >= units, f"one buffer holds every unit's counters: {data}"


# ---- DDP and FSDP2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_global_verdict_identical_on_every_rank_and_equal_to_reference(run, wrapper):
    if wrapper == "fsdp2" and (reason := _fsdp2_available()):
        pytest.skip(reason)
    per_rank = results_of(run, wrapper)
    refs = merged_reference(per_rank)
    prefix = "module." if wrapper == "ddp" else ""
    assert set(refs) == {prefix + "act", prefix + "relu#0"}
    check_global_report(per_rank, refs)
    # the planted verdict, by hand: act units 1 and 4 dead; relu#0 unit 1 dead, unit 0 alive
    layers = {layer["name"]: layer for layer in per_rank[0]["report"]["layers"]}
    assert layers[prefix + "act"]["dead_units"] == [1, 4]
    assert 1 in layers[prefix + "relu#0"]["dead_units"] and 0 not in layers[prefix + "relu#0"]["dead_units"]
    total = STEPS * sum(batch_size(r) for r in range(run["world"]))
    assert layers[prefix + "act"]["observations"] == total


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_unit_alive_on_one_rank_only_is_alive(run, wrapper):
    if wrapper == "fsdp2" and (reason := _fsdp2_available()):
        pytest.skip(reason)
    per_rank = results_of(run, wrapper)
    world = run["world"]
    name = ("module." if wrapper == "ddp" else "") + "act"
    # setup: unit 2 fires on the last rank's data only, in the last WINDOW steps too
    for rank in range(world):
        local = merged_reference(per_rank, ranks=[rank])[name]
        assert (2 in local.dead(WINDOW)) == (rank != world - 1), f"setup: rank {rank}"
    for rank, result in enumerate(per_rank):
        layer = next(layer for layer in result["report"]["layers"] if layer["name"] == name)
        assert 2 not in layer["dead_units"], f"rank {rank} calls unit 2 dead: it fired on rank {world - 1}"


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_report_makes_one_layout_check_and_one_data_all_reduce(run, wrapper):
    if wrapper == "fsdp2" and (reason := _fsdp2_available()):
        pytest.skip(reason)
    for result in results_of(run, wrapper):
        check_collectives_matching_layout(result["collectives"], result["report"]["units"])


def test_fsdp2_really_sharded(run):
    if reason := _fsdp2_available():
        pytest.skip(reason)
    for result in results_of(run, "fsdp2"):
        assert result["fsdp_class"].startswith("FSDP"), result["fsdp_class"]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_only_rank_0_writes_files(run, wrapper):
    if wrapper == "fsdp2" and (reason := _fsdp2_available()):
        pytest.skip(reason)
    per_rank = results_of(run, wrapper)
    logdir = os.path.join(run["tmp"], f"logdir_{wrapper}")   # the same logdir was given to every rank
    with open(os.path.join(logdir, "deadwatch.jsonl")) as f:
        records = [json.loads(line) for line in f]
    headers = [r for r in records if r["type"] == "header"]
    reports = [r for r in records if r["type"] == "report"]
    assert len(headers) == 1, f"{len(headers)} ranks wrote a run log header"
    assert len(reports) == 1  # the report at close
    written = {k: v for k, v in reports[0].items() if k not in ("type", "time", "firing_rate")}
    assert written == per_rank[0]["report"]
    events = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    assert len(events) == 1, f"TensorBoard event files from several ranks: {events}"
    assert str(os.getpid()) not in os.path.basename(events[0])


def test_console_prints_on_rank_0_only(run):
    results_of(run, "ddp")
    stdout = run["stdout"]
    assert f"deadwatch: step {STEPS}" in stdout[0]
    assert "module.act" in stdout[0]
    for rank in range(1, run["world"]):
        assert stdout[rank] == "", f"rank {rank} printed:\n{stdout[rank]}"


# ---- ranks that discovered different sites --------------------------------------------------------

def test_different_site_sets_give_the_union_with_correct_values(run):
    per_rank = results_of(run, "branch")
    refs = merged_reference(per_rank)
    # setup: `extra` ran on rank 1 only, `silu#0` on rank 0 only and from step 1 on
    assert set(refs) == {"act", "extra", "silu#0", "relu#0"}
    assert all("extra" not in step for r, res in enumerate(per_rank) if r != 1 for step in res["taps"])
    assert "silu#0" not in per_rank[0]["taps"][0] and "silu#0" in per_rank[0]["taps"][1]
    check_global_report(per_rank, refs)
    layers = {layer["name"]: layer for layer in per_rank[0]["report"]["layers"]}
    assert layers["extra"]["observations"] == STEPS * batch_size(1)
    assert layers["silu#0"]["observations"] == (STEPS - 1) * batch_size(0)
    assert layers["act"]["kind"] == "ReLU" and layers["extra"]["kind"] == "ReLU6"
    assert layers["silu#0"]["kind"] == "silu" and layers["relu#0"]["kind"] == "relu"


def test_site_only_on_rank_1_gives_the_union_with_correct_values(run):
    """Rank 1 runs one site more than the others (its sites are a superset of theirs)."""
    per_rank = results_of(run, "superset")
    refs = merged_reference(per_rank)
    assert set(refs) == {"act", "extra", "relu#0"}
    check_global_report(per_rank, refs)
    layers = {layer["name"]: layer for layer in per_rank[0]["report"]["layers"]}
    assert layers["extra"]["observations"] == STEPS * batch_size(1)
    for rank, result in enumerate(per_rank):
        sums = [c for c in result["collectives"] if c["name"] == "all_reduce" and c["op"] == "SUM"]
        assert len(sums) == 1, f"rank {rank}: {result['collectives']}"


def test_different_site_sets_use_one_data_all_reduce(run):
    for rank, result in enumerate(results_of(run, "branch")):
        calls = result["collectives"]
        sums = [c for c in calls if c["name"] == "all_reduce" and c["op"] == "SUM"]
        assert len(sums) == 1, f"rank {rank}: {calls}"
        assert sums[0]["numel"] >= result["report"]["units"]
        assert len(calls) <= 3, f"rank {rank}: layout check, union, data; got {calls}"


def test_module_called_a_different_number_of_times_per_rank(run):
    """`act` runs once per forward on rank 0 and twice on rank 1: its first call is one site over every
    rank's values (not a site `act` for rank 0 and another `act#0` for rank 1), its second call another."""
    per_rank = results_of(run, "reused")
    refs = merged_reference(per_rank)
    reports = [r["report"] for r in per_rank]
    for rank, report in enumerate(reports[1:], 1):
        assert report == reports[0], f"rank {rank}'s report differs from rank 0's"
    names = [layer["name"] for layer in reports[0]["layers"]]
    assert sorted(names) in (["act", "act#1"], ["act#0", "act#1"]), \
        f"sites {names}: the first call of `act` must be one site across ranks"
    layers = {layer["name"]: layer for layer in reports[0]["layers"]}
    first = layers.get("act#0") or layers["act"]
    check_against(first, refs["call0"])
    check_against(layers["act#1"], refs["call1"])


def test_conflicting_site_raises_on_every_rank_and_never_hangs(run):
    assert not run["hung"], "the spawned ranks hung"
    per_rank = results_of(run, "conflict")
    for rank, result in enumerate(per_rank):
        error = result["error"]
        assert error is not None, f"rank {rank}: report() did not raise although `act` has 4 + rank units"
        assert error["is_deadwatch_error"], f"rank {rank}: {error}"
        assert "act" in error["message"] and "units" in error["message"], error["message"]
        close_error = result["close_error"]
        assert close_error is None or close_error["is_deadwatch_error"], f"rank {rank}: close(): {close_error}"
        assert result["hooks_left"] == 0, f"rank {rank}: hooks left after close()"


def test_strict_load_raises_on_every_rank_alike(run):
    """A saved site that runs on the last rank only after the resume: every rank raises at the first
    report (before, only the ranks without it raised and the last one went on into the next collective),
    naming the ranks where it has not run; and they are still in step afterwards (the barrier passed)."""
    world = run["world"]
    for rank, result in enumerate(results_of(run, "strict")):
        assert result["first_error"] is None
        assert result["error"] is not None, f"rank {rank}: no error, while the other ranks raised"
        for other in range(world - 1):
            assert f"['gelu#0'] on rank {other}" in result["error"], result["error"]
        assert f"on rank {world - 1}" not in result["error"]


def test_spawn_is_fast(run):
    assert not run["hung"], run   # (a crashed rank shows in the tests of its scenario)
    assert run["seconds"] < 45, f"{run['world']} ranks took {run['seconds']:.1f}s for {len(SCENARIOS)} scenarios"


def test_resume_from_rank_0s_state_equals_the_unbroken_run(run):
    """state_dict() merges every rank's counters, so the copy Lightning saves (rank 0's) resumes the
    whole job: unit 2 of `act`, which fired on the last rank before the restart only, stays alive."""
    for rank, result in enumerate(results_of(run, "resume")):
        assert result["resumed"] == result["straight"], f"rank {rank}"
        act = next(layer for layer in result["resumed"]["layers"] if layer["name"] == "act")
        assert 2 not in act["dead_units"] and {1, 4} <= set(act["dead_units"])


def test_recycle_under_ddp_is_the_same_on_every_rank(run):
    """Monitor.recycle() under DDP: the units dead on every rank are recycled (unit 6, alive on the last
    rank only, is not), every rank draws the same rows and resets the same Adam moments, and the replicas
    stay equal while training goes on. Under FSDP2 the sharded layers are skipped, on every rank alike."""
    results = results_of(run, "recycle")
    first = results[0]
    units = first["recycled"]["module.1"]
    assert {1, 5} <= set(units) and 6 not in units, first["recycled"]
    for rank, result in enumerate(results):
        assert result["recycled"] == first["recycled"], f"rank {rank}"
        assert result["after"] == first["after"], f"rank {rank}: the recycled weights differ"
        assert result["moments"] == first["moments"], f"rank {rank}: the optimizer state differs"
        assert result["later"] == first["later"], f"rank {rank}: the replicas drifted apart"
        assert result["fsdp_recycled"] == {}, f"rank {rank}"
        assert any("sharded" in w for w in result["fsdp_warnings"]), (rank, result["fsdp_warnings"])
    fc1_bias = first["after"]["0.bias"]
    assert fc1_bias[1] > -1e3 and fc1_bias[5] > -1e3, "the dead units' biases were not drawn afresh"
    assert all(first["moments"]["0.weight"][8 * 0 + 3 * u + i] == 0 for u in (1, 5) for i in range(3))
    kept = [u for u in range(8) if u not in units]
    assert [fc1_bias[u] for u in kept] == [first["before"]["0.bias"][u] for u in kept], "other rows changed"
