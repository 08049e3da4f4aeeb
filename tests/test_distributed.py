"""torch.distributed: every rank gets the same, global report; only rank 0 prints.

Two gloo processes on CPU train the same model (same weights on both ranks) on
rank-dependent data. Unit 2 of `act` (and, downstream, unit 2 of the function
site `relu#0`) fires on rank 1's data only: it must be alive in the global
report, on both ranks, although rank 0 alone would call it dead.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

STEPS = 4
BATCH = {0: 3, 1: 5}   # different batch sizes per rank: observations must add up


class Planted(nn.Module):
    """fc1 -> ReLU module `act` -> fc2 -> F.relu (site `relu#0`), with planted dead units.

    act:    unit 0 always fires, units 1 and 3 never, unit 2 iff x[:, 0] > 0.5 (rank 1's data)
    relu#0: unit 0 always fires, unit 1 never, unit 2 iff act unit 2 fired
    """

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.weight[2, 0] = 1.0
            self.fc1.bias.copy_(torch.tensor([1.0, -1.0, -0.5, -1.0]))
            self.fc2.weight.zero_()
            self.fc2.weight[2, 2] = 1.0
            self.fc2.bias.copy_(torch.tensor([1.0, -1.0, -0.1]))

    def forward(self, x):
        return F.relu(self.fc2(self.act(self.fc1(x))))


def rank_data(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(BATCH[rank], 3, generator=g)
    x[:, 0] = float(rank)   # the only input that reaches a planted unit
    return x


def _worker(rank: int, world_size: int, store: str, outdir: str) -> None:
    # each rank's stdout (Python and fd 1) goes to its own file
    out = open(os.path.join(outdir, f"stdout{rank}.txt"), "w", buffering=1)
    os.dup2(out.fileno(), 1)
    sys.stdout = out
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        import deadwatch

        torch.manual_seed(0)
        model = Planted()
        # a bad configuration must fail on every rank, not on rank 0 only (the others would
        # go on training and hang in the first collective); no collective is reached here
        try:
            deadwatch.watch(model, reporters=["jsonl"]).close()
            config_error = None
        except deadwatch.ConfigError as e:
            config_error = str(e)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay as planted, on both ranks

        def train(**overrides):
            local_fired_unit2 = False
            with deadwatch.watch(model, report_every=1000, window=1000, **overrides) as monitor:
                for step in range(STEPS):
                    x = rank_data(rank, step)
                    opt.zero_grad()
                    model(x).sum().backward()
                    opt.step()
                    monitor.step()
                    with torch.no_grad():
                        local_fired_unit2 |= bool((model.fc1(x)[:, 2] > 0).any())
                report = monitor.report()
            return report, local_fired_unit2

        # the verdict at the default configuration (the run that prints); then the same steps again
        # counting every value (count_subsample=1), for the exact observations and zero fractions
        report, local_fired_unit2 = train(reporters=["console"])
        exact, _ = train(reporters=[], count_subsample=1)
        result = {"report": report.to_dict(), "exact_report": exact.to_dict(),
                  "local_fired_unit2": local_fired_unit2, "config_error": config_error,
                  "weights": [p.detach().flatten().tolist() for p in model.parameters()]}
        with open(os.path.join(outdir, f"report{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        sys.stdout.flush()
        out.close()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, str(tmp / "store"), str(tmp)), nprocs=2, join=True)
    results = []
    for rank in range(2):
        with open(tmp / f"report{rank}.json") as f:
            result = json.load(f)
        result["stdout"] = (tmp / f"stdout{rank}.txt").read_text()
        results.append(result)
    return results


def test_setup_plants_a_unit_alive_on_rank_1_only(ranks):
    """Sanity of the setup: without merging, rank 0 alone would call unit 2 dead."""
    assert ranks[0]["local_fired_unit2"] is False
    assert ranks[1]["local_fired_unit2"] is True
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_all_ranks_get_the_same_report(ranks):
    assert ranks[0]["report"] == ranks[1]["report"]
    assert ranks[0]["exact_report"] == ranks[1]["exact_report"]


def test_unit_alive_on_one_rank_is_alive(ranks):
    for result in ranks:
        layers = {layer["name"]: layer for layer in result["report"]["layers"]}
        assert set(layers) == {"act", "relu#0"}
        assert layers["act"]["dead_units"] == [1, 3]
        assert layers["act"]["units"] == 4
        assert layers["relu#0"]["dead_units"] == [1]
        assert layers["relu#0"]["units"] == 3
        assert result["report"]["step"] == STEPS
        assert result["report"]["units"] == 7
        assert result["report"]["dead_fraction"] == pytest.approx(3 / 7)


def test_observations_and_firing_are_summed_over_ranks(ranks):
    total = STEPS * (BATCH[0] + BATCH[1])
    for result in ranks:
        layers = {layer["name"]: layer for layer in result["exact_report"]["layers"]}
        for name in ("act", "relu#0"):
            assert layers[name]["observations"] == total, name
        # act: unit 0 fires on every value, unit 2 on rank 1's values only, units 1 and 3 never
        rank1_share = BATCH[1] / (BATCH[0] + BATCH[1])
        assert layers["act"]["zero_fraction"] == pytest.approx(1 - (1 + rank1_share) / 4)
        assert layers["relu#0"]["zero_fraction"] == pytest.approx(1 - (1 + rank1_share) / 3)


def test_only_rank_0_prints(ranks):
    out0, out1 = ranks[0]["stdout"], ranks[1]["stdout"]
    assert f"deadwatch: step {STEPS}" in out0
    assert "act" in out0 and "relu#0" in out0 and "critical" in out0
    assert out1 == ""


def test_file_reporter_without_logdir_fails_on_every_rank(ranks):
    assert ranks[0]["config_error"] and "logdir" in ranks[0]["config_error"]
    assert ranks[1]["config_error"] is not None, "rank 1 accepted a configuration that rank 0 rejected"
