"""No silent wrong answers in the corners: sites that did not run, names that change, padding, nothing
watched; the API that fits PyTorch (Monitor(...), reporter objects, load_state_dict's result); and
the guards that only a test keeps in place."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch import Monitor
from deadwatch.stats import EXACT_FLOAT32
from planted import Affine, make_net

SIZES, PLANTED = [6, 8, 5], {0: [1, 6], 1: [3]}


# ---- a site that did not run is not dead ------------------------------------------------------------

class Branchy(nn.Module):
    """A trunk that always runs and a head that runs only when asked (a multi-task head, an MoE expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.trunk_act = nn.Linear(4, 8), nn.ReLU()
        self.head, self.head_act = nn.Linear(8, 8), nn.ReLU()
        with torch.no_grad():
            self.head.weight.fill_(0.1)
            self.head.bias.fill_(1.0)       # every head unit fires whenever the head runs
            self.head.bias[5] = -1e4        # ... except unit 5: planted dead

    def forward(self, x, use_head):
        h = self.trunk_act(self.trunk(x))
        return self.head_act(self.head(h)) if use_head else h


def _run_branchy(taken, steps=10, window=5):
    torch.manual_seed(0)
    model = Branchy()
    reports = {}
    with deadwatch.watch(model, reporters=[], window=window, report_every=100) as monitor:
        for step in range(1, steps + 1):
            model(torch.randn(16, 4), use_head=taken(step))
            monitor.step()
            reports[step] = monitor.report()
    return reports


def test_branch_taken_once_is_idle_not_dead():
    reports = _run_branchy(lambda step: step == 1)
    head = reports[10].layer("head_act")
    assert head.status == "idle" and head.dead_fraction is None and head.dead_units == []
    assert head not in reports[10].flagged
    assert reports[5].layer("head_act").status == "critical"      # still in the window: judged
    assert reports[5].layer("head_act").dead_units == [5]
    assert reports[6].layer("head_act").status == "idle"          # window 5 holds steps 2..6 only
    assert reports[10].layer("trunk_act").status != "idle"


def test_branch_taken_rarely_is_judged_on_its_runs():
    reports = _run_branchy(lambda step: step % 3 == 0)
    for step in range(3, 11):
        head = reports[step].layer("head_act")
        assert head.status == "critical" and head.dead_units == [5], step  # a run of the site is in every window


def test_branch_never_taken_after_start_is_idle_after_the_window():
    reports = _run_branchy(lambda step: step <= 2, steps=12, window=4)
    # window 4: after step 5 it holds steps 2..5 (a run), after step 6 steps 3..6 (none)
    assert [reports[s].layer("head_act").status for s in (2, 5, 6, 7, 12)] == \
        ["critical", "critical", "idle", "idle", "idle"]
    assert reports[12].dead_fraction == reports[12].layer("trunk_act").dead_fraction  # idle units not counted


# ---- a site keeps its name -------------------------------------------------------------------------

class Growing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.act = nn.ReLU()
        self.twice = False

    def forward(self, x):
        h = self.act(self.fc(x))
        return self.act(h - 0.1) if self.twice else h


def test_a_site_keeps_its_name_when_its_module_runs_more_often_later():
    model = Growing()
    with deadwatch.watch(model, reporters=[], report_every=2) as monitor:
        for step in range(6):
            model.twice = step >= 3
            model(torch.randn(4, 3))
            monitor.step()
            if step == 1:
                assert [layer.name for layer in monitor.report().layers] == ["act"]
    assert [layer.name for layer in monitor.report().layers] == ["act", "act#1"]
    state = monitor.state_dict()
    assert sorted(state["sites"]) == ["act", "act#1"]


def test_a_module_called_twice_from_the_start_is_numbered():
    model = Growing()
    model.twice = True
    with deadwatch.watch(model, reporters=[]) as monitor:
        model(torch.randn(4, 3))
        monitor.step()
    assert [layer.name for layer in monitor.report().layers] == ["act#0", "act#1"]


# ---- padding is not data --------------------------------------------------------------------------------

def _padded_batch():
    """(N=2, T=4, C=3) inputs to Affine+ReLU: unit 2 fires only at padded positions."""
    x = torch.full((2, 4, 3), -1.0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    x[..., 0] = 1.0                              # unit 0 fires everywhere
    x[0, 1, 1] = 1.0                             # unit 1 fires at one real position
    x[0, 3, 2] = x[1, 2, 2] = 1.0                # unit 2 fires on padding only
    return x, mask


def test_mask_leaves_padding_out_of_counts_and_verdict():
    model = nn.Sequential(Affine(3), nn.ReLU())
    x, mask = _padded_batch()
    with deadwatch.watch(model, reporters=[], count_subsample=1) as monitor:
        monitor.mask(mask)
        model(x)
        model(x)                                 # the mask was for one forward: this one counts everything
        monitor.step()
    layer = monitor.report().layer("1")
    assert layer.observations == 5 + 8
    assert layer.dead_units == []                # the unmasked forward saw unit 2 fire
    with deadwatch.watch(model, reporters=[], count_subsample=1) as monitor:
        with monitor.mask(mask):
            for _ in range(2):
                model(x)
        monitor.step()
    layer = monitor.report().layer("1")
    assert layer.observations == 10
    assert layer.dead_units == [2]
    assert layer.firing_rate.tolist() == [1.0, 0.2, 0.0]


def test_mask_of_another_shape_is_ignored_and_the_hook_path_does_not_sync(monkeypatch):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with deadwatch.watch(model, reporters=[], count_subsample=1) as monitor:
        monitor.mask(torch.ones(7, 9))
        model(torch.randn(5, 3))
        monitor.step()
    assert monitor.report().layer("1").observations == 5


def test_mask_must_be_a_tensor():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with deadwatch.watch(model, reporters=[]) as monitor:
        with pytest.raises(TypeError, match="mask"):
            monitor.mask([[1, 0]])


# ---- nothing watched is said out loud ------------------------------------------------------------

def test_include_matching_nothing_warns_with_patterns_and_seen_sites():
    net = make_net(SIZES, PLANTED)
    with deadwatch.watch(net, reporters=[], include=["decoder"]) as monitor:
        net(torch.randn(2, 6))
        with pytest.warns(RuntimeWarning, match=r"include \['decoder'\].*act\.0, act\.1"):
            monitor.step()
        net(torch.randn(2, 6))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            monitor.step()                       # once only


class OwnActivation(nn.Module):
    def forward(self, x):
        return x * (x > 0)


class UnknownActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(3, 3), OwnActivation()

    def forward(self, x):
        return self.act(self.fc(x))


def test_a_model_without_visible_activations_warns():
    """An activation class of one's own, not named in activations.extra: nothing is watched, said once."""
    model = UnknownActivation()
    with deadwatch.watch(model, reporters=[]) as monitor:
        model(torch.randn(2, 3))
        with pytest.warns(RuntimeWarning, match=r"no activation .* the classes in activations\.extra"):
            monitor.step()


# ---- the API that fits PyTorch -----------------------------------------------------------------------

def test_monitor_is_constructible_like_watch():
    net = make_net(SIZES, PLANTED)
    with Monitor(net, {"window": 5}, reporters=[]) as monitor:
        net(torch.randn(64, 6))
        monitor.step()
    assert monitor.config.window == 5
    assert monitor.report().window == 5
    assert monitor.report().layer("act.0").dead_units == [1, 6]


class Collect:
    def __init__(self) -> None:
        self.reports, self.closed = [], 0

    def emit(self, report):
        self.reports.append(report)

    def close(self):
        self.closed += 1


def test_reporter_objects_receive_reports_and_are_closed():
    sink = Collect()
    net = make_net(SIZES, PLANTED)
    with deadwatch.watch(net, reporters=[sink], report_every=2) as monitor:
        for _ in range(5):
            net(torch.randn(64, 6))
            monitor.step()
    assert [r.step for r in sink.reports] == [2, 4, 5]
    assert sink.closed == 1
    assert isinstance(sink, deadwatch.reporters.Reporter)


def test_a_reporter_that_is_neither_a_name_nor_an_object_is_refused():
    with pytest.raises(deadwatch.ConfigError, match=r"emit\(report\) and close\(\)"):
        deadwatch.watch(nn.ReLU(), reporters=[object()])


def _trained_state():
    net = make_net(SIZES, PLANTED)
    with deadwatch.watch(net, reporters=[]) as monitor:
        net(torch.randn(8, 6))
        monitor.step()
    return monitor.state_dict()


def test_load_state_dict_returns_what_did_not_match():
    state = _trained_state()
    state["sites"]["gone"] = dict(state["sites"]["act.0"])
    net = make_net(SIZES, PLANTED)
    monitor = deadwatch.watch(net, reporters=[])
    net(torch.randn(8, 6))                       # act.0 and act.1 exist already
    result = monitor.load_state_dict(state, strict=False)
    assert result.unmatched == ["gone"] and result.new == []
    monitor.close()


def test_strict_load_raises_at_the_first_report_for_saved_sites_that_never_ran():
    state = _trained_state()
    state["sites"]["gone"] = dict(state["sites"]["act.0"])
    net = make_net(SIZES, PLANTED)
    monitor = deadwatch.watch(net, reporters=[])
    result = monitor.load_state_dict(state)
    assert sorted(result.unmatched) == ["act.0", "act.1", "gone"]   # nothing has run yet
    net(torch.randn(8, 6))
    monitor.step()
    with pytest.raises(deadwatch.DeadwatchError, match=r"'gone'.*strict=False"):
        monitor.report()
    monitor.report()                             # said once
    monitor.close()


def test_logdir_with_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    net = make_net(SIZES, PLANTED)
    with deadwatch.watch(net, logdir="~/runs/x", reporters=["jsonl"]) as monitor:
        net(torch.randn(8, 6))
        monitor.step()
    assert (tmp_path / "runs" / "x" / "deadwatch.jsonl").exists()
    assert not (tmp_path / "~").exists()
    assert monitor.logdir == os.path.join(str(tmp_path), "runs", "x")


# ---- guards that only a test keeps ----------------------------------------------------------------------

class Flaky(nn.Module):
    """Raises at the end of its first forward, after its activations ran: the loop retries."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.act = nn.ReLU()
        self.fail = True

    def forward(self, x):
        h = self.act(self.fc(x))
        if self.fail:
            self.fail = False
            raise RuntimeError("out of memory (simulated)")
        return h


def test_a_forward_that_raises_and_is_retried_keeps_the_site_names():
    """The root's forward hook is always called (always_call=True): without it the failed forward
    leaves the model 'inside a forward' and the retry's call becomes act#1."""
    model = Flaky()
    with deadwatch.watch(model, reporters=[], count_subsample=1) as monitor:
        with pytest.raises(RuntimeError):
            model(torch.randn(4, 3))
        model(torch.randn(4, 3))
        monitor.step()
    layers = monitor.report().layers
    assert [layer.name for layer in layers] == ["act"]
    assert layers[0].observations == 8


def test_an_output_of_another_width_is_skipped_with_a_warning():
    """The output-shape guard in record(): a site's counters are views into flat buffers, and an
    out= write of another shape would resize the view off the buffer."""
    act = nn.ReLU()
    model = nn.Sequential(act)
    with deadwatch.watch(model, reporters=[], count_subsample=1) as monitor:
        model(torch.ones(2, 4))
        monitor.step()
        with pytest.warns(RuntimeWarning, match=r"output shape \(2, 6\) does not have its 4 units"):
            model(torch.ones(2, 6))               # the first call of the step: written with out=
        model(-torch.ones(2, 4))
        monitor.step()
    layer = monitor.report().layer("0")
    assert layer.units == 4 and layer.dead_units == []
    assert layer.observations == 4 and layer.firing_rate.tolist() == [0.5] * 4


def test_counts_past_float32_exactness_stay_exact():
    """A second call in a step with 2**24 or more values per unit is summed in float64: a float32
    sum of that many ones is not exact (2**24 + 1 is not a float32)."""
    model = nn.Sequential(nn.ReLU())
    big = torch.ones(EXACT_FLOAT32 + 1, 1)
    with deadwatch.watch(model, reporters=[], count_subsample=1) as monitor:
        model(torch.ones(3, 1))                  # the step's first call
        model(big)                               # folded into it
        monitor.step()
    layer = monitor.report().layer("0")
    assert layer.observations == EXACT_FLOAT32 + 4
    assert layer.firing_rate.tolist() == [1.0]   # fired == observations exactly


@pytest.mark.parametrize("first_call_small", [False, True], ids=["one_call", "folded"])
def test_near_a_bound_counts_past_float32_exactness_stay_exact(first_call_small):
    """The near-a-bound count is a float64 sum too: with saturation.share 1, a sigmoid unit at its upper
    bound for all of 2**24 + 1 values is saturated only if every value is counted."""
    model = nn.Sequential(nn.Sigmoid())
    with deadwatch.watch(model, reporters=[], count_subsample=1, saturation={"share": 1.0}) as monitor:
        if first_call_small:
            model(torch.full((3, 1), 50.0))
        model(torch.full((EXACT_FLOAT32 + 1, 1), 50.0))
        monitor.step()
    layer = monitor.report().layer("0")
    assert layer.saturated_units == [0]
