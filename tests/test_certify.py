"""Certificates on planted models: the certified units are exactly the planted provable set (checked
against a brute-force pass over many random inputs), units dead only on the data are not certified, a
residual channel is never certified, and during training the optimizer decides (with the reason)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch import certify
from deadwatch.analysis import LayerReport, Report
from deadwatch.sitemap import SiteLayers


def around(producers, norm=None, nonneg=False, why=None, **fields):
    """The site map's entry for a site, as the rules read it."""
    return SiteLayers(producers=producers, norm=norm, input_nonnegative=nonneg, why=why, **fields)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class BNNet(nn.Module):
    """conv -> bn -> relu -> conv -> bn -> relu (+ residual: relu(bn3(conv3(h)) + h)) -> head."""

    def __init__(self, residual=True):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.residual = residual
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        z = self.b2(self.c2(h))
        h = F.relu(z + h) if self.residual else F.relu(z)
        return self.head(h.mean((2, 3)))


def plant_bn(net):
    """b1: 1, 3 scale 0 with shift <= 0 (provable), 5 scale 1e-30 shift -0.1 (dead on data, not provable), 6
    scale 0 shift +0.1 (fires); b2: 2 scale 0 shift 0 -- in a residual block, where it fires via the skip."""
    with torch.no_grad():
        net.b1.weight[[1, 3]] = 0.0
        net.b1.bias[1], net.b1.bias[3] = -0.3, 0.0
        net.b1.weight[5], net.b1.bias[5] = 1e-30, -0.1
        net.b1.weight[6], net.b1.bias[6] = 0.0, 0.1
        net.b2.weight[2], net.b2.bias[2] = 0.0, 0.0
        for b in (net.b1, net.b2):   # eval mode proofs read running statistics: arbitrary finite ones
            b.running_mean.uniform_(-1, 1)
            b.running_var.uniform_(0.5, 2)
    return net


def brute_zero(net, site_inputs=200):
    """Per site name: units whose output was exactly 0 on every one of many random inputs (hooks)."""
    outs = {}
    x = torch.randn(site_inputs, 3, 6, 6) * 3
    with torch.no_grad():
        h1 = F.relu(net.b1(net.c1(x)))
        z = net.b2(net.c2(h1))
        h2 = F.relu(z + h1) if net.residual else F.relu(z)
    for name, h in (("relu#0", h1), ("relu#1", h2)):
        outs[name] = sorted((h.transpose(0, 1).flatten(1) == 0).all(1).nonzero().flatten().tolist())
    return outs


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_planted_set_exactly(mode):
    net = plant_bn(BNNet(residual=True))
    net.train(mode == "train")
    report = deadwatch.scan(net, [torch.randn(16, 3, 6, 6) for _ in range(3)], functions=["relu"])
    got = {layer.name: (layer.dead_units, layer.certified_units) for layer in report.layers}
    assert got["relu#0"] == ([1, 3, 5], [1, 3])       # 5: tiny nonzero scale, dead on the data only
    assert got["relu#1"][1] == []                     # the residual channel is never certified
    assert 2 not in got["relu#1"][0]                  # ... it fires through the skip connection
    brute = brute_zero(net)
    assert set(got["relu#0"][1]) <= set(brute["relu#0"])   # what is certified is zero on every input tried


def test_scan_changes_nothing():
    net = plant_bn(BNNet()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.requires_grad for p in net.parameters()]
    deadwatch.scan(net, [torch.randn(8, 3, 6, 6) for _ in range(2)], functions=["relu"])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # running stats restored too
    assert [p.requires_grad for p in net.parameters()] == grads
    assert net.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_scan_counts_every_forward_and_batch_forms():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 4)
    report = deadwatch.scan(net, [x, (x, torch.zeros(5)), [x]])
    assert report.step == 3 and report.layers[0].observations > 0
    with pytest.raises(deadwatch.DeadwatchError, match="a batch must be"):
        deadwatch.scan(net, [3])
    with pytest.raises(deadwatch.DeadwatchError, match="yielded no batch"):
        deadwatch.scan(net, [])
    net[0].requires_grad_(False)
    with pytest.raises(RuntimeError):                  # the first forward fails: the model is still restored
        deadwatch.scan(net, [torch.randn(5, 3)])
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]
    assert not any(m._forward_hooks for m in net.modules())


def mlp_planted():
    """fc0 reads the raw input, fc1 reads relu(fc0): rows planted in both."""
    net = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        fc0, fc1 = net[0], net[2]
        fc0.weight[2], fc0.bias[2] = 0.0, -0.5     # zero row, bias < 0: provable
        fc0.weight[4], fc0.bias[4] = 0.0, 0.0      # zero row, bias 0: provable
        fc0.weight[6], fc0.bias[6] = 0.0, 0.1      # zero row, bias > 0: fires
        fc0.bias[7] = -100.0                       # dead on the data only
        fc0.weight[8] = -fc0.weight[8].abs()       # non-positive row, but its input is not provably >= 0
        fc0.bias[8] = -0.1
        fc1.weight[3] = -fc1.weight[3].abs()       # non-positive row on relu outputs: provable
        fc1.bias[3] = -0.01
        fc1.weight[5] = -fc1.weight[5].abs()       # non-positive row, positive bias: fires
        fc1.bias[5] = 0.5
        fc1.weight[6, 0] = float("inf")            # not finite: proves nothing
        fc1.weight[6, 1:] = -1.0
        fc1.bias[6] = -1.0
    return net


def test_linear_planted_set_exactly():
    net = mlp_planted().eval()
    data = [torch.randn(32, 5).abs() for _ in range(3)]   # inputs >= 0: fc0's row 8 is dead on them
    report = deadwatch.scan(net, data)
    got = {layer.name: (layer.dead_units, layer.certified_units) for layer in report.layers}
    assert got["1"] == ([2, 4, 7, 8], [2, 4])
    assert got["3"][1] == [3]
    assert 3 in got["3"][0]


def test_certified_only_where_the_activation_zeroes_and_blocks_gradients():
    net = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        net[0].weight[1], net[0].bias[1] = 0.0, -1.0
    layer = deadwatch.scan(net, [torch.randn(8, 4)]).layers[0]
    assert layer.dead_units == [1] and layer.certified_units == []   # GELU(-1) != 0: not certifiable


# -- the rules on explicit inputs
def conv_bn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())


def test_prove_norm_rules():
    m = conv_bn().eval()
    with torch.no_grad():
        m[1].weight[[0, 1, 2, 3]] = 0.0
        m[1].bias[[0, 1, 2]] = -0.5
        m[1].bias[3] = 0.5                              # scale 0, shift > 0: it outputs 0.5, fires
        m[1].running_var[1] = -1.0                      # var + eps < 0: eval output is NaN, not the shift
        m[1].running_mean[2] = float("nan")
    layers = around(("0",), "1")
    assert certify.prove(m, layers, 4).units == [0]
    m.train()                                           # batch statistics: the running ones do not matter
    assert certify.prove(m, layers, 4).units == [0, 1, 2]


def test_prove_refuses_unknown_layouts():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU())
    with torch.no_grad():
        m[1].weight.zero_()
        m[1].bias.fill_(-1.0)
    assert certify.prove(m, around(("0",), "1"), 4) is None      # LayerNorm mixes units
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.ReLU())
    assert certify.prove(bn, around(("0",), "1"), 4) is None     # no affine scale
    lin = nn.Sequential(nn.Linear(3, 4))
    with torch.no_grad():
        lin[0].weight.zero_()
        lin[0].bias.fill_(-1.0)
    assert certify.prove(lin, around(("0",)), 4).units == [0, 1, 2, 3]
    assert certify.prove(lin, around(("0",)), 5) is None   # units do not match
    assert certify.prove(lin, around((), why="a residual add"), 4) is None
    assert certify.prove(lin, around(("0",), why="why"), 4) is None
    meta = nn.Sequential(nn.Linear(3, 4, device="meta"))
    assert certify.prove(meta, around(("0",)), 4) is None  # not materialised


def test_prove_nonnegative_rule_needs_nonnegative_inputs():
    lin = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 1.0, 0.0]]))
        lin[0].bias.fill_(-0.1)
    assert certify.prove(lin, around(("0",), nonneg=True), 2).units == [0]
    assert certify.prove(lin, around(("0",)), 2).units == []
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[-float("inf"), -1.0, 0.0], [0.0, 0.0, 0.0]]))  # -inf * 0 is NaN
        lin[0].bias.copy_(torch.tensor([-1.0, 0.5]))                                    # zero row, bias > 0
    assert certify.prove(lin, around(("0",), nonneg=True), 2).units == []


def test_hf_conv1d_rows():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(6, 3)   # weight (3, 6): unit u is column u
    holder = nn.Sequential(conv)
    with torch.no_grad():
        conv.weight[:, 4] = 0.0
        conv.bias[4] = -1.0
    assert certify.prove(holder, around(("0",)), 6).units == [4]


def test_annotate_requires_dead_on_the_data():
    lin = nn.Sequential(nn.Linear(3, 4))
    with torch.no_grad():
        lin[0].weight[[0, 1]] = 0.0
        lin[0].bias[[0, 1]] = -1.0
    layer = LayerReport("s", "ReLU", 4, [1], 0.25, 0.5, 10, "warn")
    certify.annotate(Report(1, 1, [layer]), lin, {"s": around(("0",))}, {"s": "ReLU"})
    assert layer.certified_units == [1]       # 0 is proved but was not dead on the forwards seen: not certified


# -- training: the optimizer decides
def train_bn(optimizer_fn, steps=3, plant_after=0, shift=-1e-3, last_update=True):
    """Conv -> BN -> ReLU trained; BN channel 1 zeroed (scale 0, shift `shift`) after `plant_after` steps;
    without `last_update` the last step's gradients are not applied (the report sees the zeroed channel
    with the optimizer's state from the steps before)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2))
    opt = optimizer_fn(net.parameters())
    x = torch.randn(8, 3, 6, 6)
    with deadwatch.watch(net, reporters=[], optimizer=opt, window=1) as mon:
        for step in range(steps):
            if step == plant_after:
                with torch.no_grad():
                    net[1].weight[1], net[1].bias[1] = 0.0, shift
            net(x).pow(2).mean().backward()
            if last_update or step < steps - 1:
                opt.step()
            opt.zero_grad()
            mon.step()
        return net, opt, mon.report().layers[0]


def test_training_sgd_without_momentum_certifies():
    _, _, layer = train_bn(lambda p: torch.optim.SGD(p, lr=0.1))
    assert layer.certified_units == [1] and layer.certify_note is None
    _, _, layer = train_bn(lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1))   # decay keeps the sign
    assert layer.certified_units == [1]
    _, _, layer = train_bn(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1))  # decoupled: the same
    assert layer.certified_units == [1]
    _, _, layer = train_bn(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))  # zeroed from the start: no state
    assert layer.certified_units == [1]


def test_training_momentum_state_refuses_and_would_revive():
    net, opt, layer = train_bn(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), steps=4, plant_after=3,
                               last_update=False)
    assert layer.dead_units == [1] and layer.certified_units == []
    assert "nonzero momentum_buffer for 1.weight" in layer.certify_note
    net(torch.randn(8, 3, 6, 6)).pow(2).mean().backward()
    assert float(net[1].weight.grad[1]) == 0.0 and float(net[1].bias.grad[1]) == 0.0   # no gradient ...
    opt.step()                      # ... yet the refusal is right: the momentum alone moves the zeroed scale
    assert float(net[1].weight.detach()[1]) != 0.0


def test_training_adam_coupled_decay_refuses_and_would_revive():
    adam = lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)  # noqa: E731
    net, _, layer = train_bn(adam, steps=2, shift=-0.03, last_update=False)
    assert layer.certified_units == [] and "coupled weight decay" in layer.certify_note
    opt = adam(net.parameters())     # the refusal is right: a few more steps lift the shift above 0
    x = torch.randn(8, 3, 6, 6)
    for _ in range(3):
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert float(net[1].bias.detach()[1]) > 0 and float(net[1].weight.detach()[1]) == 0.0


def test_training_without_optimizer_says_so():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].weight[2], net[0].bias[2] = 0.0, -1.0
    with deadwatch.watch(net, reporters=[], window=1) as mon:
        net(torch.randn(4, 3)).sum().backward()
        mon.step()
        layer = mon.report().layers[0]
    assert layer.certified_units == [] and "no optimizer was given" in layer.certify_note


def entries(param, units=(0,)):
    return [certify.Entry("p", param, 0, list(units))]


def test_revivable_rules():
    p = nn.Parameter(torch.tensor([-0.5, 0.0]))
    assert certify.revivable(torch.optim.SGD([p], lr=0.1), entries(p)) is None
    assert "cover SGD and Adam" in certify.revivable(torch.optim.RMSprop([p], lr=0.1), entries(p))
    assert "momentum with weight decay" in certify.revivable(
        torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1), entries(p))
    assert "flips the sign" in certify.revivable(torch.optim.SGD([p], lr=2.0, weight_decay=1.0), entries(p))
    assert certify.revivable(torch.optim.SGD([p], lr=2.0, weight_decay=1.0), entries(p, [1])) is None  # at 0
    assert "coupled weight decay" in certify.revivable(torch.optim.Adam([p], lr=0.1, weight_decay=0.1), entries(p))
    assert certify.revivable(torch.optim.Adam([p], lr=0.1, weight_decay=0.1, decoupled_weight_decay=True),
                             entries(p)) is None
    opt = torch.optim.Adam([p], lr=0.1)
    opt.state[p] = {"exp_avg": torch.tensor([0.0, 1.0]), "exp_avg_sq": torch.tensor([1.0, 1.0])}
    assert certify.revivable(opt, entries(p)) is None          # exp_avg is 0 for unit 0: no step
    assert "nonzero exp_avg" in certify.revivable(opt, entries(p, [1]))
    other = nn.Parameter(torch.zeros(2))
    assert certify.revivable(torch.optim.RMSprop([other], lr=0.1), entries(p)) is None   # p is not trained by it


def test_certified_shown_everywhere(tmp_path):
    from io import StringIO

    from rich.console import Console

    from deadwatch import cli
    from deadwatch.reporters import runlog, tensorboard
    from deadwatch.reporters.console import render

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].weight[2], net[0].bias[2] = 0.0, -1.0
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with deadwatch.watch(net, logdir=tmp_path, reporters=["jsonl"], optimizer=opt, window=1) as mon:
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        mon.step()
        report = mon.report()
    line = "0: 1 certified (dead for every input, cannot recover): 2"
    console = Console(file=StringIO(), width=200, color_system=None)
    console.print(render(report))
    assert line.replace("0:", "1:") in console.file.getvalue()
    assert runlog.read(str(tmp_path)).last.layers[0].certified_units == [2]
    assert "**1**: 1 certified (dead for every input, cannot recover): 2" in tensorboard.markdown(report)
    out = StringIO()
    console = Console(file=out, width=200, color_system=None)
    log = runlog.read(str(tmp_path))
    console.print(cli.summary_view(log, log.last))
    assert "1: 1 certified (dead for every input, cannot recover): 2" in out.getvalue()
