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
    assert layer.hint.startswith("lr_spike (learning rate x200 at step 30")


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
    assert cli.main(["summary", str(tmp_path)]) == 0
    assert "dead_from_start (" in capsys.readouterr().out


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
