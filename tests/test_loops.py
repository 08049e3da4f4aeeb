"""Loops that do not call the watched model's own forward: a Lightning training_step calls self.net(x),
a VAE loop model.encoder(x), gradient accumulation runs several micro-batches per step. Each must map to
the same sites as model(x), and only the watched model's activations count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.reporters import runlog
from planted import make_net, step_figures

SIZES, PLANTED = [6, 8, 5], {0: [1, 6], 1: [3]}


class Holder(nn.Module):
    """Like a LightningModule: the loop calls self.net, never Holder.forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net(SIZES, PLANTED)

    def forward(self, x):  # never called by these loops
        raise AssertionError("the loop calls the submodule")


def _micro_batches(seed=0, steps=6, micro=2, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, SIZES[0], generator=g) for _ in range(micro)] for _ in range(steps)]


def test_micro_batches_through_a_submodule_map_to_the_same_sites():
    holder, data = Holder(), _micro_batches()
    with deadwatch.watch(holder, reporters=[], window=100, report_every=100, count_subsample=1) as monitor:
        for micro_batches in data:
            for x in micro_batches:
                with torch.no_grad():
                    holder.net(x)
            monitor.step()
    report = monitor.report()
    assert [layer.name for layer in report.layers] == ["net.act.0", "net.act.1"]
    rows = sum(x.shape[0] for step in data for x in step)
    for i, layer in enumerate(report.layers):
        assert layer.observations == rows                       # every micro-batch counted
        assert layer.dead_units == sorted(PLANTED[i])
        fired = sum(step_figures(holder.net, x)[f"act.{i}"][0] for step in data for x in step)
        np.testing.assert_allclose(layer.firing_rate, fired / rows)


class FunctionalBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return F.relu(self.fc(x))


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = FunctionalBody()
        self.decoder = nn.Linear(6, 4)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_functional_activation_in_a_submodule_called_directly_is_counted():
    torch.manual_seed(0)
    vae = VAE()
    with torch.no_grad():
        vae.encoder.fc.bias[2] = -1e4
    with deadwatch.watch(vae, reporters=[], count_subsample=1) as monitor:
        for _ in range(3):
            for _ in range(2):                 # two micro-batches per step, through the encoder only
                vae.encoder(torch.randn(5, 4))
            monitor.step()
    report = monitor.report()
    assert [layer.name for layer in report.layers] == ["encoder.relu#0"]
    assert report.layers[0].dead_units == [2]
    assert report.layers[0].observations == 3 * 2 * 5


def test_whole_model_and_submodule_calls_share_sites():
    vae = VAE()
    with deadwatch.watch(vae, reporters=[], count_subsample=1) as monitor:
        vae(torch.randn(5, 4))
        vae.encoder(torch.randn(3, 4))
        monitor.step()
    layer = monitor.report().layer("encoder.relu#0")
    assert layer.observations == 8
    assert len(monitor.report().layers) == 1


class Other(nn.Module):
    """A model that is not part of the watched one, with a module and a functional activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Sigmoid()   # a class the watched model does not use

    def forward(self, x):
        return F.relu(self.act(self.fc(x)))


class Caller(nn.Module):
    def __init__(self, other: nn.Module) -> None:
        super().__init__()
        self.other = [other]      # held in a list: not a submodule
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc(self.other[0](x)))


def test_another_models_activations_are_not_counted():
    other = Other()
    caller = Caller(other)
    with deadwatch.watch(caller, reporters=[]) as monitor:
        caller(torch.randn(3, 4))
        monitor.step()
    assert [layer.name for layer in monitor.report().layers] == ["relu"]


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x)


class UsesForeignReLU(nn.Module):
    """Calls another model's nn.ReLU (whose forward calls F.relu): never a site of this model."""

    def __init__(self, foreign: nn.Module) -> None:
        super().__init__()
        self.foreign = [foreign]
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.gelu(self.fc(self.foreign[0](x)))


def test_relu_inside_a_foreign_activation_module_is_not_a_site():
    model = UsesForeignReLU(Inner())
    with deadwatch.watch(model, reporters=[]) as monitor:
        model(torch.randn(3, 4))
        monitor.step()
    assert [layer.name for layer in monitor.report().layers] == ["gelu#0"]


# ---- a monitor that never saw step() -------------------------------------------------------------

def test_forwards_without_step_warn_once_at_report_and_close():
    net = make_net(SIZES, PLANTED)
    monitor = deadwatch.watch(net, reporters=[])
    net(torch.randn(2, SIZES[0]))
    with pytest.warns(RuntimeWarning, match=r"no training step was completed.*monitor\.step\(\)"):
        monitor.report()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.report()                  # once only
        monitor.close()


def test_close_warns_when_no_step_was_completed():
    net = make_net(SIZES, PLANTED)
    monitor = deadwatch.watch(net, reporters=[])
    net(torch.randn(2, SIZES[0]))
    with pytest.warns(RuntimeWarning, match="no training step was completed"):
        monitor.close()


def test_no_warning_with_steps_or_without_forwards():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deadwatch.watch(make_net(SIZES, PLANTED), reporters=[]).close()    # never ran: nothing to say
        net = make_net(SIZES, PLANTED)
        with deadwatch.watch(net, reporters=[]) as monitor:
            net(torch.randn(2, SIZES[0]))
            monitor.step()


def test_close_with_an_error_writes_the_final_report_marked_with_it(tmp_path):
    net = make_net(SIZES, PLANTED)
    monitor = deadwatch.watch(net, logdir=tmp_path, reporters=["jsonl"], report_every=100)
    net(torch.randn(256, SIZES[0]))
    monitor.step()
    monitor.close(error=RuntimeError("boom"))
    log = runlog.read(str(tmp_path))
    assert [(r.step, r.error) for r in log.reports] == [(1, "RuntimeError: boom")]
    assert log.last.layer("act.0").dead_units == [1, 6]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_an_error_before_any_step_writes_no_report(tmp_path):
    net = make_net(SIZES, PLANTED)
    monitor = deadwatch.watch(net, logdir=tmp_path, reporters=["jsonl"])
    net(torch.randn(2, SIZES[0]))
    monitor.close(error=RuntimeError("boom"))
    assert (tmp_path / runlog.FILENAME).read_text() == ""   # nothing judged: nothing to write


# ---- a used logdir ------------------------------------------------------------------------------

def _run(logdir, planted, steps=4, load=None):
    net = make_net(SIZES, planted)
    with deadwatch.watch(net, logdir=logdir, reporters=["jsonl"], report_every=2, count_subsample=1) as monitor:
        if load is not None:
            monitor.load_state_dict(load)
        for _ in range(steps):
            net(torch.randn(3, SIZES[0]))
            monitor.step()
    return monitor


def test_summary_and_compare_show_the_latest_run_of_a_used_logdir(tmp_path, capsys):
    from deadwatch import cli

    _run(tmp_path / "a", {0: [1]})
    with pytest.warns(RuntimeWarning, match="already holds a run"):
        _run(tmp_path / "a", {0: [1, 2, 3]})
    assert cli.main(["summary", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "2 reports" in out.out                      # not 4: the first run's reports are not shown
    assert "holds 2 runs" in out.err and "latest only" in out.err
    assert cli.main(["summary", str(tmp_path / "a"), "--json"]) == 0
    assert __import__("json").loads(capsys.readouterr().out)["layers"][0]["dead_units"] == [1, 2, 3]


def test_a_resumed_run_is_marked_resumed_and_shown_whole(tmp_path, capsys):
    from deadwatch import cli

    first = _run(tmp_path, {0: [1]})
    state = first.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # resuming into the same logdir is what it is for
        _run(tmp_path, {0: [1]}, load=state)
    log = runlog.read(str(tmp_path))
    assert [h["resumed"] for h in log.headers] == [False, True]
    assert log.earlier_runs == 0 and len(log.latest().records) == 4
    assert cli.main(["summary", str(tmp_path)]) == 0
    assert "4 reports" in capsys.readouterr().out


def test_demo_starts_its_runs_afresh(tmp_path):
    from deadwatch import demo

    for _ in range(2):
        demo.run(str(tmp_path))
    for name in ("healthy", "dying"):
        log = runlog.read(str(tmp_path / name))
        assert len(log.headers) == 1 and log.earlier_runs == 0
        assert len([f for f in (tmp_path / name).iterdir() if f.name.startswith("events.out.tfevents")]) == 1
