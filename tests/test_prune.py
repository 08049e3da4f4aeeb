"""deadwatch.prune(): certified units removed with Torch-Pruning, the outputs kept, the parameters down by
exactly the removed units' share; sites that cannot be pruned alone skipped with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch

pytest.importorskip("torch_pruning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cnn():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))
    with torch.no_grad():
        net[1].weight[[1, 4]] = 0.0
        net[1].bias[[1, 4]] = -0.2
        net[3].weight[2] = 0.0
        net[3].bias[2] = -0.1
        for b in (net[1],):
            b.running_mean.uniform_(-1, 1)
            b.running_var.uniform_(0.5, 2)
    return net.eval()


def test_prune_certified_keeps_outputs_and_removes_the_share():
    net = cnn()
    x = torch.randn(4, 3, 8, 8)
    report = deadwatch.scan(net, [x])
    assert {l.name: l.certified_units for l in report.layers} == {"2": [1, 4], "4": [2]}
    before = copy.deepcopy(net.state_dict())
    result = deadwatch.prune(net, report, x)
    assert result.removed == {"2": [1, 4], "4": [2]} and result.skipped == {}
    # the share removed: 2 conv1 rows (3*9) + 2 BN channels (weight, bias) + conv2's 2 input columns (6*9),
    # 1 conv2 row (7*9 after the columns went, + bias) + the head's 36 columns per channel (4 outputs)
    removed = 2 * 27 + 2 * 2 + 2 * 6 * 9 + (6 * 9 + 1) + 36 * 4
    assert result.params_before - result.params_after == removed
    assert result.params_before == sum(p.numel() for p in net.parameters())
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
    assert result.macs_after < result.macs_before
    fresh = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        a, b = net(fresh), result.model(fresh)
    assert (a - b).abs().max() <= 1e-5 and result.max_difference <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())   # the model given is untouched
    assert result.model[0].out_channels == 6 and result.model[3].in_channels == 6


def test_prune_last_layer_columns_exact():
    """Removing a Linear's rows and the head's columns: the pruned model computes exactly the sums of the
    kept units (bitwise equal to the same ops on the kept rows and columns), within 1e-6 of the unpruned."""
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[0].weight[[0, 5]] = 0.0
        net[0].bias[[0, 5]] = -1.0
    x = torch.randn(6, 5)
    result = deadwatch.prune(net, {"1": [0, 5]}, x)
    assert result.params_before - result.params_after == 2 * (5 + 1) + 2 * 3
    keep = [1, 2, 3, 4, 6, 7]
    fresh = torch.randn(32, 5)
    with torch.no_grad():
        h = F.relu(F.linear(fresh, net[0].weight[keep], net[0].bias[keep]))
        by_hand = F.linear(h, net[2].weight[:, keep], net[2].bias)
        out, small = net(fresh), result.model(fresh)
    assert torch.equal(small, by_hand)
    assert (out - small).abs().max() <= 1e-6


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return self.head(F.relu(self.b2(self.c2(h)) + h).mean((2, 3)))


def test_prune_skips_residual_and_output_sites_with_reasons():
    net = Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    result = deadwatch.prune(net, {"relu#0": [1], "relu#1": [2], "nowhere": [0]}, x)
    assert result.removed == {}
    assert result.skipped["relu#0"] == "its output is added to another tensor (a residual add)"
    assert result.skipped["relu#1"] == "its input is a sum of tensors (a residual add)"
    assert "no such site" in result.skipped["nowhere"]
    assert result.params_after == result.params_before and result.max_difference == 0.0


def test_prune_group_guards():
    """The Torch-Pruning group itself is checked: a channel shared with another producer, units that are the
    model's output, every unit of a layer."""
    from deadwatch import pruning
    from test_certify import around
    import torch_pruning as tp

    net = Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=(x,))
    _, why = pruning._group(tp, graph, net, around(("c1",), "b1"), [1])
    assert "shared with ['b2', 'c2']" in why
    out = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()
    graph = tp.DependencyGraph().build_dependency(out, example_inputs=(torch.randn(2, 3),))
    _, why = pruning._group(tp, graph, out, around(("0",)), [1])
    assert why == "no layer reads its units (they are the model's output)"
    _, why = pruning._group(tp, graph, out, around(("0",)), [0, 1, 2, 3])
    assert "every unit of the site is dead" in why
    odd = nn.Sequential(nn.ConvTranspose2d(2, 2, 3))
    why = pruning._unprunable("s", {"s": around(("0",))}, odd)
    assert "is a ConvTranspose2d, not a Linear or Conv" in why
    why = pruning._unprunable("s", {"s": around(("0", "1"))}, odd)
    assert "several layers" in why
    why = pruning._unprunable("s", {"s": around((), why="it first ran without an autograd graph")}, odd)
    assert why == "its layers are not known: it first ran without an autograd graph"
    why = pruning._unprunable("s", {"s": around(("0",), why="partial")}, odd)
    assert why == "its layers are not known: partial"
    why = pruning._unprunable("s", {"s": around(("0",), repeated=("0",))}, odd)
    assert why == "['0'] are used more than once per forward (shared or tied weights)"
    chain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    graph = tp.DependencyGraph().build_dependency(chain, example_inputs=(torch.randn(2, 3),))
    group, why = pruning._group(tp, graph, chain, around(("0",), consumers=("2",)), [1])
    assert why is None and group is not None
    _, why = pruning._group(tp, graph, chain, around(("0",), consumers=("elsewhere",)), [1])
    assert why == "Torch-Pruning finds ['2'] reading its units, the site map ['elsewhere']"


def test_prune_select_dead_warns_and_bad_arguments():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        net[0].bias[3] = -100.0   # dead on the data, not certified
    x = torch.randn(8, 4)
    report = deadwatch.scan(net, [x])
    assert report.layers[0].dead_units == [3] and report.layers[0].certified_units == []
    assert deadwatch.prune(net, report, x).removed == {}
    with pytest.warns(RuntimeWarning, match="answers may differ"):
        result = deadwatch.prune(net, report, x, select="dead")
    assert result.removed == {"1": [3]}
    with pytest.raises(ValueError, match="select"):
        deadwatch.prune(net, report, x, select="dormant")
    with pytest.raises(TypeError, match="a Report or a mapping"):
        deadwatch.prune(net, [1, 2], x)


def test_prune_hf_conv1d_skipped():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2Model(config).eval()
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[:, 3] = 0.0
        model.h[0].mlp.c_fc.bias[3] = -1.0
    ids = torch.randint(0, 50, (2, 8))
    report = deadwatch.scan(model, [{"input_ids": ids}])
    layer = report.layer("h.0.mlp.act")
    assert layer.certified_units == [3]
    result = deadwatch.prune(model, report, {"input_ids": ids})
    assert "no rule for Hugging Face's Conv1D" in result.skipped["h.0.mlp.act"]


def test_missing_torch_pruning_message(monkeypatch):
    import sys

    from deadwatch import pruning

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(deadwatch.DeadwatchError, match=r"pip install 'deadwatch\[prune\]'"):
        pruning._torch_pruning()


def test_prune_bert_linear_units():
    """BERT (ReLU intermediate): Torch-Pruning's trace of the model; the units are removed or the result says
    why not."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, hidden_act="relu",
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight[[2, 7]] = 0.0
        model.encoder.layer[0].intermediate.dense.bias[[2, 7]] = -0.5
    ids = {"input_ids": torch.randint(0, 50, (2, 8))}
    report = deadwatch.scan(model, [ids])
    site = "encoder.layer.0.intermediate.intermediate_act_fn"
    assert report.layer(site).certified_units == [2, 7]
    result = deadwatch.prune(model, report, ids)
    print(result.skipped)
    assert result.removed == {site: [2, 7]}
    assert result.params_before - result.params_after == 2 * (16 + 1) + 2 * 16
    assert result.max_difference <= 1e-5


def test_prune_untraceable_model_skips_every_site(monkeypatch):
    import torch_pruning as tp

    def fails(*args, **kwargs):
        raise TypeError("an op it does not know")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    result = deadwatch.prune(net, {"1": [0]}, torch.randn(2, 5))
    assert result.removed == {} and result.skipped == {
        "1": "Torch-Pruning could not trace the model (TypeError: an op it does not know)"}
