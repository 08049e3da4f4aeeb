"""Recycling dead and dormant units (issue 11): Monitor.recycle() and the automatic `recycle` config.

Planted models: a bias of -1e4 kills a unit exactly (its ReLU/SiLU output is 0 for every input).
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.reporters import runlog

BIN = Path(sys.executable).parent


def planted_mlp(seed=0):
    """16 -> 32 -> 32 -> 10 (other biases 0.5: no unit dies by chance); units 1, 3, 5 of the first ReLU and unit 2 of the second dead."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        net[0].bias.fill_(0.5)
        net[2].bias.fill_(0.5)
        net[0].bias[[1, 3, 5]] = -1e4
        net[2].bias[[2]] = -1e4
    return net


DEAD = {"1": [1, 3, 5], "3": [2]}


def train(net, monitor, opt, steps, x):
    for _ in range(steps):
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step()


def snapshot(net):
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def state_snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}


# which slices of which parameter a recycling of DEAD touches: (param name, dim, units)
TOUCHED = [("0.weight", 0, [1, 3, 5]), ("0.bias", 0, [1, 3, 5]), ("2.weight", 0, [2]), ("2.bias", 0, [2]),
           ("2.weight", 1, [1, 3, 5]), ("4.weight", 1, [2])]   # 2.weight: row 2 drawn afresh, then columns zeroed


def untouched_mask(shape, name):
    keep = torch.ones(shape, dtype=torch.bool)
    for pname, dim, units in TOUCHED:
        if pname == name:
            keep.index_fill_(dim, torch.tensor(units), False)
    return keep


@pytest.fixture
def x():
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=1e-3),
                                      lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True),
                                      lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)],
                         ids=["adam", "adamw-amsgrad", "sgd-momentum"])
def test_recycle_touches_exactly_the_dead_rows_and_columns(x, make_opt):
    net = planted_mlp()
    opt = make_opt(net.parameters())
    with deadwatch.watch(net, reporters=[], window=3, report_every=1000, optimizer=opt) as monitor:
        train(net, monitor, opt, 5, x)
        for state in opt.state.values():   # dead units get no gradient: give their state values to reset
            for value in state.values():
                if value.ndim:
                    value.add_(torch.rand(value.shape))
        weights, state = snapshot(net), state_snapshot(opt)
        params = dict(net.named_parameters())
        before = net(x)
        recycled = monitor.recycle()
        after = net(x)
    assert recycled == DEAD
    assert torch.equal(before, after)       # the network's function at the moment of recycling
    for name, p in net.named_parameters():
        keep = untouched_mask(p.shape, name)
        assert torch.equal(p.detach()[keep], weights[name][keep]), name      # bit for bit
        for key, value in opt.state[p].items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                assert torch.equal(value, state[id(p)][key]) if isinstance(value, torch.Tensor) else True
                continue
            assert torch.equal(value[keep], state[id(p)][key][keep]), (name, key)
            if (~keep).any():
                assert not value[~keep].any(), (name, key)            # exactly the recycled slices are 0
                assert state[id(p)][key][~keep].all(), (name, key)   # ... and were not before
    # the producer rows were drawn afresh (their bias is no longer -1e4), the consumer columns are 0
    assert (params["0.bias"][[1, 3, 5]].abs() < 1).all()
    assert not params["2.weight"][:, [1, 3, 5]].any()
    assert not params["4.weight"][:, [2]].any()


def test_recycled_units_fire_again(x):
    net = planted_mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with deadwatch.watch(net, reporters=[], window=3, report_every=1000, optimizer=opt) as monitor:
        train(net, monitor, opt, 5, x)
        assert monitor.report().layer("1").dead_units == [1, 3, 5]
        monitor.recycle()
        with torch.no_grad():
            assert (net[0](x)[:, [1, 3, 5]] > 0).any(0).all()   # each fires on some input
        train(net, monitor, opt, 5, x)
        report = monitor.report()
    assert report.layer("1").dead_units == []
    assert report.layer("3").dead_units == []
    assert all(report.layer("1").last_fired[u] == 10 for u in (1, 3, 5))


def test_new_rows_follow_reset_parameters_and_leave_the_global_rng(x):
    net = planted_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=3, report_every=1000) as monitor:
        train(net, monitor, opt, 4, x)
        state = torch.random.get_rng_state()
        monitor.recycle(opt)
        assert torch.equal(torch.random.get_rng_state(), state)
    bound = 1 / math.sqrt(16)   # nn.Linear: weight and bias uniform in +-1/sqrt(fan_in)
    rows = net[0].weight[[1, 3, 5]]
    assert rows.abs().max() <= bound and rows.std() > bound / 4
    assert (net[0].bias[[1, 3, 5]].abs() <= bound).all()


def test_counters_start_over(x):
    """A recycled unit is not dead until it has had `window` steps to fire."""
    net = planted_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=4, report_every=1000) as monitor:
        train(net, monitor, opt, 6, x)
        monitor.recycle(opt, sites=["1"])
        with torch.no_grad():
            net[0].bias[[1, 3, 5]] = -1e4   # killed again at once
        assert monitor.report().layer("1").dead_units == []
        dead = []
        for _ in range(5):
            train(net, monitor, opt, 1, x)
            dead.append(monitor.report().layer("1").dead_units)
    assert dead == [[], [], [], [1, 3, 5], [1, 3, 5]]   # dead again after window (4) steps without firing


def test_nothing_dead_returns_empty_and_touches_nothing(x):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias.fill_(10.0)
    opt = torch.optim.Adam(net.parameters())
    with deadwatch.watch(net, reporters=[], window=3, optimizer=opt) as monitor:
        train(net, monitor, opt, 3, x)
        weights = snapshot(net)
        assert monitor.recycle() == {}
        assert monitor.recycle(units="dormant") == {}
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())


def test_sites_and_units_arguments(x):
    net = planted_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=3) as monitor:
        train(net, monitor, opt, 3, x)
        with pytest.raises(KeyError, match="no site 'nope'"):
            monitor.recycle(opt, sites=["nope"])
        with pytest.raises(ValueError, match="dead, dormant"):
            monitor.recycle(opt, units="zombie")
        weights = snapshot(net)
        with pytest.raises(deadwatch.DeadwatchError, match=r"no optimizer is known: pass recycle\(optimizer=opt\)"):
            monitor.recycle()          # none given here nor to watch(): stale moments would steer the new rows
        assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())
        assert monitor.recycle(opt, sites="3") == {"3": [2]}


class GeluNet(nn.Module):
    """fc1 -> F.gelu -> fc2 -> F.gelu -> fc3: function sites; unit 4 of the first scaled to almost nothing."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 12), nn.Linear(12, 12), nn.Linear(12, 3)
        with torch.no_grad():
            self.fc1.weight[4] *= 1e-4
            self.fc1.bias[4] = 1e-4

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def test_dormant_units_at_function_sites(x):
    torch.manual_seed(0)
    net = GeluNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    with deadwatch.watch(net, reporters=[], window=3, count_subsample=1, optimizer=opt) as monitor:
        train(net, monitor, opt, 3, x)
        assert monitor.recycle() == {}                       # alive: it fires, softly
        before = net(x)
        recycled = monitor.recycle(units="dormant")
        after = net(x)
    assert recycled == {"gelu#0": [4]}
    assert not net.fc2.weight[:, 4].any() and net.fc1.weight[4].abs().max() > 1e-2
    # not dead, so not exactly 0: the output moves by the unit's former (tiny) contribution
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=1e-3)


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)), as in LLaMA (with biases here, to plant dead units)."""

    def __init__(self, functional=False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 16)
        self.act_fn = None if functional else nn.SiLU()
        with torch.no_grad():
            self.gate_proj.bias[[0, 7]] = -1e4

    def forward(self, x):
        gate = F.silu(self.gate_proj(x)) if self.act_fn is None else self.act_fn(self.gate_proj(x))
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.mlp = LlamaMLP(functional)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(x + self.mlp(x))


@pytest.mark.parametrize("functional", [False, True], ids=["SiLU module", "F.silu"])
def test_gated_mlp(x, functional):
    torch.manual_seed(0)
    net = Block(functional)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with deadwatch.watch(net, reporters=[], window=3, optimizer=opt) as monitor:
        train(net, monitor, opt, 4, x)
        for state in opt.state.values():
            for value in state.values():
                if value.ndim:
                    value.add_(torch.rand(value.shape))
        weights, state = snapshot(net), state_snapshot(opt)
        before = net(x)
        recycled = monitor.recycle()
        after = net(x)
    site = "mlp.silu#0" if functional else "mlp.act_fn"
    assert recycled == {site: [0, 7]}
    assert torch.equal(before, after)
    touched = {"mlp.gate_proj.weight": 0, "mlp.gate_proj.bias": 0, "mlp.up_proj.weight": 0, "mlp.up_proj.bias": 0,
               "mlp.down_proj.weight": 1}
    for name, p in net.named_parameters():
        keep = torch.ones(p.shape, dtype=torch.bool)
        if name in touched:
            keep.index_fill_(touched[name], torch.tensor([0, 7]), False)
            assert not torch.equal(p[~keep], weights[name][~keep]), name
        assert torch.equal(p.detach()[keep], weights[name][keep]), name
        assert all(torch.equal(v[keep], state[id(p)][k][keep]) and not v[~keep].any()
                   for k, v in opt.state[p].items() if v.ndim), name
    assert not net.mlp.down_proj.weight[:, [0, 7]].any()


class Residual(nn.Module):
    """act(fc(x) + x): a residual add between the layer and the activation."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.bias[3] = -1e4

    def forward(self, x):
        return self.out(self.act(self.fc(x) + x))


def test_ambiguous_site_is_skipped_with_one_warning(x):
    torch.manual_seed(0)
    net = Residual()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=3) as monitor:
        train(net, monitor, opt, 3, x)
        weights = snapshot(net)
        with pytest.warns(RuntimeWarning, match=r"recycle: site 'act' skipped: .*residual add"):
            assert monitor.recycle(opt) == {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # one warning per site, not one per call
            assert monitor.recycle(opt) == {}
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())


def test_tied_weights_are_skipped(x):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    net[2].weight = net[0].weight                  # shared
    with torch.no_grad():
        net[0].bias[3] = -1e4
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=3) as monitor:
        train(net, monitor, opt, 3, x)
        with pytest.warns(RuntimeWarning, match=r"site '1' skipped: .*shared"):
            assert "1" not in monitor.recycle(opt)


def test_conv_batchnorm_pool_conv(x):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].bias[[2, 6]] = -1e4
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    with deadwatch.watch(net, reporters=[], window=3, optimizer=opt) as monitor:
        train(net, monitor, opt, 3, images)
        before = net(images)             # train mode: batch statistics (this updates the running ones)
        before_eval = net.eval()(images)  # eval mode: the running statistics
        recycled = monitor.recycle()
        assert net[1].running_mean[[2, 6]].eq(0).all() and net[1].running_var[[2, 6]].eq(1).all()
        after_eval = net(images)
        after = net.train()(images)
    assert recycled == {"2": [2, 6]}
    assert torch.equal(before, after) and torch.equal(before_eval, after_eval)
    assert net[1].weight[[2, 6]].eq(1).all() and net[1].bias[[2, 6]].eq(0).all()
    assert not net[4].weight[:, [2, 6]].any() and net[4].weight[:, [0, 1, 3]].all()
    assert not opt.state[net[4].weight]["momentum_buffer"][:, [2, 6]].any()


def test_hf_conv1d_gpt2_mlp():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=8, vocab_size=20,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.bias[[5, 9]] = -1e4
    ids = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with deadwatch.watch(model, reporters=[], window=3, optimizer=opt) as monitor:
        for _ in range(3):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()
        before = model(ids).logits
        recycled = monitor.recycle()
        after = model(ids).logits
    assert recycled == {"transformer.h.0.mlp.act": [5, 9]}
    assert torch.equal(before, after)
    assert not mlp.c_proj.weight[[5, 9]].any()                   # Conv1D weight is (in, out): rows read the units
    assert (mlp.c_fc.weight[:, [5, 9]].std() - 0.02).abs() < 0.01  # drawn as Conv1D draws it
    assert not opt.state[mlp.c_proj.weight]["exp_avg"][[5, 9]].any()


def test_other_optimizers_say_what_could_not_be_reset(x):
    net = planted_mlp()
    opt = torch.optim.Adagrad(net.parameters(), lr=1e-2, initial_accumulator_value=0.5)
    with deadwatch.watch(net, reporters=[], window=3, optimizer=opt) as monitor:
        train(net, monitor, opt, 3, x)
        for state in opt.state.values():
            state["custom"] = torch.ones(3)        # another optimizer's other-shaped state
        with pytest.warns(RuntimeWarning, match=r"Adagrad\['custom'\]"):
            assert monitor.recycle() == DEAD
    assert opt.state[net[0].weight]["sum"][[1, 3, 5]].eq(0.5).all()   # back to its start value


# -- config and the automatic mode
@pytest.mark.parametrize("recycle, message", [
    ({"every": -1}, "recycle.every must be a non-negative integer"),
    ({"every": True}, "recycle.every must be a non-negative integer"),
    ({"units": "zombie"}, "recycle.units must be one of dead, dormant"),
    ({"max_fraction": 0}, "recycle.max_fraction must be above 0"),
    ({"max_fraction": 1.5}, r"recycle.max_fraction must be a number in \[0, 1\]"),
    ({"often": 1}, "unknown config key 'recycle.often'"),
    ("yes", "recycle must be a mapping"),
])
def test_config_errors(recycle, message):
    with pytest.raises(deadwatch.ConfigError, match=message):
        deadwatch.config.load(recycle=recycle)


def test_automatic_mode_needs_the_optimizer():
    with pytest.raises(deadwatch.ConfigError, match=r"optimizer=opt"):
        deadwatch.watch(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), reporters=[], recycle={"every": 1})
    config = deadwatch.config.load()
    assert config.recycle_every == 0 and config.to_dict()["recycle"] == {"every": 0, "units": "dead",
                                                                        "max_fraction": 0.1}


def test_automatic_mode_logs_each_recycling(tmp_path, x, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net = planted_mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with deadwatch.watch(net, logdir=tmp_path, window=3, report_every=4, optimizer=opt,
                         recycle={"every": 2, "max_fraction": 0.05}) as monitor:
        train(net, monitor, opt, 10, x)
    out = capsys.readouterr().out
    # one step after the 2nd report (step 8), on the verdict of step 9: at most 5% of 32 units, i.e. 1 per
    # site, the lowest index among equals
    assert "deadwatch: step 9: recycled 2 units: 1 1, 3 1" in out
    log = runlog.read(str(tmp_path))
    assert [(r["step"], r["units"]) for _, r in log.recycles] == [(9, {"1": [1], "3": [2]})]
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("deadwatch/recycled/1")] == [(9, 1.0)]
    summary = subprocess.run([str(BIN / "deadwatch"), "summary", str(tmp_path)], capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    assert "recycled 2 units in 1 recycling (step 9): 1 1, 3 1" in summary.stdout
    assert "torn" not in summary.stdout + summary.stderr
    # the run log's last report (the final one, at close), `summary` and report() tell the same verdict
    final = monitor.report()
    assert final.step == log.last.step == 10
    assert [(l.name, l.dead_units) for l in log.last.layers] == [(l.name, l.dead_units) for l in final.layers] == \
        [("1", [3, 5]), ("3", [])]
    assert f"{final.dead_fraction:.1%} of 64 units dead" in summary.stdout


def test_no_automatic_recycling_at_the_last_report(tmp_path, x):
    """A run that ends at a report due for recycling: nothing is recycled after it, so the run log, `summary`
    and report() agree, and no unit is redrawn that could not train."""
    net = planted_mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with deadwatch.watch(net, logdir=tmp_path, reporters=["jsonl"], window=3, report_every=4, optimizer=opt,
                         recycle={"every": 2, "max_fraction": 1.0}) as monitor:
        train(net, monitor, opt, 8, x)
        weights = snapshot(net)
    final = monitor.report()
    log = runlog.read(str(tmp_path))
    assert log.recycles == [] and all(torch.equal(p, weights[n]) for n, p in net.named_parameters())
    assert log.last.step == final.step == 8
    assert [l.dead_units for l in log.last.layers] == [l.dead_units for l in final.layers] == [[1, 3, 5], [2]]
    summary = subprocess.run([str(BIN / "deadwatch"), "summary", str(tmp_path)], capture_output=True, text=True)
    assert f"{final.dead_fraction:.1%} of 64 units dead" in summary.stdout


def test_custom_reporter_without_recycled_keeps_working(x):
    class Plain:
        def __init__(self):
            self.reports = []

        def emit(self, report):
            self.reports.append(report.step)

        def close(self):
            pass

    plain = Plain()
    net = planted_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[plain], window=3, report_every=2, optimizer=opt,
                         recycle={"every": 1, "max_fraction": 1.0}) as monitor:
        train(net, monitor, opt, 4, x)
    assert plain.reports == [2, 4]
