"""deadwatch against the brute-force reference (tests/reference.py) on models with planted dead units.

A bias of -1e4 kills a unit exactly; the reference counts every unit from plain
forward hooks, so dead_units, observations and zero_fraction are compared unit by
unit. No optimiser step runs: the weights (and so every activation) are the same
in the reference pass and in the deadwatch pass.
"""

from __future__ import annotations

import copy
import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import gelu as imported_gelu
from torch.utils.checkpoint import checkpoint

pytest.register_assert_rewrite("reference")
from reference import Fwd, Probe, check_report, compare, plant_dead, reference, run_watch  # noqa: E402
from planted import Affine  # noqa: E402

WINDOW = 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def batches(n_steps, *shape, scale=1.0):
    return [torch.randn(*shape) * scale for _ in range(n_steps)]


# ---- MLP ----------------------------------------------------------------------------------------

def make_mlp():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    plant_dead(m[0].bias, [2, 5])
    plant_dead(m[2].bias, [0, 7, 11])
    return m


def mlp_probes(m):
    return {"1": Probe(m[1]), "3": Probe(m[3])}


def test_mlp_planted_dead_units():
    m = make_mlp()
    report, refs = compare(m, batches(5, 4, 8), mlp_probes, window=WINDOW, count_subsample=1)
    # the planted units are among the dead ones (the reference sees them too)
    assert {2, 5} <= set(report.layer("1").dead_units)
    assert {0, 7, 11} <= set(report.layer("3").dead_units)
    assert report.layer("3").kind == "ReLU"


def test_mlp_several_forwards_per_step_and_every_step():
    """Gradient accumulation: two forwards of different batch sizes before each step()."""
    m = make_mlp()
    steps = [[torch.randn(3, 8), torch.randn(5, 8)] for _ in range(6)]
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, mlp_probes(twin))
    reports = run_watch(m, steps, window=WINDOW, every_step=True, count_subsample=1)
    for s, report in enumerate(reports, start=1):
        check_report(report, refs, WINDOW, steps=s, interval=(0, s))
    assert reports[-1].layer("1").observations == 6 * 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_mlp_dtypes(dtype):
    m = make_mlp().to(dtype)
    compare(m, [x.to(dtype) for x in batches(4, 4, 8)], mlp_probes, window=WINDOW, count_subsample=1)


def test_float64_values_beyond_float32_range():
    """float64 outputs that float32 cannot hold are still finite values: 1e39 fires and is not NaN/inf;
    1e-300 > 0 fires too."""
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU()).double()
    with torch.no_grad():
        m[0].weight[2:5] = 0.0
        m[0].bias[2:5] = torch.tensor([1e39, -1e4, 1e-300], dtype=torch.float64)
    report, _ = compare(m, [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)],
                        lambda t: {"1": Probe(t[1])}, window=WINDOW, count_subsample=1)
    layer = report.layer("1")
    assert layer.status != "nonfinite"
    assert 3 in layer.dead_units and 2 not in layer.dead_units and 4 not in layer.dead_units


def test_mlp_unbatched_input():
    """A 1-d output (unbatched input to nn.Linear) is either not a site at all, or a site whose
    units are its elements (dim 0) with figures that match the reference; never bogus figures."""
    m = nn.Sequential(nn.Linear(6, 10), nn.ReLU())
    plant_dead(m[0].bias, [1, 4])
    steps = batches(4, 6)
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {"1": Probe(twin[1], axis=0)})
    report = run_watch(m, steps, window=WINDOW, count_subsample=1)
    if report.layers:
        check_report(report, refs, WINDOW)


# ---- CNNs: channels are units -----------------------------------------------------------------

class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(6, 2)
        plant_dead(self.conv1.bias, [3])
        plant_dead(self.bn2.bias, [0, 4])  # after batch norm: its shift is the bias that counts

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act1(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def test_cnn_dead_channels():
    m = CNN()
    report, refs = compare(m, batches(4, 2, 3, 7, 7), lambda t: {"act1": Probe(t.act1), "act2": Probe(t.act2)},
                           window=WINDOW, count_subsample=1)
    assert report.layer("act1").units == 8 and report.layer("act1").observations == 4 * 2 * 7 * 7
    assert 3 in report.layer("act1").dead_units
    assert report.layer("act2").units == 6 and {0, 4} <= set(report.layer("act2").dead_units)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 10, 3)
        self.a1 = nn.ReLU()
        self.c2 = nn.Conv1d(10, 6, 3, padding=1)
        self.a2 = nn.ELU()
        plant_dead(self.c1.bias, [0, 9])
        plant_dead(self.c2.bias, [2])

    def forward(self, x):
        return self.a2(self.c2(self.a1(self.c1(x))))


def test_conv1d_channels():
    """(N, C, L): the channel dim is the unit axis, whatever L is (here L=20 > C and L=5 < C)."""
    m = Conv1dNet()
    steps = [torch.randn(2, 4, 20), torch.randn(3, 4, 5), torch.randn(2, 4, 20), torch.randn(1, 4, 12)]
    report, _ = compare(m, steps, lambda t: {"a1": Probe(t.a1), "a2": Probe(t.a2)}, window=WINDOW, count_subsample=1)
    assert report.layer("a1").units == 10 and {0, 9} <= set(report.layer("a1").dead_units)
    assert report.layer("a2").units == 6 and 2 in report.layer("a2").dead_units
    assert report.layer("a2").kind == "ELU"


def test_conv3d_channels():
    m = nn.Sequential(nn.Conv3d(2, 5, 3), nn.ReLU())
    plant_dead(m[0].bias, [1])
    compare(m, batches(3, 2, 2, 5, 6, 4), lambda t: {"1": Probe(t[1])}, window=WINDOW, count_subsample=1)


def test_conv1d_channels_first_seen_under_no_grad():
    """The first counted forward runs under no_grad (eval with count_eval): units are still channels."""
    m = Conv1dNet()
    steps = [Fwd((torch.randn(2, 4, 20),), train=False), torch.randn(2, 4, 20), torch.randn(2, 4, 20)]
    compare(m, steps, lambda t: {"a1": Probe(t.a1), "a2": Probe(t.a2)}, window=WINDOW, count_eval=True,
            count_subsample=1)



class MixedCNN(nn.Module):
    """Channels of a ReLU, a GELU and a Hardsigmoid; 1x1 maps last (where a channels-last and a contiguous
    tensor have the same strides)."""

    def __init__(self):
        super().__init__()
        self.c1, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.c2, self.gelu = nn.Conv2d(8, 6, 3), nn.GELU()
        self.c3, self.gate = nn.Conv2d(6, 5, 5), nn.Hardsigmoid()
        plant_dead(self.c1.bias, [3])
        plant_dead(self.c2.bias, [1])

    def forward(self, x):
        return self.gate(self.c3(self.gelu(self.c2(self.relu(self.c1(x)))))).flatten(1)


def mixed_probes(m):
    return {"relu": Probe(m.relu), "gelu": Probe(m.gelu), "gate": Probe(m.gate, threshold=0.5)}


def test_channels_last_maps_are_counted_exactly():
    """A channels-last map keeps its units innermost in memory; record() reduces it in one pass there (a split
    reduction reads it far slower). The counts stay the reference's, and match the contiguous model's."""
    m = MixedCNN().to(memory_format=torch.channels_last)
    steps = [x.to(memory_format=torch.channels_last) for x in batches(4, 16, 3, 7, 7)]
    assert m(steps[0]).shape == (16, 5) and m.relu(m.c1(steps[0])).stride(1) == 1  # really channels-last
    compare(m, steps, mixed_probes, window=WINDOW, count_subsample=1)
    contiguous = MixedCNN()
    contiguous.load_state_dict(m.state_dict())
    a = run_watch(m, steps, window=WINDOW)  # subsampled counts, |output| sums and near-a-bound counts
    b = run_watch(contiguous, [x.contiguous() for x in steps], window=WINDOW)
    for x, y in zip(a.layers, b.layers):
        assert (x.name, x.dead_units, x.observations, x.zero_fraction) == (y.name, y.dead_units, y.observations, y.zero_fraction)
        assert (x.dormant_units, x.saturated_units, x.rare_units) == (y.dormant_units, y.saturated_units, y.rare_units)
        assert np.array_equal(x.firing_rate, y.firing_rate)


# ---- (N, T, C) transformer block: units on the last dim ----------------------------------------

class Block(nn.Module):
    def __init__(self, d=16, hidden=40):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)
        plant_dead(self.fc1.bias, [0, 13, 39])

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        plant_dead(self.blocks[1].fc1.bias, [5])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_transformer_block_gelu_mlp():
    m = Transformer()
    # sequence lengths vary from step to step; T=16 == C on purpose in one step
    steps = [torch.randn(2, 7, 16), torch.randn(3, 16, 16), torch.randn(2, 5, 16), torch.randn(1, 9, 16)]
    report, _ = compare(m, steps, lambda t: {f"blocks.{i}.act": Probe(t.blocks[i].act, axis=-1) for i in range(2)},
                        window=WINDOW, count_subsample=1)
    assert [layer.name for layer in report.layers] == ["blocks.0.act", "blocks.1.act"]
    assert report.layer("blocks.0.act").units == 40
    assert report.layer("blocks.0.act").observations == 2 * 7 + 3 * 16 + 2 * 5 + 9
    assert {0, 13, 39} <= set(report.layer("blocks.0.act").dead_units)


def test_torch_transformer_encoder_layer_gelu():
    """nn.TransformerEncoderLayer(activation="gelu") calls F.gelu inside its forward: one site per layer."""
    d, ff = 16, 24
    m = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, ff, dropout=0.0, activation="gelu", batch_first=True),
                              2, enable_nested_tensor=False)
    plant_dead(m.layers[0].linear1.bias, [3])
    steps = batches(3, 2, 5, d)
    report, _ = compare(m, steps, lambda t: {f"layers.{i}.gelu#0": Probe(t.layers[i].linear1, axis=-1)
                                             for i in range(2)}, window=WINDOW, count_subsample=1)
    assert report.layer("layers.0.gelu#0").units == ff


# ---- gated SiLU MLP (LLaMA style) -----------------------------------------------------------------

class GatedMLP(nn.Module):
    def __init__(self, d=12, hidden=32):
        super().__init__()
        self.gate = nn.Linear(d, hidden)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.act = nn.SiLU()
        plant_dead(self.gate.bias, [1, 2, 30])

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


def test_gated_silu_mlp():
    m = nn.Sequential(GatedMLP(), GatedMLP())
    report, _ = compare(m, batches(4, 2, 6, 12), lambda t: {"0.act": Probe(t[0].act, axis=-1),
                                                            "1.act": Probe(t[1].act, axis=-1)}, window=WINDOW,
                        count_subsample=1)
    assert report.layer("0.act").units == 32 and report.layer("0.act").kind == "SiLU"
    assert {1, 2, 30} <= set(report.layer("1.act").dead_units)


# ---- a ReLU module called more than once per forward ---------------------------------------------

class BasicBlock(nn.Module):
    """torchvision's BasicBlock: self.relu runs twice."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        plant_dead(self.bn1.bias, [2])   # dead after the first call only

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def test_reused_relu_module_basic_block():
    m = BasicBlock()
    steps = [torch.randn(2, 6, 5, 5).abs() + 0.1 for _ in range(4)]  # identity path keeps relu#1 channel 2 alive
    report, _ = compare(m, steps, lambda t: {"relu#0": Probe(t.relu, call=0), "relu#1": Probe(t.relu, call=1)},
                        window=WINDOW, count_subsample=1)
    assert [layer.name for layer in report.layers] == ["relu#0", "relu#1"]
    assert 2 in report.layer("relu#0").dead_units
    assert 2 not in report.layer("relu#1").dead_units


class SharedAct(nn.Module):
    """One activation module used after layers of different widths."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.fc2 = nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, 2)
        self.act = nn.ReLU()
        plant_dead(self.fc2.bias, [6])

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def test_reused_activation_module_different_widths():
    m = nn.Sequential(SharedAct())
    report, _ = compare(m, batches(4, 3, 5), lambda t: {"0.act#0": Probe(t[0].act, call=0),
                                                       "0.act#1": Probe(t[0].act, call=1)}, window=WINDOW,
                        count_subsample=1)
    assert report.layer("0.act#0").units == 16 and report.layer("0.act#1").units == 8
    assert 6 in report.layer("0.act#1").dead_units


# ---- activation functions called inside forward ---------------------------------------------------

class FnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 14)
        self.fc2 = nn.Linear(14, 10)
        plant_dead(self.fc.bias, [4])
        plant_dead(self.fc2.bias, [0, 1])

    def forward(self, x):
        h = F.gelu(self.fc(x))
        return F.silu(self.fc2(h))


class FnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.block = FnBlock()
        self.fc3 = nn.Linear(10, 9)
        self.act = nn.ReLU()          # its own F.relu call is the module's site only
        self.fc4 = nn.Linear(9, 7)
        plant_dead(self.fc1.bias, [8])
        plant_dead(self.fc3.bias, [2])
        plant_dead(self.fc4.bias, [6])

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = self.block(x)
        x = self.act(torch.relu(self.fc3(x)))
        return self.fc4(x)


def fn_probes(t):
    return {
        "relu#0": Probe(t.fc1),
        "block.gelu#0": Probe(t.block.fc),
        "block.silu#0": Probe(t.block.fc2),
        "relu#1": Probe(t.fc3),
        "act": Probe(t.act),
    }


def test_functional_activations():
    m = FnNet()
    report, _ = compare(m, batches(4, 5, 6), fn_probes, window=WINDOW, count_subsample=1)
    assert [layer.name for layer in report.layers] == ["relu#0", "block.gelu#0", "block.silu#0", "relu#1", "act"]
    assert 8 in report.layer("relu#0").dead_units
    assert 4 in report.layer("block.gelu#0").dead_units
    assert {0, 1} <= set(report.layer("block.silu#0").dead_units)
    assert 2 in report.layer("relu#1").dead_units


def test_function_capture_off():
    m = FnNet()
    report = run_watch(m, batches(2, 5, 6), functions=[])
    assert [layer.name for layer in report.layers] == ["act"]


def test_function_capture_only_listed():
    m = FnNet()
    report = run_watch(m, batches(2, 5, 6), functions=["relu"])
    assert [layer.name for layer in report.layers] == ["relu#0", "relu#1", "act"]


class ImportedFn(nn.Module):
    """`from torch.nn.functional import gelu` at import time, then gelu(...) inside forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 9)
        plant_dead(self.fc.bias, [4])

    def forward(self, x):
        return imported_gelu(self.fc(x))


class PartialFn(ImportedFn):
    """A module that keeps functools.partial(F.gelu, approximate="tanh") and calls it in forward."""

    def __init__(self):
        super().__init__()
        self.act = functools.partial(F.gelu, approximate="tanh")

    def forward(self, x):
        return self.act(self.fc(x))


@pytest.mark.parametrize("make", [ImportedFn, PartialFn], ids=["imported_name", "partial"])
def test_function_imported_by_name(make):
    m = nn.Sequential(make())
    report, _ = compare(m, batches(3, 4, 6), lambda t: {"0.gelu#0": Probe(t[0].fc)}, window=WINDOW,
                        count_subsample=1)
    assert 4 in report.layer("0.gelu#0").dead_units


# ---- in-place ReLU --------------------------------------------------------------------------------

class InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(5, 9)
        self.fc2 = nn.Linear(9, 8)
        self.fc3 = nn.Linear(8, 7)
        plant_dead(self.conv.bias, [1])
        plant_dead(self.fc1.bias, [3])
        plant_dead(self.fc2.bias, [0])
        plant_dead(self.fc3.bias, [6])

    def forward(self, x):
        x = self.act(self.conv(x)).mean((2, 3))
        x = F.relu(self.fc1(x), inplace=True)
        x = torch.relu_(self.fc2(x))
        return F.relu_(self.fc3(x))


def test_inplace_relu():
    m = InplaceNet()
    # pre-activation probes: the hook copies the Linear/conv output before the in-place ReLU overwrites it
    report, _ = compare(m, batches(4, 3, 3, 6, 6), lambda t: {
        "act": Probe(t.conv), "relu#0": Probe(t.fc1), "relu#1": Probe(t.fc2), "relu#2": Probe(t.fc3)}, window=WINDOW,
        count_subsample=1)
    assert report.layer("act").dead_units[:1] == [1]
    assert report.layer("act").observations == 4 * 3 * 4 * 4


# ---- activation checkpointing ---------------------------------------------------------------------

class CkptMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 12)
        self.fc = nn.Linear(12, 12)
        self.act = nn.ReLU()
        self.fc_b = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 4)
        plant_dead(self.fc.bias, [3, 4])
        plant_dead(self.fc_b.bias, [9])
        self.ckpt = None

    def segment(self, x):
        return self.fc2(F.relu(self.fc_b(self.act(self.fc(x)))))

    def forward(self, x):
        x = self.stem(x)
        return self.segment(x) if self.ckpt is None else checkpoint(self.segment, x, use_reentrant=self.ckpt)


class CkptCNN(nn.Module):
    def __init__(self, conv=nn.Conv2d):
        super().__init__()
        self.stem = conv(3, 6, 3, padding=1)
        self.conv = conv(6, 7, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.proj = conv(7, 4, 1)
        plant_dead(self.conv.bias, [5])
        self.ckpt = None

    def segment(self, x):
        return self.proj(self.act(self.conv(x)))

    def forward(self, x):
        x = self.stem(x)
        return self.segment(x) if self.ckpt is None else checkpoint(self.segment, x, use_reentrant=self.ckpt)


class CkptConv1dHead(nn.Module):
    """Conv1d segment under checkpoint, and a Linear head whose out_features happens to equal L."""

    def __init__(self, length=18):
        super().__init__()
        self.stem = nn.Conv1d(4, 6, 3, padding=1)
        self.conv = nn.Conv1d(6, 10, 3)
        self.act = nn.ReLU()
        self.proj = nn.Conv1d(10, 10, 1)
        self.head = nn.Linear(10, length)
        plant_dead(self.conv.bias, [2])
        self.ckpt = None

    def segment(self, x):
        return self.proj(self.act(self.conv(x)))

    def forward(self, x):
        x = self.stem(x)
        h = self.segment(x) if self.ckpt is None else checkpoint(self.segment, x, use_reentrant=self.ckpt)
        return self.head(h.mean(2))


class CkptTransformer(Transformer):
    ckpt = None

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 16)   # so that the checkpointed blocks get an input that requires grad

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x) if self.ckpt is None else checkpoint(b, x, use_reentrant=self.ckpt)
        return x


CKPT_MODELS = {
    "mlp": (CkptMLP, lambda t: {"act": Probe(t.act), "relu#0": Probe(t.fc_b)}, (4, 6)),
    "conv2d": (CkptCNN, lambda t: {"act": Probe(t.act)}, (2, 3, 6, 6)),
    "conv1d": (lambda: CkptCNN(nn.Conv1d), lambda t: {"act": Probe(t.act)}, (2, 3, 20)),
    "conv1d_head": (CkptConv1dHead, lambda t: {"act": Probe(t.act)}, (2, 4, 20)),   # conv output L = 18
    "transformer": (CkptTransformer, lambda t: {f"blocks.{i}.act": Probe(t.blocks[i].act, axis=-1) for i in range(2)},
                    (2, 5, 16)),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("kind", list(CKPT_MODELS))
def test_activation_checkpointing_counts_once(kind, reentrant):
    make, probes_of, shape = CKPT_MODELS[kind]
    base = make()
    steps = batches(4, *shape)
    plain = copy.deepcopy(base)
    ckpt = copy.deepcopy(base)
    ckpt.ckpt = reentrant
    report_plain, refs = compare(plain, steps, probes_of, window=WINDOW, count_subsample=1)
    acts = [mod for mod in ckpt.modules() if isinstance(mod, (nn.ReLU, nn.GELU))]
    calls = []
    handles = [a.register_forward_hook(lambda *args: calls.append(1)) for a in acts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report_ckpt = run_watch(ckpt, steps, window=WINDOW, count_subsample=1)
    for h in handles:
        h.remove()
    assert len(calls) == 2 * len(acts) * len(steps)   # every activation really ran again in backward
    check_report(report_ckpt, refs, WINDOW)
    assert report_ckpt.to_dict() == report_plain.to_dict()


# ---- eval forwards ---------------------------------------------------------------------------------

def eval_steps():
    steps = []
    for s in range(4):
        steps.append([torch.randn(4, 8), Fwd((torch.randn(3, 8) * 1e5,), train=False)])
    return steps


def test_eval_forwards_excluded():
    m = make_mlp()
    report, _ = compare(m, eval_steps(), mlp_probes, window=WINDOW, count_subsample=1)
    assert report.layer("1").observations == 4 * 4


def test_eval_forwards_counted_with_count_eval():
    m = make_mlp()
    report, _ = compare(m, eval_steps(), mlp_probes, window=WINDOW, count_eval=True, count_subsample=1)
    assert report.layer("1").observations == 4 * 4 + 4 * 3


@pytest.mark.parametrize("count_eval", [False, True])
def test_eval_forwards_functional_and_multi_call(count_eval):
    """Function sites and a module called twice: eval forwards count only with count_eval, and an
    eval forward does not shift the call numbering of the training forwards."""
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.fn = FnNet()
            self.shared = SharedAct()

        def forward(self, x):
            return self.shared(self.fn(x)[:, :5])

    m = Both()
    steps = [[Fwd((torch.randn(2, 6) * 1e3,), train=False), torch.randn(4, 6)] for _ in range(3)]

    def probes(t):
        p = {f"fn.{k}": v for k, v in fn_probes(t.fn).items()}
        p["shared.act#0"] = Probe(t.shared.act, call=0)
        p["shared.act#1"] = Probe(t.shared.act, call=1)
        return p

    report, _ = compare(m, steps, probes, window=WINDOW, count_eval=count_eval, count_subsample=1)
    assert report.layer("fn.relu#0").observations == 3 * 4 + (3 * 2 if count_eval else 0)


def test_eval_only_model_has_no_sites():
    m = make_mlp()
    report = run_watch(m, [Fwd((torch.randn(2, 8),), train=False)] * 2)
    assert report.layers == []


# ---- NaN / inf ----------------------------------------------------------------------------------------

def test_nan_input_flagged_nonfinite():
    m = make_mlp()
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    steps = [torch.randn(4, 8), x, torch.randn(4, 8)]
    report, refs = compare(m, steps, mlp_probes, window=WINDOW, count_subsample=1)
    assert report.layer("1").status == "nonfinite" and report.layer("3").status == "nonfinite"
    assert report.flagged and {layer.name for layer in report.flagged} == {"1", "3"}


def test_nonfinite_units_never_fire_and_status_recovers():
    """Unit 9 gets one NaN (and positive values) in step 0, unit 10 one +inf: those unit-steps do not
    fire and count no fired values; once `window` clean steps pass the status is no longer nonfinite."""
    window = 2
    m = nn.Sequential(Affine(16), nn.ReLU())
    plant_dead(m[0].b, [2])
    x0 = torch.randn(5, 16)
    x0[:, 9] = x0[:, 10] = 1.0
    x0[0, 9] = float("nan")
    x0[3, 10] = float("inf")
    x1 = torch.randn(5, 16)
    x1[:, 9] = -1.0
    steps = [x0, x1, torch.randn(5, 16), torch.randn(5, 16)]
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {"1": Probe(twin[1])})
    reports = run_watch(m, steps, window=window, every_step=True, count_subsample=1)
    for s, report in enumerate(reports, start=1):
        check_report(report, refs, window, steps=s, interval=(0, s))
    assert reports[0].layer("1").status == "nonfinite"
    assert {2, 9, 10} <= set(reports[0].layer("1").dead_units)
    assert reports[0].layer("1").firing_rate[9] == 0 and reports[0].layer("1").firing_rate[10] == 0
    assert reports[1].layer("1").status == "nonfinite" and 9 in reports[1].layer("1").dead_units
    assert reports[2].layer("1").status != "nonfinite"


# ---- activations whose value at 0 is not 0 --------------------------------------------------------

class Thresholds(nn.Module):
    """Units with pre-activation: 0 always -5, 1 exactly 0, 2 always +0.1, 3.. mixed (random)."""

    def __init__(self, act, units=8):
        super().__init__()
        self.fc = nn.Linear(4, units)
        with torch.no_grad():
            self.fc.weight[:3] = 0.0
            self.fc.bias[:3] = torch.tensor([-5.0, 0.0, 0.1])
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


ACTS = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softplus": nn.Softplus, "softplus_beta2": lambda: nn.Softplus(beta=2.0),
    "hardsigmoid": nn.Hardsigmoid, "logsigmoid": nn.LogSigmoid, "selu": nn.SELU, "mish": nn.Mish, "elu": nn.ELU,
    "celu": nn.CELU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "prelu": nn.PReLU, "rrelu": nn.RReLU, "relu6": nn.ReLU6,
    "hardtanh": nn.Hardtanh, "hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU("tanh"),
    "softsign": nn.Softsign,
}


@pytest.mark.parametrize("act", [ACTS[k] for k in ACTS], ids=list(ACTS))
def test_threshold_is_value_at_zero(act):
    act = act()
    m = Thresholds(act)
    steps = batches(3, 5, 4)
    report, _ = compare(m, steps, lambda t: {"act": Probe(t.fc)}, window=WINDOW, count_subsample=1)
    layer = report.layer("act")
    assert layer.kind == type(act).__name__
    assert 0 in layer.dead_units and 1 in layer.dead_units and 2 not in layer.dead_units


class FnThresholds(nn.Module):
    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList([Thresholds(nn.Identity()).fc for _ in range(5)])

    def forward(self, x):
        a = torch.sigmoid(self.fcs[0](x))
        b = torch.tanh(self.fcs[1](x))
        c = F.softplus(self.fcs[2](x))
        d = F.softplus(self.fcs[3](x), beta=2.0)
        e = F.softplus(self.fcs[4](x), 2.0)       # beta given positionally
        return a + b + c + d + e


def test_threshold_functional():
    m = FnThresholds()
    probes = lambda t: {"sigmoid#0": Probe(t.fcs[0]), "tanh#0": Probe(t.fcs[1]), "softplus#0": Probe(t.fcs[2]),
                        "softplus#1": Probe(t.fcs[3]), "softplus#2": Probe(t.fcs[4])}
    report, _ = compare(m, batches(3, 5, 4), probes, window=WINDOW, functions=["sigmoid", "tanh", "softplus"],
                        count_subsample=1)
    for layer in report.layers:
        assert 2 not in layer.dead_units, layer.name
