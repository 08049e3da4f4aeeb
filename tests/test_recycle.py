"""Recycling dead and dormant units (issues 11, 16): Monitor.recycle() and the automatic `recycle` config.

Planted models: a bias of -1e4 kills a unit exactly (its ReLU/SiLU output is 0 for every input).
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.reporters import runlog

import layouts

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


def test_ambiguous_site_is_skipped_with_one_warning(x):
    torch.manual_seed(0)
    net = layouts.Residual()
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


# -- the common layouts of the issue: each recycled correctly, with Adam and with SGD momentum
def fill_state(opt):
    """Dead units get no gradient, so their optimizer state is 0: give every entry a value to reset."""
    for state in opt.state.values():
        for value in state.values():
            if value.ndim:
                value.add_(torch.rand(value.shape) + 0.1)


OPTIMIZERS = {"adam": lambda p: torch.optim.Adam(p, lr=1e-3),
              "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)}


def _hf_out(model, batch):
    out = model(batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


LAYOUTS = {   # name: (model, batch, output, site, dead units, {parameter: (dim, what)})
    "conv-bn": (layouts.conv_bn, lambda: torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
                None, "2", [2, 6], {"0.weight": (0, "row"), "1.weight": (0, 1.0), "1.bias": (0, 0.0),
                                    "3.weight": (1, "column")}),
    "gated-mlp": (layouts.GatedMLP, layouts.gated_inputs, None, "act_fn", [0, 7],
                  {"gate_proj.weight": (0, "row"), "up_proj.weight": (0, "row"), "down_proj.weight": (1, "column")}),
    "gated-mlp-F.silu": (lambda: layouts.GatedMLP(functional=True), layouts.gated_inputs, None, "silu#0", [0, 7],
                         {"gate_proj.weight": (0, "row"), "up_proj.weight": (0, "row"),
                          "down_proj.weight": (1, "column")}),
    "actor-critic": (layouts.ActorCritic, layouts.gated_inputs, None, "v_act", [3, 9],
                     {"v1.weight": (0, "row"), "v1.bias": (0, "row"), "v.weight": (1, "column")}),
    "two-heads": (layouts.TwoHeads, layouts.gated_inputs, None, "act", [1, 4],
                  {"fc.weight": (0, "row"), "fc.bias": (0, "row"), "h1.weight": (1, "column"),
                   "h2.weight": (1, "column")}),
    "gpt2": (layouts.gpt2, layouts.token_ids, _hf_out, "transformer.h.0.mlp.act", [5, 9],
             {"transformer.h.0.mlp.c_fc.weight": (1, "row"), "transformer.h.0.mlp.c_fc.bias": (0, "row"),
              "transformer.h.0.mlp.c_proj.weight": (0, "column")}),
    "bert": (layouts.bert, layouts.token_ids, _hf_out, "encoder.layer.0.intermediate.intermediate_act_fn", [0, 36],
             {"encoder.layer.0.intermediate.dense.weight": (0, "row"),
              "encoder.layer.0.intermediate.dense.bias": (0, "row"),
              "encoder.layer.0.output.dense.weight": (1, "column")}),
}


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_common_layouts_are_recycled_exactly(layout, make_opt):
    make, batch, output, site, dead, touched = LAYOUTS[layout]
    if layout in ("gpt2", "bert") and layouts.transformers is None:
        pytest.skip("transformers is not installed")
    torch.manual_seed(0)
    model, x = make(), batch()
    output = output or (lambda m, b: m(b))
    opt = make_opt(model.parameters())

    def train_steps(n):
        for _ in range(n):
            loss = output(model, x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()

    with deadwatch.watch(model, reporters=[], window=2, report_every=1000, optimizer=opt) as monitor:
        train_steps(3)
        assert monitor.report().layer(site).dead_units == dead
        fill_state(opt)
        weights, state = snapshot(model), state_snapshot(opt)
        with torch.no_grad():   # train mode (batch norm: batch statistics) and eval mode (running ones; not counted)
            before, before_eval = output(model, x), output(model.eval(), x)
        assert monitor.recycle() == {site: dead}
        with torch.no_grad():
            after_eval, after = output(model, x), output(model.train(), x)
        assert torch.equal(before, after) and torch.equal(before_eval, after_eval)   # bit for bit
        index = torch.tensor(dead)
        for name, p in model.named_parameters():
            keep = torch.ones(p.shape, dtype=torch.bool)
            if name in touched:
                keep.index_fill_(touched[name][0], index, False)
                new, what = p.detach()[~keep], touched[name][1]
                if what == "row":
                    assert not torch.equal(new, weights[name][~keep]), name      # drawn afresh
                else:
                    assert new.eq(0.0 if what == "column" else what).all(), name  # zeroed, or the norm's start
            assert torch.equal(p.detach()[keep], weights[name][keep]), name      # everything else: bit for bit
            for key, value in opt.state[p].items():
                if value.ndim:
                    assert torch.equal(value[keep], state[id(p)][key][keep]), (name, key)
                    assert not value[~keep].any(), (name, key)                   # exactly those slices are 0
                else:
                    assert torch.equal(value, state[id(p)][key]), (name, key)    # Adam's step: per parameter
        recycled_at = monitor.steps
        train_steps(3)
        last = monitor.report().layer(site).last_fired
    assert recycled_at == 3 and all(last[u] == 6 for u in dead)   # they fire again: at the last training step


@pytest.mark.parametrize("api", ["nn.utils.weight_norm", "parametrizations.weight_norm"])
@pytest.mark.parametrize("where", ["producer", "consumer"])
def test_weight_norm_layers_are_skipped_and_training_goes_on(x, api, where):
    norm = nn.utils.weight_norm if api == "nn.utils.weight_norm" else nn.utils.parametrizations.weight_norm
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch deprecates nn.utils.weight_norm
        first, last = nn.Linear(16, 32), nn.Linear(32, 2)
        first, last = (norm(first), last) if where == "producer" else (first, norm(last))
    net = nn.Sequential(first, nn.ReLU(), last)
    with torch.no_grad():
        net[0].bias[[1, 3]] = -1e4
    opt = torch.optim.Adam(net.parameters(), lr=0.0)   # lr 0: any change would be recycling's
    if where == "consumer":   # its weight is computed in forward: the map says so
        why = r"'2' reads it with another tensor that needs grad \(a weight computed in its " \
              r"forward, such as weight norm's\?\)"
    elif api == "nn.utils.weight_norm":
        why = r"0\.weight_g is not a weight or bias reset_parameters\(\) draws \(nn.utils.weight_norm\?\)"
    else:
        why = r"'0' has parametrisations \(weight: nn.utils.parametrizations.weight_norm\?\)"
    with deadwatch.watch(net, reporters=[], window=2, report_every=2, optimizer=opt,
                         recycle={"every": 1, "max_fraction": 1.0}) as monitor:
        train(net, monitor, opt, 2, x)
        weights = snapshot(net)
        with pytest.warns(RuntimeWarning, match=rf"recycle: site '1' skipped: {why}"):
            train(net, monitor, opt, 4, x)    # automatic recycling at step 3: skipped, step() goes on
        assert monitor.steps == 6
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())


class Failing(nn.Linear):
    def reset_parameters(self):
        if hasattr(self, "ready"):
            raise RuntimeError("no init here")
        super().reset_parameters()


def test_a_failing_reset_parameters_skips_before_anything_changes(x):
    net = planted_mlp()
    net[2] = Failing(32, 32)
    with torch.no_grad():
        net[2].bias.fill_(0.5)
        net[2].bias[2] = -1e4
    net[2].ready = True
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=3, optimizer=opt) as monitor:
        train(net, monitor, opt, 3, x)
        weights = snapshot(net)
        with pytest.warns(RuntimeWarning, match=r"site '3' skipped: its producer '2': reset_parameters\(\) failed "
                                                 r"\(RuntimeError: no init here\)"):
            assert monitor.recycle(sites="3") == {}
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())


def test_automatic_recycling_that_fails_warns_and_training_goes_on(x, monkeypatch):
    from deadwatch import recycle

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(recycle, "renew", broken)
    net = planted_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=2, report_every=2, optimizer=opt,
                         recycle={"every": 1, "max_fraction": 1.0}) as monitor:
        train(net, monitor, opt, 2, x)
        with pytest.warns(RuntimeWarning, match=r"automatic recycling at step 3 failed \(RuntimeError: boom\); "
                                                 r"nothing was recycled, training goes on"):
            train(net, monitor, opt, 2, x)
        assert monitor.steps == 4


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.act, self.out = nn.Embedding(10, 8), nn.ReLU(), nn.Linear(8, 2)
        with torch.no_grad():
            self.emb.weight[:, 3] = -1e4

    def forward(self, x):
        return self.out(self.act(self.emb(x)))


class Split(nn.Module):
    """fc's 16 outputs viewed as (2, 8): the site has 8 units, its producer 16 rows."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(16, 16), nn.ReLU(), nn.Linear(8, 2)
        with torch.no_grad():
            self.fc.bias[[3, 11]] = -1e4

    def forward(self, x):
        return self.out(self.act(self.fc(x).view(-1, 2, 8)))


class Aliased(nn.Module):
    """One layer registered twice (called once)."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
        self.alias = self.fc
        with torch.no_grad():
            self.fc.bias[3] = -1e4

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class TiedUnused(Aliased):
    """fc's weight tied to a layer that does not run."""

    def __init__(self):
        super().__init__()
        del self.alias
        self.spare = nn.Linear(16, 16)
        self.spare.weight = self.fc.weight


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.act2, self.out = nn.Linear(16, 16), nn.ReLU(), nn.ReLU(), nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.bias[3] = -1e4

    def forward(self, x):
        return self.out(self.act2(self.fc(self.act(self.fc(x)))))


class Pooler(nn.Module):
    """The activation's output is returned: no layer reads it."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(16, 16), nn.ReLU()
        with torch.no_grad():
            self.fc.bias[3] = -1e4

    def forward(self, x):
        return self.act(self.fc(x))


def _planted(net, i):
    with torch.no_grad():
        net[i].bias[3] = -1e4
    return net


def _skipped(make, batch, site, message):
    torch.manual_seed(0)
    net = make()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=2, optimizer=opt) as monitor:
        train(net, monitor, opt, 2, batch)
        weights = snapshot(net)
        with pytest.warns(RuntimeWarning, match=rf"recycle: site '{site}' skipped: {message}"):
            assert site not in monitor.recycle()
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())


@pytest.mark.parametrize("make, site, message", [
    (Embedded, "act", r"its producer 'emb' \(Embedding\) is not a Linear, Conv or HF Conv1D"),
    (Split, "act", "its producer 'fc' does not have 8 outputs"),
    (lambda: _planted(nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2)), 1), "2",
     r"'1' \(LayerNorm\) normalises across units"),
    (Aliased, "act", r"'fc' is used at several places in the model \(shared weights\)"),
    (CalledTwice, "act2", r"'fc' is used more than once per forward"),
    (TiedUnused, "act", r"fc.weight is shared with another layer \(tied weights\)"),
    (Pooler, "act", "the forward of the model returns it without a layer reading it"),
])
def test_what_cannot_be_recycled_exactly_is_skipped(x, make, site, message):
    _skipped(make, torch.randint(0, 10, (8, 4)) if make is Embedded else x, site, message)


def test_flattened_maps_are_skipped():
    def make():
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        with torch.no_grad():
            net[0].bias[1] = -1e4
        return net
    _skipped(make, torch.randn(4, 3, 8, 8), "1", r"its consumer '3' does not read 4 units")


def test_a_manual_recycle_restarts_the_sites_interval(x):
    """Mid-interval: the recycled units are judged on the steps since, not on the site's earlier observations
    (which would make them look dormant and recycle them again)."""
    net = planted_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=3, report_every=1000, optimizer=opt, count_subsample=1) as monitor:
        train(net, monitor, opt, 5, x)
        assert monitor.recycle(sites="1") == {"1": [1, 3, 5]}
        train(net, monitor, opt, 2, x)
        layer = monitor.report().layer("1")
        with torch.no_grad():
            h = torch.relu(net[0](x))
        assert layer.observations == 2 * len(x)
        assert layer.firing_rate.tolist() == pytest.approx((h > 0).float().mean(0).tolist())   # lr 0: the same both steps
        assert monitor.recycle(sites="1", units="dormant") == {}


def test_what_the_ranks_do_not_agree_on_is_skipped_on_every_rank(x, monkeypatch):
    """Under torch.distributed the ranks compare their plans (faked here for a rank 1): a site another rank
    plans otherwise, one that has not run there, and one that has not run here are skipped."""
    import dataclasses

    import torch.distributed as dist

    from deadwatch import sync

    net = planted_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with deadwatch.watch(net, reporters=[], window=3, optimizer=opt) as monitor:
        train(net, monitor, opt, 3, x)
        report = monitor.report()
        report.layers.append(dataclasses.replace(report.layers[0], name="ghost"))
        weights = snapshot(net)

        def all_gather_object(out, mine):
            other = {name: plan for name, plan in mine.items() if name != "3"}   # "3" has not run on rank 1
            other["1"] = ((("0",), None, ("4",)), None)                         # rank 1 found other layers
            out[:] = [mine, other]

        monkeypatch.setattr(sync, "distributed", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
        with pytest.warns(RuntimeWarning) as caught:
            assert monitor._recycle(report, opt, None, "dead") == {}
        monkeypatch.undo()
    assert sorted(str(w.message) for w in caught) == [
        "deadwatch: recycle: site '1' skipped: the ranks found other layers",
        "deadwatch: recycle: site '3' skipped: it has not run there",
        "deadwatch: recycle: site 'ghost' skipped: it has not run in this process"]
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())


def test_a_recycling_is_not_measured_as_an_optimizer_update(x, monkeypatch):
    """The large_update evidence is the optimizer's step (||dW||/||W||): new rows drawn by a recycling
    between the copy and the measurement must not read as a huge update."""
    from deadwatch import updates
    monkeypatch.setattr(updates, "EVERY", 1)  # copy and measure at every step
    net = planted_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # the optimizer moves nothing: every ratio is 0
    with deadwatch.watch(net, reporters=[], report_every=1000, optimizer=opt) as monitor:
        train(net, monitor, opt, 4, x)
        assert monitor.recycle()                      # between step 4's copies and step 5's measurement
        train(net, monitor, opt, 3, x)
        spans, ratios = monitor._updates.of("0.weight")
    assert ratios and max(ratios) == 0.0
    assert (4, 4) in spans and (5, 5) not in spans and (6, 6) in spans
