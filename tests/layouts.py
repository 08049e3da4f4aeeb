"""Common layouts around an activation, with planted dead units, for the site map and recycling tests.

Each dead unit's pre-activation is -1e4 for every input (a bias of -1e4, or, without biases, a weight
of -1e4 on an input that is always 1), so its output and its gradient are exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
except ImportError:  # the HF layouts are skipped where they are used
    transformers = None


def conv_bn():
    """Conv2d(bias=False) -> BatchNorm2d -> ReLU -> Conv2d (torchvision style); channels 2, 6 dead (BN bias)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].bias[[2, 6]] = -1e4
    return net


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), bias=False as in LLaMA; units 0, 7 dead (input 0 is always 1)."""

    def __init__(self, functional=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False)
        self.down_proj = nn.Linear(24, 16, bias=False)
        self.act_fn = None if functional else nn.SiLU()
        with torch.no_grad():
            self.gate_proj.weight[[0, 7]] = 0.0
            self.gate_proj.weight[[0, 7], 0] = -1e4

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.act_fn is None else self.act_fn(gate)
        return self.down_proj(gate * self.up_proj(x))


def gated_inputs(n=64, seed=1):
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 1.0
    return x


class ActorCritic(nn.Module):
    """Two towers in one module, ReDo's setting: policy p1 -> ReLU -> pi, value v1 -> ReLU -> v. Registered
    so that a guess by registration order pairs the value tower with the policy head."""

    def __init__(self):
        super().__init__()
        self.p1, self.v1 = nn.Linear(16, 32), nn.Linear(16, 32)
        self.p_act, self.v_act = nn.ReLU(), nn.ReLU()
        self.pi, self.v = nn.Linear(32, 4), nn.Linear(32, 1)
        with torch.no_grad():
            self.p1.bias.fill_(0.5)
            self.v1.bias.fill_(0.5)
            self.v1.bias[[3, 9]] = -1e4

    def forward(self, x):
        return torch.cat([self.pi(self.p_act(self.p1(x))), self.v(self.v_act(self.v1(x)))], dim=-1)


class TwoHeads(nn.Module):
    """One activation read by two heads; units 1, 4 dead."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(16, 32), nn.ReLU()
        self.h1, self.h2 = nn.Linear(32, 3), nn.Linear(32, 2)
        with torch.no_grad():
            self.fc.bias.fill_(0.5)
            self.fc.bias[[1, 4]] = -1e4

    def forward(self, x):
        h = self.act(self.fc(x))
        return torch.cat([self.h1(h), self.h2(h)], dim=-1)


class Residual(nn.Module):
    """act(fc(x) + x): a residual add between the layer and the activation."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.bias[3] = -1e4

    def forward(self, x):
        return self.out(self.act(self.fc(x) + x))


VOCAB = 50


def gpt2():
    """The GPT-2 config of test_hf.py (one layer); units 5, 9 of the MLP dead."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, n_inner=24,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias[[5, 9]] = -1e4
    return model


def bert():
    """The BERT config of test_hf.py (one layer); units 0, 36 of the intermediate dead."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config)
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.bias[[0, 36]] = -1e4
    return model


def token_ids(batch=4, length=8, seed=3):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
