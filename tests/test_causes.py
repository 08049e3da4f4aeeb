"""Causes of dead units, ranked with evidence: the rules on evidence built by hand, then on real runs
whose cause was planted (biases driven negative, a learning-rate spike, units dead from the start)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.causes import Evidence, explain


def codes(causes):
    return [c.code for c in causes]


# ---- the rules ----------------------------------------------------------------------------------

def test_biases_far_below_the_live_ones_name_negative_bias():
    bias = np.array([0.1, -4.0, 0.05, -3.5, 0.2, 0.0])
    ev = Evidence(dead_units=[1, 3], last_fired=[9, 4, 9, 5, 9, 9], bias=bias, bias_name="fc.bias")
    causes = explain(ev)
    assert codes(causes)[0] == "negative_bias"
    assert causes[0].score == 1.0
    assert "fc.bias" in causes[0].evidence and "-3.75" in causes[0].evidence


def test_ordinary_biases_never_fired_name_dead_from_start_not_negative_bias():
    bias = np.array([0.1, 0.12, 0.05, 0.08, 0.2, 0.0])
    ev = Evidence(dead_units=[1, 3], last_fired=[9, -1, 9, -1, 9, 9], bias=bias)
    causes = explain(ev)
    assert codes(causes) == ["dead_from_start"]
    assert causes[0].score == 1.0


def test_deaths_right_after_a_learning_rate_jump_name_lr_spike_at_that_step():
    ev = Evidence(dead_units=[0, 1, 2, 5], last_fired=[21, 22, 22, 30, 30, 7],
                  lr_changes=[(1, (0.01,)), (21, (1.0,)), (24, (0.01,))])
    causes = explain(ev)
    assert codes(causes)[0] == "lr_spike"
    assert causes[0].score == 0.75
    assert "x100 at step 21" in causes[0].evidence and "21–22" in causes[0].evidence


def test_a_learning_rate_that_only_goes_down_is_no_spike():
    ev = Evidence(dead_units=[0], last_fired=[21, 30], lr_changes=[(1, (1.0,)), (21, (0.1,))])
    assert "lr_spike" not in codes(explain(ev))


def test_a_mostly_dead_input_names_dead_input():
    ev = Evidence(dead_units=[0], last_fired=[3, 9], input_site="act1", input_dead_fraction=0.8)
    assert codes(explain(ev)) == ["dead_input"]
    assert "act1" in explain(ev)[0].evidence


def test_no_dead_units_no_causes():
    assert explain(Evidence(dead_units=[], last_fired=[3, 4], bias=np.zeros(2))) == []


# ---- real runs with a planted cause ----------------------------------------------------------------

def _data(seed=1, n=512, nonnegative=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g) if nonnegative else torch.randn(n, 8, generator=g)
    return x, x[:, :4].argmax(1)


def _train(net, opt, steps, monitor, x, y, before_step=None):
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(step)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_a_learning_rate_spike_names_lr_spike_at_its_step():
    """A healthy run whose learning rate is 200 times higher for steps 30-32."""
    net, (x, y) = _net(), _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def schedule(step):
        for group in opt.param_groups:
            group["lr"] = 10.0 if 30 <= step <= 32 else 0.05

    with deadwatch.watch(net, reporters=[], window=10, optimizer=opt) as monitor:
        _train(net, opt, 60, monitor, x, y, schedule)
    layer = monitor.report().layer("3")
    assert layer.status == "critical"
    assert layer.causes[0].code == "lr_spike"
    assert "x200 at step 30" in layer.causes[0].evidence
    assert layer.hint.startswith(f"lr_spike (score {layer.causes[0].score:.2f}, ")
    assert f"{layer.causes[0].units} of {len(layer.dead_units)} dead units): learning rate x200 at step 30" in layer.hint


def test_biases_driven_negative_name_negative_bias():
    """A healthy run in which the biases of half of layer 2's units drift far below the others at step 20."""
    net, (x, y) = _net(), _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def drift(step):
        if step == 20:
            with torch.no_grad():
                net[2].bias[:32] -= 50.0

    with deadwatch.watch(net, reporters=[], window=10, optimizer=opt) as monitor:
        _train(net, opt, 40, monitor, x, y, drift)
    layer = monitor.report().layer("3")
    assert set(range(32)) <= set(layer.dead_units)
    assert layer.causes[0].code == "negative_bias"
    assert "2.bias" in layer.causes[0].evidence
    assert "lr_spike" not in codes(layer.causes)


def test_units_dead_from_the_start_with_ordinary_biases_name_dead_from_start():
    """Non-negative inputs and weight rows all negative: units 0-7 never fire, their biases are the
    default init's like every other unit's."""
    net, (x, y) = _net(), _data(nonnegative=True)
    with torch.no_grad():
        net[0].weight[:8] = -net[0].weight[:8].abs() - 0.5
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with deadwatch.watch(net, reporters=[], window=10, optimizer=opt) as monitor:
        _train(net, opt, 20, monitor, x, y)
    layer = monitor.report().layer("1")
    assert set(range(8)) <= set(layer.dead_units)
    assert all(layer.last_fired[u] == -1 for u in range(8))
    assert layer.causes[0].code == "dead_from_start"
    assert "negative_bias" not in codes(layer.causes)


def test_causes_travel_in_the_run_log_and_the_summary(tmp_path, capsys):
    from deadwatch import cli
    from deadwatch.reporters import runlog

    net, (x, y) = _net(), _data(nonnegative=True)
    with torch.no_grad():
        net[0].weight[:8] = -net[0].weight[:8].abs() - 0.5
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with deadwatch.watch(net, logdir=tmp_path, reporters=["jsonl"], window=10, report_every=10) as monitor:
        _train(net, opt, 20, monitor, x, y)
    last = runlog.read(str(tmp_path)).last.layer("1")
    assert last.causes == monitor.report().layer("1").causes
    assert last.causes[0].units == len(last.dead_units) and last.causes[0].dead == len(last.dead_units)
    assert cli.main(["summary", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich folds long lines
    assert f"dead_from_start (score 1.00, {len(last.dead_units)} of {len(last.dead_units)} dead units)" in out


def test_a_cause_from_a_run_log_written_before_the_counts_shows_its_score():
    from deadwatch.analysis import Report
    d = {"step": 1, "window": 1, "layers": [{
        "name": "fc", "kind": "ReLU", "units": 4, "dead_units": [0, 1], "dead_fraction": 0.5, "zero_fraction": 0.5,
        "observations": 4, "status": "critical",
        "causes": [{"code": "negative_bias", "score": 0.5, "evidence": "fc.bias: ..."}]}]}
    layer = Report.from_dict(d).layer("fc")
    assert layer.hint.startswith("negative_bias (score 0.50): fc.bias")


def test_without_a_graph_the_bias_comes_from_the_layers_around():
    """Forwards under no_grad leave no autograd graph: in an nn.Sequential, whose children run in order, the
    producer is the layer before the activation, so planted negative biases are still named."""
    net, (x, _) = _net(), _data(nonnegative=True)
    with torch.no_grad():
        net[0].bias[:8] = -1e4
    with deadwatch.watch(net, reporters=[], window=5) as monitor:
        for _ in range(3):
            with torch.no_grad():
                net(x)
            monitor.step()
    layer = monitor.report().layer("1")
    assert layer.dead_units[:8] == list(range(8))
    assert layer.causes[0].code == "negative_bias" and "0.bias" in layer.causes[0].evidence


# ---- learning-rate schedules are no spikes; a real jump is, at its step -------------------------------

def _rates_of(make_scheduler, steps, lr=0.1, sched_first=False):
    """The learning-rate history a monitor records for a real torch scheduler over `steps` steps."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    sched = make_scheduler(opt)
    with deadwatch.watch(net, reporters=[], optimizer=opt, report_every=1000) as monitor:
        for _ in range(steps):
            net(torch.ones(1, 2))
            opt.step()
            if sched_first:
                sched.step()
                monitor.step()
            else:
                monitor.step()
                sched.step()
    return monitor._lr_changes


def _warmup_cosine(opt, warmup=50, total=400):
    import math
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warmup if s < warmup else
                                             0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))


SCHEDULES = {
    "warmup_from_0_then_cosine": lambda opt: _warmup_cosine(opt),
    "short_warmup_from_0": lambda opt: _warmup_cosine(opt, warmup=5),
    "warmup_from_1e-7": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1e-6 + s / 100, 1.0)),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=401),
    "linear_warmup_LinearLR": lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=20),
    "step_decay": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.3),
    "warm_restarts": lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=40),
    "exponential_warmup": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.1 ** s / 1.1 ** 60, 1.0)),
}


@pytest.mark.parametrize("sched_first", [False, True], ids=["monitor_first", "sched_first"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_are_no_spikes(name, sched_first):
    from deadwatch.causes import spikes
    changes = _rates_of(SCHEDULES[name], 400, sched_first=sched_first)
    assert len(changes) > 5, "the schedule did not move the rate: the test proves nothing"
    assert spikes(changes) == []
    # every death of the run (any unit, any step) is then free of spike blame
    ev = Evidence(dead_units=list(range(20)), last_fired=list(range(2, 400, 20)), lr_changes=changes)
    assert "lr_spike" not in codes(explain(ev))


@pytest.mark.parametrize("sched_first", [False, True], ids=["monitor_first", "sched_first"])
def test_a_x50_jump_at_step_150_is_a_spike_at_150_in_either_order(sched_first):
    """The 150th optimizer step runs with 50 times the rate: whether the loop steps the scheduler before
    or after monitor.step() (the HF Trainer steps it before), the jump is at step 150."""
    from deadwatch.causes import spikes
    changes = _rates_of(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 50.0 if s >= 149 else 1.0),
                        200, sched_first=sched_first)
    assert [(step, round(factor)) for step, _, factor in spikes(changes)] == [(150, 50)]


def test_a_jump_during_a_warmup_is_still_a_spike():
    from deadwatch.causes import spikes
    changes = [(s, (0.001 * s,)) for s in range(1, 40)] + [(40, (2.0,)), (41, (0.041,))]
    assert [(s, e) for s, e, _ in spikes(changes)] == [(40, 40)]


def test_each_spike_condition_is_needed():
    """Guards of spikes(): the rate must be SPIKE_FACTOR above every earlier rate (a return to an earlier
    peak is none), and its rise apart from the rises into the step before and after (a ramp is none)."""
    from deadwatch.causes import spikes
    back_to_peak = [(1, (1.0,)), (10, (0.01,)), (11, (1.0,))]
    assert spikes(back_to_peak) == []
    ramp_then_more = [(1, (0.1,)), (2, (0.3,)), (3, (0.5,))]   # x3 at step 2, but step 3 rises as much
    assert spikes(ramp_then_more) == []
    ramp_before = [(1, (0.1,)), (2, (0.2,)), (3, (0.9,))]       # x4.5 at step 3, rising 7x more than before
    assert [s for s, _, _ in spikes(ramp_before)] == [3]
    steady_before = [(1, (0.1,)), (2, (0.3,)), (3, (0.5,)), (4, (0.7,))]
    assert spikes(steady_before) == []
    assert spikes([(1, (0.0,)), (2, (0.1,))]) == []            # from 0: no earlier rate to compare with
    short_warmup_end = [(1, (0.0,)), (2, (0.05,)), (3, (0.1,))]  # x2 at its last step, rising as much as before
    assert spikes(short_warmup_end) == []


def test_a_real_x50_jump_at_step_150_names_lr_spike_at_150():
    """Steps 150-152 run at 50 times the rate, on labels the net cannot fit (so gradients stay large):
    units die over the next 20 steps (momentum carries the jump on)."""
    net, (x, _) = _net(), _data()
    y = torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 50.0 if 149 <= s < 152 else 1.0)
    with deadwatch.watch(net, reporters=[], window=20, report_every=1000, optimizer=opt) as monitor:
        for _ in range(200):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()   # before monitor.step(), as the HF Trainer does
            monitor.step()
    layer = monitor.report().layer("3")
    assert layer.status == "critical"
    assert layer.causes[0].code == "lr_spike"
    assert "x50 at step 150" in layer.causes[0].evidence
    assert layer.hint.startswith("lr_spike (score 1.00, ")
    assert "large_update" not in codes(layer.causes), "the jump's large updates are the jump's story"


def test_warmup_and_cosine_with_biases_pushed_down_name_negative_bias_not_a_spike():
    """The issue's scenario: linear warm-up over 50 steps then cosine; at step 200 the biases of half of
    layer 2's units are pushed far down. The warm-up doubles the rate at its start: no spike."""
    net, (x, y) = _net(), _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = _warmup_cosine(opt, warmup=50, total=260)
    with deadwatch.watch(net, reporters=[], window=20, report_every=1000, optimizer=opt) as monitor:
        for step in range(1, 251):
            if step == 200:
                with torch.no_grad():
                    net[2].bias[:32] -= 50.0
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()
            sched.step()
    layer = monitor.report().layer("3")
    assert set(range(32)) <= set(layer.dead_units)
    assert codes(layer.causes)[0] == "negative_bias", layer.causes
    assert "lr_spike" not in codes(layer.causes)
    assert "large_update" not in codes(layer.causes)
    assert layer.hint.startswith(f"negative_bias (score {32 / len(layer.dead_units):.2f}, 32 of {len(layer.dead_units)} dead units): 2.bias")


# ---- the bias evidence comes from the right parameter ---------------------------------------------

def test_batchnorm_bias_kills_name_the_batchnorm_bias():
    """Linear(bias=False) -> BatchNorm1d -> ReLU (a ResNet's layout): the units' shift is the norm's bias,
    not its weight (the first per-unit parameter in the graph) nor any other layer's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    (x, y) = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with deadwatch.watch(net, reporters=[], window=10, optimizer=opt) as monitor:
        for step in range(1, 31):
            if step == 15:
                with torch.no_grad():
                    net[1].bias[:16] = -5.0   # 5 standard deviations below: never fires
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()
    layer = monitor.report().layer("2")
    assert set(range(16)) <= set(layer.dead_units)
    top = layer.causes[0]
    assert top.code == "negative_bias"
    assert top.evidence.startswith("1.bias: median -5") and "1.weight" not in top.evidence
    assert top.units == 16


def test_a_producer_without_bias_gives_no_bias_evidence():
    """Units of layer 3 (Linear(bias=False)) killed by weight rows that only see negative values; layer 1's
    bias has as many values as layer 3 has units and is planted low: it must not be borrowed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 4))
    x, y = _data(nonnegative=True)
    with torch.no_grad():
        net[0].bias[:8] = -50.0                  # dead in site "1": a low bias there, and only there
        net[2].weight[:8] = -net[2].weight[:8].abs() - 0.5
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with deadwatch.watch(net, reporters=[], window=10, optimizer=opt) as monitor:
        _train(net, opt, 20, monitor, x, y)
    report = monitor.report()
    assert report.layer("1").causes[0].code == "negative_bias"   # the planted bias is found where it is
    layer = report.layer("3")
    assert set(range(8)) <= set(layer.dead_units)
    assert "negative_bias" not in codes(layer.causes)
    assert all("bias" not in c.evidence for c in layer.causes), layer.causes
    assert layer.causes[0].code == "dead_from_start"


# ---- the large-update cause ---------------------------------------------------------------------------

def test_large_updates_around_the_deaths_name_large_update():
    ev = Evidence(dead_units=[0, 1, 2, 3], last_fired=[44, 46, 52, 130, 300, 300],
                  update_layer="fc.weight", update_spans=[(1, 10), (41, 50), (51, 60), (121, 130)],
                  update_ratios=[0.001, 0.08, 0.03, 0.002])
    causes = explain(ev)
    assert codes(causes) == ["large_update"]
    assert (causes[0].units, causes[0].dead) == (3, 4)
    assert "fc.weight" in causes[0].evidence and "0.08" in causes[0].evidence and "44–52" in causes[0].evidence


def test_each_large_update_guard():
    """Ordinary updates, large updates far from the deaths, and large updates inside a learning-rate jump
    (the jump's story) explain nothing."""
    base = dict(dead_units=[0], last_fired=[45, 300], update_layer="fc.weight", update_spans=[(41, 50), (191, 200)])
    assert explain(Evidence(**base, update_ratios=[0.019, 0.5])) == []        # below UPDATE_LARGE at the death
    assert codes(explain(Evidence(**base, update_ratios=[0.02, 0.001]))) == ["large_update"]  # from UPDATE_LARGE
    far = dict(base, last_fired=[120, 300])
    assert explain(Evidence(**far, update_ratios=[0.5, 0.5])) == []           # large, but 70 steps away
    spiked = Evidence(**base, update_ratios=[0.5, 0.001], lr_changes=[(1, (0.01,)), (44, (1.0,)), (46, (0.01,))])
    assert codes(explain(spiked)) == ["lr_spike"]


def test_the_demos_dying_run_names_large_update_with_its_evidence():
    from deadwatch import demo
    x, y, _ = demo.load_data()
    report = demo.train("dying", demo.dying, x, y, None)
    layer = report.layer("act2")
    assert layer.status == "critical"
    top = layer.causes[0]
    assert top.code == "large_update" and top.score >= 0.9
    assert top.evidence.startswith("hidden2.weight: updates ||dW||/||W|| up to ")
    assert layer.hint.startswith(f"large_update (score {top.score:.2f}, {top.units} of {len(layer.dead_units)} dead")


def test_a_healthy_run_shows_no_cause_anywhere():
    from deadwatch import demo
    from deadwatch.causes import REMEDIES
    from deadwatch.reporters.console import render
    from deadwatch.reporters.tensorboard import markdown
    x, y, _ = demo.load_data()
    report = demo.train("healthy", demo.healthy, x, y, None)
    assert not report.flagged
    assert all(layer.causes == [] and layer.hint is None for layer in report.layers)
    import io

    from rich.console import Console
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render(report))
    text = markdown(report) + console.file.getvalue()
    assert "act2" in text
    assert not any(code in text for code in REMEDIES) and "init" not in text


# ---- what the hint shows ------------------------------------------------------------------------------

def _critical(causes_):
    from deadwatch.analysis import LayerReport
    return LayerReport(name="fc", kind="ReLU", units=100, dead_units=list(range(84)), dead_fraction=0.84,
                       zero_fraction=0.9, observations=10, status="critical", causes=causes_)


def test_a_cause_explaining_2_of_84_does_not_headline():
    """82 of 84 dead units died at steps 1-66 with no evidence the rules read; 2 never fired."""
    from deadwatch.analysis import HINTS
    ev = Evidence(dead_units=list(range(84)), last_fired=[-1, -1] + list(range(1, 67)) + [66] * 16 + [90] * 16)
    causes = explain(ev)
    assert [(c.code, c.units, c.dead) for c in causes] == [("dead_from_start", 2, 84)]
    assert _critical(causes).hint == HINTS["critical"]


def test_the_headline_threshold_is_half_of_the_dead_units():
    from deadwatch.analysis import HINTS
    from deadwatch.causes import Cause
    half = Cause("negative_bias", 42 / 84, "fc.bias: ...", units=42, dead=84)
    assert _critical([half]).hint.startswith("negative_bias (score 0.50, 42 of 84 dead units): fc.bias")
    less = Cause("negative_bias", 41 / 84, "fc.bias: ...", units=41, dead=84)
    assert _critical([less]).hint == HINTS["critical"]


def test_no_cause_text_on_sites_not_flagged():
    from deadwatch.causes import Cause
    layer = _critical([Cause("negative_bias", 1.0, "fc.bias: ...", units=84, dead=84)])
    layer.status = "ok"
    assert layer.hint is None


def test_a_zero_score_cause_is_never_listed():
    """The dead units' median bias is far below the live median, but no dead unit's bias is below every
    live unit's: negative_bias explains none of them, and says nothing."""
    bias = np.array([-5.0, -6.0, 0.0, 0.0, 0.0, 0.0, 0.01, -10.0])
    ev = Evidence(dead_units=[0, 1], last_fired=[5, 6, 9, 9, 9, 9, 9, 9], bias=bias, bias_name="fc.bias")
    assert explain(ev) == []


# ---- the update measurements ----------------------------------------------------------------------------

def test_update_sizes_are_exact_on_the_measured_steps_only():
    from deadwatch import updates
    layer = nn.Linear(30, 20)
    sizes = updates.UpdateSizes(every=10)
    sizes.track([("fc.weight", layer, "weight")])
    expected = {}
    g = torch.Generator().manual_seed(0)
    for step in range(1, 31):
        before = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.add_(torch.randn(20, 30, generator=g) * 0.001 * step)
        expected[step] = float((layer.weight.detach() - before).norm() / before.norm())
        sizes.end_of_step(step)
    spans, ratios = sizes.of("fc.weight")
    assert spans == [(1, 10), (11, 20), (21, 30)]
    assert ratios == pytest.approx([expected[10], expected[20], expected[30]], rel=1e-5)


def test_update_sizes_of_a_big_weight_use_a_fixed_sample_and_leave_the_global_rng_alone():
    from deadwatch import updates
    layer = nn.Linear(400, 300)   # 120000 values > SAMPLE
    sizes = updates.UpdateSizes(every=1)
    state = torch.random.get_rng_state()
    sizes.track([("big.weight", layer, "weight")])
    sizes.end_of_step(1)
    with torch.no_grad():
        layer.weight.mul_(1.5)    # every value moves by half its size: the ratio is 0.5 on any sample
    sizes.end_of_step(2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sizes.of("big.weight")[1] == pytest.approx([0.5], rel=1e-5)


def test_a_sampled_ratio_matches_the_whole_weights_for_a_dense_update():
    """The sample is what keeps the measurement cheap on big layers; it must still read a dense update's
    size: Adam's and SGD's steps touch every value."""
    from deadwatch import updates
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(1024, 1024)           # 1M values, 256x the sample
    assert layer.weight.numel() > 100 * updates.SAMPLE
    sizes = updates.UpdateSizes(every=1)
    sizes.track([("big.weight", layer, "weight")])
    sizes.end_of_step(1)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(torch.randn(1024, 1024, generator=g) * 1e-3 * torch.rand(1024, 1, generator=g))
    sizes.end_of_step(2)
    whole = float((layer.weight.detach() - before).norm() / before.norm())
    # 200 such trials (other seeds): median error 1%, largest 4.6%
    assert sizes.of("big.weight")[1] == pytest.approx([whole], rel=0.05)


def test_update_sizes_of_weights_of_several_dtypes_and_sizes_are_each_their_own():
    """One tracker, weights of three dtypes and sizes (float64 and bfloat16 small, float32 sampled): each
    ratio is its own weight's, whatever the group it is measured with."""
    from deadwatch import updates
    layers = {"a": nn.Linear(30, 20).double(), "b": nn.Linear(40, 10).bfloat16(), "c": nn.Linear(300, 300),
              "d": nn.Linear(5, 5)}
    sizes = updates.UpdateSizes(every=1)
    sizes.track([(f"{name}.weight", layer, "weight") for name, layer in layers.items()])
    sizes.end_of_step(1)
    factors = {"a": 1.5, "b": 1.25, "c": 1.125, "d": 3.0}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.mul_(factors[name])
    sizes.end_of_step(2)
    for name, factor in factors.items():
        assert sizes.of(f"{name}.weight") == ([(2, 2)], pytest.approx([factor - 1], rel=1e-2 if name == "b" else 1e-5))


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_a_weight_that_changes_between_copy_and_measure_skips_that_measurement(change):
    """A layer pruned (new shape) or cast (new dtype) while watched: the copies taken before no longer fit;
    that update is not measured (no crash in monitor.step()), the next ones are, right."""
    from deadwatch import updates
    layer = nn.Linear(30, 20)
    sizes = updates.UpdateSizes(every=1)
    sizes.track([("fc.weight", layer, "weight")])
    sizes.end_of_step(1)
    with torch.no_grad():
        if change == "shape":
            layer.weight = nn.Parameter(layer.weight[:10].clone())
        else:
            layer.double()
    sizes.end_of_step(2)
    with torch.no_grad():
        layer.weight.mul_(1.5)
    sizes.end_of_step(3)
    assert sizes.of("fc.weight") == ([(3, 3)], pytest.approx([0.5], rel=1e-5))


def test_update_history_merges_neighbours_keeping_the_largest_when_full():
    from deadwatch import updates
    layer = nn.Linear(4, 4)
    sizes = updates.UpdateSizes(every=1)
    sizes.track([("fc.weight", layer, "weight")])
    sizes.end_of_step(0)
    for step in range(1, updates.CAPACITY + 1):
        with torch.no_grad():
            layer.weight.mul_(1.5 if step == 8 else 1.01)
        sizes.end_of_step(step)
    spans, ratios = sizes.of("fc.weight")
    assert len(spans) == updates.CAPACITY // 2 and sizes.every == 2
    assert spans[:4] == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert ratios[3] == pytest.approx(0.5, rel=1e-4) and ratios[0] == pytest.approx(0.01, rel=1e-3)


def test_update_sizes_skip_frozen_and_sharded_weights():
    from deadwatch import updates
    frozen = nn.Linear(3, 3).requires_grad_(False)
    sizes = updates.UpdateSizes()
    sizes.track([("frozen.weight", frozen, "weight"), ("none.weight", nn.ReLU(), "weight")])
    assert sizes.names == []


def test_rates_are_read_through_an_optimizer_wrapper():
    """accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer wrap the torch optimizer, whose
    step() runs the step hooks: the rates are read there, in either scheduler order."""
    class Wrapper:  # the shape of those wrappers: param_groups and step() forwarded
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        def step(self):
            self.optimizer.step()

    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = Wrapper(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 50.0 if s >= 9 else 1.0)
    with deadwatch.watch(net, reporters=[], optimizer=opt) as monitor:
        for _ in range(12):
            net(torch.ones(1, 2))
            opt.step()
            sched.step()
            monitor.step()
    assert monitor._lr_changes == [(1, (0.1,)), (10, (pytest.approx(5.0),))]


def test_an_optimizer_like_object_without_step_hooks_is_read_at_step():
    """Anything with param_groups is accepted as the optimizer; without step hooks its rates are read at
    monitor.step()."""
    class Plain:
        def __init__(self):
            self.param_groups = [{"lr": 0.1}]

    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    opt = Plain()
    with deadwatch.watch(net, reporters=[], optimizer=opt) as monitor:
        for step in range(1, 4):
            net(torch.ones(1, 2))
            opt.param_groups[0]["lr"] = 0.1 * step
            monitor.step()
    assert monitor._lr_changes == [(1, (0.1,)), (2, (0.2,)), (3, (pytest.approx(0.3),))]
