"""The map of the layers around each site (deadwatch/sitemap.py), read from the autograd graph of a real
forward: producers, norm, every consumer, the input site, coupling, and why a site cannot be mapped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.sitemap import SiteLayers

import layouts


class Net(nn.Module):
    """A model whose forward is `fn(self, x)`, with the given submodules."""

    def __init__(self, fn, **modules):
        super().__init__()
        for name, m in modules.items():
            setattr(self, name, m)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def site_layers(model, x, **kw):
    with deadwatch.watch(model, reporters=[], **kw) as monitor:
        model(x)
        monitor.step()
        return monitor.site_layers()


X = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))


def test_conv_batchnorm_relu_conv():
    got = site_layers(layouts.conv_bn(), torch.randn(2, 3, 8, 8))
    assert got == {"2": SiteLayers(producers=("0",), norm="1", consumers=("3",)),
                   "4": SiteLayers(producers=("3",), consumers=("7",), input_site="2", input_nonnegative=True)}


@pytest.mark.parametrize("functional", [False, True], ids=["SiLU module", "F.silu"])
def test_gated_mlp_has_two_producers(functional):
    got = site_layers(layouts.GatedMLP(functional), layouts.gated_inputs())
    site = "silu#0" if functional else "act_fn"
    assert got == {site: SiteLayers(producers=("gate_proj", "up_proj"), consumers=("down_proj",))}


def test_two_towers_each_find_their_own_head():
    got = site_layers(layouts.ActorCritic(), X)
    assert got == {"p_act": SiteLayers(producers=("p1",), consumers=("pi",)),
                   "v_act": SiteLayers(producers=("v1",), consumers=("v",))}


def test_every_consumer_is_found():
    assert site_layers(layouts.TwoHeads(), X) == {"act": SiteLayers(producers=("fc",), consumers=("h1", "h2"))}


def test_gpt2_and_bert():
    pytest.importorskip("transformers")
    got = site_layers(layouts.gpt2(), layouts.token_ids())
    mlp = "transformer.h.0.mlp"
    assert got == {f"{mlp}.act": SiteLayers(producers=(f"{mlp}.c_fc",), consumers=(f"{mlp}.c_proj",))}
    got = site_layers(layouts.bert(), layouts.token_ids())
    layer = "encoder.layer.0"
    assert got[f"{layer}.intermediate.intermediate_act_fn"] == SiteLayers(
        producers=(f"{layer}.intermediate.dense",), consumers=(f"{layer}.output.dense",))   # in another module
    assert got["pooler.activation"] == SiteLayers(
        producers=("pooler.dense",), why="the forward of the model returns it without a layer reading it")


def test_input_site_and_its_sign():
    net = Net(lambda s, x: s.c(s.gelu(s.b(s.relu(s.a(x))))), a=nn.Linear(16, 8), relu=nn.ReLU(), b=nn.Linear(8, 8),
              gelu=nn.GELU(), c=nn.Linear(8, 2))
    got = site_layers(net, X)
    assert got["gelu"] == SiteLayers(producers=("b",), consumers=("c",), input_site="relu", input_nonnegative=True)
    net = Net(lambda s, x: s.c(s.relu(s.b(s.gelu(s.a(x))))), a=nn.Linear(16, 8), relu=nn.ReLU(), b=nn.Linear(8, 8),
              gelu=nn.GELU(), c=nn.Linear(8, 2))
    assert site_layers(net, X)["relu"] == SiteLayers(producers=("b",), consumers=("c",), input_site="gelu")
    # an unwatched ReLU (a tensor method) and a softmax: not sites, but their outputs are >= 0
    for op in (torch.Tensor.relu, lambda t: t.softmax(-1)):
        net = Net(lambda s, x, op=op: s.c(s.act(s.b(op(s.a(x))))), a=nn.Linear(16, 8), b=nn.Linear(8, 8),
                  act=nn.Tanh(), c=nn.Linear(8, 2))
        assert site_layers(net, X)["act"] == SiteLayers(producers=("b",), consumers=("c",), input_nonnegative=True)


def test_shift_is_the_norm_bias_else_the_producer_bias_else_none():
    net = layouts.conv_bn()
    got = site_layers(net, torch.randn(2, 3, 8, 8))
    assert got["2"].shift(net) == (net[1].bias, "1.bias")      # the norm's, not the conv's (it has none)
    assert got["4"].shift(net) == (net[3].bias, "3.bias")
    mlp = layouts.GatedMLP()
    assert site_layers(mlp, layouts.gated_inputs())["act_fn"].shift(mlp) is None   # bias=False: none borrowed
    net = nn.Sequential(nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 2))
    assert site_layers(net, X)["2"].shift(net) is None


class Two(nn.Module):
    """A layer reading two tensors in one op: x + a * y."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(16))

    def forward(self, x, y):
        return torch.addcmul(x, self.a, y)


class TwoRMSNorm(Two):
    """The same, taken for a norm by its name."""


def _deep(s, x):
    h = s.fc(x)
    for _ in range(40):
        h = h.view(h.shape)
    return s.out(s.act(h))


def _residual_after(s, x):
    h = s.act(s.fc(x))
    return s.out(h + x)


def _concat(s, x):
    return s.out(torch.cat([s.act(s.fc(x)), x], dim=-1))


def _product(s, x):
    return s.out(s.act(s.fc(x)) * s.act2(s.fc2(x)))


def _twice(s, x):
    return s.out(s.act2(s.fc(s.act(s.fc(x)))))


@pytest.mark.parametrize("fn, modules, site, field, message", [
    (lambda s, x: s.out(s.act(s.fc(x) + x)), {}, "act", "coupled", "its input is a sum of tensors (a residual add)"),
    (_residual_after, {}, "act", "coupled", "its output is added to another tensor (a residual add)"),
    (_concat, {"out": nn.Linear(32, 2)}, "act", "coupled", "its output is concatenated with other tensors"),
    (lambda s, x: s.act(s.fc(x)), {}, "act", "why", "the forward of the model returns it without a layer reading it"),
    (lambda s, x: s.out(s.act(s.fc(x)).softmax(-1)), {}, "act", "why",
     "its output goes through a Softmax op before any layer reads it"),
    (lambda s, x: s.out(torch.ones(()) / s.act(s.fc(x))), {}, "act", "why",
     "its output goes through a Div op before any layer reads it"),
    (lambda s, x: s.out(s.norm(s.act(s.fc(x)))), {"norm": nn.BatchNorm1d(16)}, "act", "why",
     "'norm' (BatchNorm1d) reads it: only Linear, Conv and HF Conv1D layers are mapped"),
    (lambda s, x: s.out(s.act2(s.fc2(x)) + 0 * s.act(s.fc(x)).detach()), {"fc2": nn.Linear(16, 16),
     "act2": nn.ReLU()}, "act", "why", "its output does not reach what the forward of the model returned"),
    (_deep, {}, "act", "why", "no layer found near it in the autograd graph"),
    (_product, {"fc2": nn.Linear(16, 16), "act2": nn.Sigmoid()}, "act", "why",
     "it is multiplied by a tensor that is not one layer's output"),
    (lambda s, x: s.out(s.act(s.fc(x) * s.fc2(x))), {"fc2": nn.Linear(16, 16)}, "act", "why",
     "its input is a product of tensors that both need grad (a gate?)"),
    (lambda s, x: s.out(s.act(s.fc(x).softmax(-1))), {}, "act", "why", "no single layer feeds it (a Softmax op)"),
    (lambda s, x: s.out(s.act(s.n2(s.n1(s.fc(x))))), {"n1": nn.BatchNorm1d(16), "n2": nn.BatchNorm1d(16)}, "act",
     "why", "two norms between the layer and the activation"),
    (lambda s, x: s.out(s.act(x + s.p)), {"p": nn.Parameter(torch.zeros(16))}, "act", "coupled",
     "its input is a sum of tensors (a residual add)"),
    (lambda s, x: s.out(s.prelu(s.fc(x))), {"prelu": nn.PReLU()}, "prelu", "why",
     "the activation reads several tensors (a weight of its own?)"),
    (lambda s, x: s.out(s.act(s.norm(s.fc(x), s.fc2(x)))), {"fc2": nn.Linear(16, 16), "norm": TwoRMSNorm()}, "act", "why",
     "its norm reads several tensors"),
    (lambda s, x: s.out(s.act(s.lin(s.fc(x), s.fc2(x)))), {"fc2": nn.Linear(16, 16), "lin": Two()}, "act", "why",
     "its layer 'lin' reads several tensors"),
])
def test_what_cannot_be_mapped_says_why(fn, modules, site, field, message):
    modules = {"fc": nn.Linear(16, 16), "act": nn.ReLU(), "out": nn.Linear(16, 2), **modules}
    got = site_layers(Net(fn, **modules), X)[site]
    assert getattr(got, field) == message
    assert not got.consumers


def test_layers_used_twice_in_a_forward_are_repeated():
    net = Net(_twice, fc=nn.Linear(16, 16), act=nn.ReLU(), act2=nn.ReLU(), out=nn.Linear(16, 2))
    got = site_layers(net, X)
    assert got["act"] == SiteLayers(producers=("fc",), consumers=("fc",), repeated=("fc",))
    assert got["act2"] == SiteLayers(producers=("fc",), consumers=("out",), input_site="act", input_nonnegative=True,
                                     repeated=("fc",))


def test_without_a_graph_only_an_nn_sequential_tells_the_producer():
    net = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.0), nn.ReLU(), nn.Linear(8, 2))
    with deadwatch.watch(net, reporters=[]) as monitor:
        with torch.no_grad():
            net(X)
        monitor.step()
        got = monitor.site_layers()
    why = "it first ran without an autograd graph (under no_grad, or in a reentrant checkpoint)"
    assert got == {"3": SiteLayers(producers=("0",), norm="1", why=why)}
    assert got["3"].shift(net) == (net[1].bias, "1.bias")
    free = Net(lambda s, x: s.out(s.act(s.fc(x))), fc=nn.Linear(16, 16), act=nn.ReLU(), out=nn.Linear(16, 2))
    with torch.no_grad():
        assert site_layers(free, X) == {"act": SiteLayers(why=why)}   # no order to rely on: nothing guessed


class Checkpointed(nn.Module):
    """A block under a reentrant checkpoint: its forward runs without a graph, its recomputation with one."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc, self.act, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)

    def block(self, x):
        return F.gelu(self.act(self.fc(x)))

    def forward(self, x):
        return self.out(torch.utils.checkpoint.checkpoint(self.block, self.stem(x), use_reentrant=True))


def test_a_reentrant_checkpoint_tells_the_producer_when_it_recomputes():
    net = Checkpointed()
    with deadwatch.watch(net, reporters=[]) as monitor:
        net(X).sum().backward()
        monitor.step()
        got = monitor.site_layers()
    why = "it first ran without an autograd graph (under no_grad, or in a reentrant checkpoint)"
    assert got == {"act": SiteLayers(producers=("fc",), why=why), "gelu#0": SiteLayers(why=why)}
    assert got["act"].shift(net) == (net.fc.bias, "fc.bias")


class Extra(nn.Module):
    """An activation run by a method the loop calls outside the model's forward."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.out(x)

    def features(self, x):
        return F.relu(self.fc(x))


def test_a_site_outside_any_forward_says_why():
    net = Extra()
    with deadwatch.watch(net, reporters=[]) as monitor:
        net.features(X)
        monitor.step()
        got = monitor.site_layers()
    assert got["relu#0"] == SiteLayers(
        producers=("fc",), why="no forward of the model returned after it ran (an activation called outside the "
                               "model's forward?)")
    net = Extra()
    with deadwatch.watch(net, reporters=[]) as monitor:   # the next forward of the model reads it: mapped there
        net(net.features(X))
        monitor.step()
        assert monitor.site_layers()["relu#0"] == SiteLayers(producers=("fc",), consumers=("out",))


def test_graph_references_are_dropped_and_mapping_is_once():
    net = layouts.TwoHeads()
    with deadwatch.watch(net, reporters=[]) as monitor:
        net(X)
        assert not monitor._sitemap.pending     # mapped when the forward returned: no grad_fn kept
        first = monitor.site_layers()
        net(X)
        monitor.step()
        assert monitor.site_layers() == first


def test_a_graph_that_cannot_be_read_says_why(monkeypatch):
    from deadwatch import sitemap

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(sitemap, "_readers", broken)
    assert site_layers(layouts.TwoHeads(), X)["act"].why == "its autograd graph could not be read (boom)"
    monkeypatch.undo()
    monkeypatch.setattr(sitemap, "MAX_NODES", 3)
    assert site_layers(layouts.TwoHeads(), X)["act"].why == (
        "its autograd graph could not be read (the forward's autograd graph has more than 3 nodes)")
    assert sitemap.SiteMap(nn.Linear(2, 2)).get("act", {}) == SiteLayers(
        why="it has not been mapped (it never ran in an eager forward here)")
