"""Training-step overhead of deadwatch at defaults (reporters off), paired against plain steps.

A plain, a watched, a no-op-hooked, a one-amax, a naively counted and a second plain copy of each model live in
one process; their steps (forward, backward, SGD step) run in rounds, each copy once a round, rotating which
goes first, and each copy's step is divided by the plain step of the same round: whole-run timings on a shared
machine drift by more than the effect, and so do the medians of each copy's own steps (see Timed.ratio).
Every activation site is watched, the functional GELU included.

    python benchmarks/overhead.py [--steps 200] [--rounds 1] [--threads 1] [--models mlp,cnn,transformer]
    python benchmarks/overhead.py --models mobilenet,resnet18 --steps 100
    python benchmarks/overhead.py --models mobilenet,convnext,vit --steps 100
    python benchmarks/overhead.py --compile [--models mha] [--no-fullgraph]
    python benchmarks/overhead.py --update-every 0     # without the update-size measurements (large_update)
    python benchmarks/overhead.py --boundaries --models vit,convnext,mobilenet   # pruned boundary hooks' saving
    python benchmarks/overhead.py --cold-start --models mobilenet   # the first steps with an empty build cache
    python benchmarks/overhead.py --no-fused   # the eager ops at every site, to time the fused pass apart

Columns: sites watched; plain and watched medians; ratio = watched/plain (the median over rounds of the
watched step over the plain step of its round; the other copies' columns likewise) and +ms = (ratio - 1) x the
plain median; a/a = the second plain copy against the first, the run's own error (identical copies: any
distance from 1.000 is noise or the copies' placement in memory, and a ratio means little closer to 1 than
that); hooks =
activation modules given a bare no-op forward hook and noop = that copy's time/plain, the floor any
per-module hook pays (a functional activation has no module: the transformer's F.gelu is not in
it); naive = a hand-written hook counting (out > 0) per unit in three passes, time/plain; upd% = the
update-size measurement's mean time per step (it runs on 2 steps of 20, which medians hide), as a
percentage of the plain step; rec% = the time inside deadwatch's record() (the hooks' counting) per step and
amax% = the time inside the amax copy's hooks per step, each the median over the steps after the warm-up, as a
percentage of the plain step: timed inside the hooks, they move far less from run to run than the whole steps.

Models: `small`, a CNN on 8x8 digit-sized inputs (batch 64, steps of about 2 ms), where the fixed
cost per step and per site shows most; `mobilenet`, `resnet18`, `convnext` and `vit`, torchvision's
MobileNetV3-small and ResNet-18 and timm's convnext_atto and vit_tiny_patch16_224 rebuilt here module
for module (same modules, same nesting, so the hook counts match; torchvision and timm do not import
next to this CPU torch), on smaller inputs than 224x224 so a run fits two shared cores: MobileNetV3-small
batch 16 at 128x128, ResNet-18 batch 8 at 112x112, ConvNeXt-atto and ViT-tiny batch 16 at 96x96
(`--size` sets the side). Smaller maps make the ratio worse, not better: the per-site and per-module
fixed costs weigh more. `mha`: a transformer of 4 blocks with nn.MultiheadAttention and nn.GELU
modules, d=256, 128 tokens, batch 16 (the default with --compile).

The fused statistics pass (deadwatch/fused.py) is built, or loaded from its cache, before anything is
timed; `--no-fused` watches with `fused: false`. `--cold-start` times the first steps of a watched model
against plain ones with an empty build cache: the kernel builds on a background thread meanwhile.

Columns: amax = a hook doing one per-unit amax per activation (the floor of an exact monitor: every
value read once), time/plain, next to noop.

`--compile`: plain and watched copies each through torch.compile(fullgraph=True) (watch, then
compile), compiled in the warm-up steps, timed interleaved like the eager ones (rows marked *).
A model that fails to compile is reported in one line; the graph breaks of the watched model
(torch._dynamo's counters) are printed and should be 0. `--no-fullgraph` lets it break.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
import deadwatch.fused
import deadwatch.updates
from deadwatch.capture.activations import is_activation


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: one ReLU module called twice, a 1x1 downsample where the shape changes."""

    def __init__(self, c: int, out: int | None = None, stride: int = 1) -> None:
        super().__init__()
        out = out or c
        self.conv1, self.bn1 = nn.Conv2d(c, out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(out)
        self.conv2, self.bn2 = nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(c, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                           if stride != 1 or out != c else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(out)) + skip)


class CNN(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[BasicBlock(c) for _ in range(3)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Block(nn.Module):
    """Pre-norm block with nn.MultiheadAttention; GELU as a function (as many models do) or an nn.GELU module."""

    def __init__(self, d: int, heads: int, gelu_module: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.act = nn.GELU() if gelu_module else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.fc1(self.ln2(x))
        # F.gelu looked up at each call, so that the amax and naive copies' wrapper (Hooked) sees it too
        return x + self.fc2(self.act(h) if self.act is not None else F.gelu(h))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 2, heads: int = 4,
                 gelu_module: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d, heads, gelu_module) for _ in range(layers)])
        self.out = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.emb(x)))


class SmallCNN(nn.Module):
    """Digits-sized: 1x8x8 -> conv 16 -> pool -> conv 32 -> linear 64 -> 10; three ReLU sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        self.fc, self.act3 = nn.Linear(32 * 4 * 4, 64), nn.ReLU()
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.act1(self.conv1(x)), 2)
        h = self.act2(self.conv2(h)).flatten(1)
        return self.out(self.act3(self.fc(h)))


def conv_bn(c: int, out: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None) -> nn.Sequential:
    """Conv (no bias), BatchNorm with MobileNetV3's eps and momentum, then the activation if any."""
    layers = [nn.Conv2d(c, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out, eps=1e-3, momentum=0.01)]
    return nn.Sequential(*layers, act(inplace=True)) if act is not None else nn.Sequential(*layers)


def round8(v: float) -> int:
    """Channels rounded to a multiple of 8, at least 8 and not below 90% of v (MobileNet's rule)."""
    r = max(8, int(v + 4) // 8 * 8)
    return r + 8 if r < 0.9 * v else r


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: avgpool -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid, which scales
    the input's channels. Both activations run on 1x1 maps: sites where the fixed cost per site is nearly all
    the cost."""

    def __init__(self, c: int) -> None:
        super().__init__()
        squeeze = round8(c // 4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expand (unless expand == in), kxk depthwise, optional squeeze-excitation, 1x1 project;
    a skip connection where stride 1 keeps the shape."""

    def __init__(self, c: int, k: int, expand: int, out: int, se: bool, act: type, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(c, expand, 1, act=act)] if expand != c else []
        layers.append(conv_bn(expand, expand, k, stride, groups=expand, act=act))
        if se:
            layers.append(SqueezeExcite(expand))
        layers.append(conv_bn(expand, out, 1))
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and c == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.skip else self.block(x)


class MobileNetV3Small(nn.Module):
    """torchvision's mobilenet_v3_small, rebuilt module for module (torchvision does not import next to this
    torch; its Conv2dNormActivation is an nn.Sequential subclass, here nn.Sequential): features (conv-BN-act
    stem, 11 InvertedResidual with block = Sequential, last conv-BN-act), avgpool, classifier. 42 activation
    modules (ReLU, Hardswish, Hardsigmoid), 16 of them in squeeze-excitation on 1x1 maps."""

    # in, kernel, expand, out, squeeze-excitation, activation, stride
    CONFIG = [(16, 3, 16, 16, True, nn.ReLU, 2), (16, 3, 72, 24, False, nn.ReLU, 2),
              (24, 3, 88, 24, False, nn.ReLU, 1), (24, 5, 96, 40, True, nn.Hardswish, 2),
              (40, 5, 240, 40, True, nn.Hardswish, 1), (40, 5, 240, 40, True, nn.Hardswish, 1),
              (40, 5, 120, 48, True, nn.Hardswish, 1), (48, 5, 144, 48, True, nn.Hardswish, 1),
              (48, 5, 288, 96, True, nn.Hardswish, 2), (96, 5, 576, 96, True, nn.Hardswish, 1),
              (96, 5, 576, 96, True, nn.Hardswish, 1)]

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16, 3, 2, act=nn.Hardswish),
                                      *[InvertedResidual(*cfg) for cfg in self.CONFIG],
                                      conv_bn(96, 576, 1, act=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2, inplace=True), nn.Linear(1024, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout: 7x7 stem, max pool, 4 stages of 2 BasicBlocks (64-512), 17 ReLU sites
    on 9 ReLU modules (each block calls its ReLU twice)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        widths = [64, 128, 256, 512]
        self.stages = nn.Sequential(*[nn.Sequential(BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c))
                                      for i, (c_in, c) in enumerate(zip([64] + widths, widths))])
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of an (N, C, H, W) map. A class of model code, as in timm,
    so deadwatch treats it as a module that may call activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> act -> drop1 -> norm -> fc2 -> drop2; 1x1 convs with use_conv (ConvNeXt's conv_mlp)."""

    def __init__(self, d: int, hidden: int, use_conv: bool = False) -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if use_conv else nn.Linear
        self.fc1, self.act, self.drop1 = layer(d, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), layer(hidden, d), nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXtBlock with conv_mlp (as convnext_atto): 7x7 depthwise conv -> LayerNorm2d -> Mlp of 1x1
    convs -> layer scale (gamma); drop_path and shortcut are Identity."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), LayerNorm2d(c, eps=1e-6)
        self.mlp = Mlp(c, 4 * c, use_conv=True)
        self.gamma = nn.Parameter(1e-6 * torch.ones(c))
        self.shortcut, self.drop_path = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.norm(self.conv_dw(x))).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(h) + self.shortcut(x)


class ConvNeXtStage(nn.Module):
    def __init__(self, c_in: int, c: int, depth: int) -> None:
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(c_in, eps=1e-6), nn.Conv2d(c_in, c, 2, 2)) if c_in != c
                           else nn.Identity())
        self.blocks = nn.Sequential(*[ConvNeXtBlock(c) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SelectAdaptivePool2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(x))


class NormMlpClassifierHead(nn.Module):
    def __init__(self, c: int, classes: int) -> None:
        super().__init__()
        self.global_pool, self.norm = SelectAdaptivePool2d(), LayerNorm2d(c, eps=1e-6)
        self.flatten, self.pre_logits = nn.Flatten(1), nn.Identity()
        self.drop, self.fc = nn.Dropout(0.0), nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pre_logits(self.flatten(self.norm(self.global_pool(x))))))


class ConvNeXtAtto(nn.Module):
    """timm's convnext_atto, rebuilt module for module (timm does not import next to this torch): patch stem,
    stages of 2, 2, 6, 2 blocks at 40, 80, 160, 320 channels, head. 12 GELU sites; 57 modules of model code or
    with children (deadwatch's candidates for where a forward starts)."""

    def __init__(self, classes: int = 1000, dims=(40, 80, 160, 320), depths=(2, 2, 6, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(*[ConvNeXtStage(c_in, c, depth)
                                      for c_in, c, depth in zip((dims[0],) + dims, dims, depths)])
        self.norm_pre = nn.Identity()
        self.head = NormMlpClassifierHead(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_pre(self.stages(self.stem(x))))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, d: int) -> None:
        super().__init__()
        self.proj, self.norm = nn.Conv2d(3, d, patch, patch), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Attention(nn.Module):
    """timm's Attention: qkv projection, scaled_dot_product_attention, proj."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm, self.k_norm, self.attn_drop = nn.Identity(), nn.Identity(), nn.Dropout(0.0)
        self.norm, self.proj, self.proj_drop = nn.Identity(), nn.Linear(d, d), nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(b, n, d))))


class VitBlock(nn.Module):
    """timm's vision_transformer.Block: pre-norm attention and Mlp; layer scale and drop path Identity."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d, eps=1e-6), Attention(d, heads)
        self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(d, eps=1e-6), Mlp(d, 4 * d)
        self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VitTiny(nn.Module):
    """timm's vit_tiny_patch16_224, rebuilt module for module: patch embedding, class token and position
    embedding, 12 blocks at d=192 with 3 heads, final norm, head. 12 GELU sites; 39 modules of model code or
    with children."""

    def __init__(self, classes: int = 1000, side: int = 224, d: int = 192, depth: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(16, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (side // 16) ** 2 + 1, d))
        self.pos_drop, self.patch_drop, self.norm_pre = nn.Dropout(0.0), nn.Identity(), nn.Identity()
        self.blocks = nn.Sequential(*[VitBlock(d, heads) for _ in range(depth)])
        self.norm, self.fc_norm = nn.LayerNorm(d, eps=1e-6), nn.Identity()
        self.head_drop, self.head = nn.Dropout(0.0), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(self.norm_pre(self.patch_drop(self.pos_drop(x)))))
        return self.head(self.head_drop(self.fc_norm(x[:, 0])))


def workloads(size: int | None) -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
    """Each model with one fixed batch, built on demand."""
    g = torch.Generator().manual_seed(0)

    def images(n: int, c: int, side: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, c, side, side, generator=g), torch.randint(0, classes, (n,), generator=g)

    return {
        "mlp": lambda: (MLP(), torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)),
        "cnn": lambda: (CNN(), *images(32, 3, 32, 10)),
        "transformer": lambda: (Transformer(), torch.randint(0, 1000, (16, 64), generator=g),
                                torch.randint(0, 1000, (16, 64), generator=g)),
        "small": lambda: (SmallCNN(), *images(64, 1, 8, 10)),
        "mobilenet": lambda: (MobileNetV3Small(), *images(16, 3, size or 128, 1000)),
        "resnet18": lambda: (ResNet18(), *images(8, 3, size or 112, 1000)),
        "convnext": lambda: (ConvNeXtAtto(), *images(16, 3, size or 96, 1000)),
        "vit": lambda: (VitTiny(side=size or 96), *images(16, 3, size or 96, 1000)),
        "mha": lambda: (Transformer(d=256, layers=4, gelu_module=True), torch.randint(0, 1000, (16, 128), generator=g),
                        torch.randint(0, 1000, (16, 128), generator=g)),
    }


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, monitor=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        t0 = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step()
        return time.perf_counter() - t0
    return step


def noop_hooks(model: nn.Module) -> int:
    """A bare forward hook that does nothing on every activation module deadwatch watches: the floor of
    any per-module hook. Functional activations (the transformer's F.gelu) have no module to hook."""
    mods = [m for m in model.modules() if is_activation(m)]
    for m in mods:
        m.register_forward_hook(lambda mod, args, out: None)
    return len(mods)


def unit_dims(out: torch.Tensor) -> tuple[int, ...]:
    """Every dim but the unit axis (the last of an (N, T, C) output, else dim 1)."""
    unit = out.ndim - 1 if out.ndim == 3 else 1
    return tuple(d for d in range(out.ndim) if d != unit)


def naive_count(out: torch.Tensor) -> torch.Tensor:
    """(out > 0) per unit in three passes: compare, cast, sum."""
    return (out.detach() > 0).float().sum(unit_dims(out))


def one_amax(out: torch.Tensor) -> torch.Tensor:
    """The per-unit max, one read of the output: what the exact dead verdict cannot do without."""
    return torch.amax(out.detach(), unit_dims(out))


class Hooked:
    """A forward hook per activation module (and a wrapper for the functional GELU, in models without
    nn.GELU modules, which call it themselves) folding `count(output)` per unit into a running tensor:
    `naive_count`, the reference to beat, or `one_amax`, the floor."""

    def __init__(self, model: nn.Module, count: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.counts: dict[Any, torch.Tensor] = {}
        self.reduce = count
        for m in model.modules():
            if is_activation(m):
                m.register_forward_hook(lambda mod, args, out: self.count(id(mod), out))
        self.gelu = F.gelu
        self.functional = not any(isinstance(m, nn.GELU) for m in model.modules())

    def count(self, key: int, out: torch.Tensor) -> None:
        value = self.reduce(out)
        self.counts[key] = self.counts[key] + value if key in self.counts else value

    def __enter__(self) -> None:
        if self.functional:
            F.gelu = lambda x, *a, **k: self._gelu(x, *a, **k)

    def _gelu(self, x, *a, **k):
        out = self.gelu(x, *a, **k)
        self.count((id(self._gelu), out.shape), out)
        return out

    def __exit__(self, *exc) -> None:
        F.gelu = self.gelu


class Unpatched:
    """While a monitor is open, deadwatch wraps F.relu & co. for the whole process, so a plain model
    beside a watched one would pay the wrappers (and, compiled, trace them). The plain, no-op and
    naive copies run inside this: with the original functions, as without deadwatch."""

    NAMES = [(ns, attr) for ns in (torch, torch.nn.functional) for attr, value in vars(ns).items()
             if callable(value) and not attr.startswith("_")]

    def wrap(self, step: Callable[[], float]) -> Callable[[], float]:
        def unpatched() -> float:  # the swaps are outside the step's own timing
            swapped = [(ns, attr, value) for ns, attr in self.NAMES
                       if "__deadwatch_original__" in getattr(value := getattr(ns, attr), "__dict__", {})]
            for ns, attr, wrapper in swapped:
                while "__deadwatch_original__" in getattr(wrapper, "__dict__", {}):  # versus.py: two versions' wrappers
                    wrapper = wrapper.__deadwatch_original__
                setattr(ns, attr, wrapper)
            try:
                return step()
            finally:
                for ns, attr, wrapper in swapped:
                    setattr(ns, attr, wrapper)
        return unpatched


class Timed(NamedTuple):
    """One pairing of copies: each copy's step times, round by round (a round runs every copy once)."""

    times: list[list[float]]

    def median(self, j: int) -> float:
        return statistics.median(self.times[j])

    def ratio(self, j: int) -> float:
        """Copy j against copy 0 (plain): the median over rounds of j's step over plain's step of the same
        round. The steps of a round run within a second or so; this VM's steps switch between a quiet and a
        contended speed (about 190 and 275 ms for MobileNet) every few seconds, so the median of each copy's
        own times falls between the two and moves with the share of each it happened to get (identical copies
        read up to 21% apart), where the same-round ratio moves by 1-3% (docs/overhead.md, "Reading the
        figures")."""
        return statistics.median(t / p for t, p in zip(self.times[j], self.times[0]))


def interleave(steps: list, n: int, warmup: int) -> Timed:
    """Run the steps one after another, rotating which goes first, warmup + n rounds; the times of the last n."""
    times: list[list[float]] = [[] for _ in steps]
    for i in range(warmup + n):
        order = [(i + j) % len(steps) for j in range(len(steps))]
        for j in order:
            t = steps[j]()
            if i >= warmup:
                times[j].append(t)
    return Timed(times)


def median_round(steps: list, args: argparse.Namespace) -> Timed:
    """Repeat the pairing args.rounds times; the round with the median ratio of copy 1 (the watched one)."""
    rounds = sorted((interleave(steps, args.steps, args.warmup) for _ in range(args.rounds)), key=lambda r: r.ratio(1))
    return rounds[len(rounds) // 2]


def eager_row(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    twin, noop_twin, floor_twin, naive_twin, again = (copy.deepcopy(model) for _ in range(5))
    hooked = noop_hooks(noop_twin)
    bare = Unpatched().wrap

    def counted(model: nn.Module, count: Callable) -> Callable[[], float]:
        hooks, step = Hooked(model, count), make_step(model, x, y)

        def run() -> float:
            with hooks:
                return step()
        return bare(run)

    recorded, floor = InHooks(), InHooks()
    real_record = deadwatch.stats.record
    deadwatch.stats.record = recorded.time(real_record)  # what the watched copy's hooks call
    try:
        with deadwatch.watch(twin, reporters=[], fused=not args.no_fused) as monitor:
            timed = UpdateTimer(monitor, args.warmup)
            steps = [bare(make_step(model, x, y)), recorded.step(make_step(twin, x, y, monitor)),
                     bare(make_step(noop_twin, x, y)), floor.step(counted(floor_twin, floor.time(one_amax))),
                     counted(naive_twin, naive_count), bare(make_step(again, x, y))]
            run = median_round(steps, args)
            sites = len(monitor.report().layers)
    finally:
        deadwatch.stats.record = real_record
    p, w = run.median(0), run.median(1)
    ratio = run.ratio(1)
    print(f"{name:<12} {sites:>5} {1e3 * p:>9.2f} {1e3 * w:>10.2f} {ratio:>7.3f} {1e3 * (ratio - 1) * p:>7.2f} "
          f"{hooked:>5} {run.ratio(2):>7.3f} {run.ratio(3):>7.3f} {run.ratio(4):>7.3f} {run.ratio(5):>7.3f} "
          f"{100 * timed.mean() / p:>6.2f} {100 * recorded.median(args.warmup) / p:>6.2f} "
          f"{100 * floor.median(args.warmup) / p:>6.2f}")
    return ratio


class InHooks:
    """The time spent inside the hooks' work (deadwatch's record(), or the floor's amax) in each step: whole-step
    medians on a shared VM move by 2-4% from run to run, this by much less, so rec% against amax% tells the
    counting's cost from the floor's (each as a share of the plain step, the median over the steps after the
    warm-up)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.steps: list[float] = []

    def time(self, fn: Callable) -> Callable:
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.now += time.perf_counter() - t0
        return timed

    def step(self, run: Callable[[], float]) -> Callable[[], float]:
        def timed() -> float:
            self.now = 0.0
            took = run()
            self.steps.append(self.now)
            return took
        return timed

    def median(self, warmup: int) -> float:
        timed = self.steps[warmup:] or self.steps
        return statistics.median(timed) if timed else 0.0


class UpdateTimer:
    """The update-size measurement (large_update's evidence) timed where it runs, in monitor.step(): it
    works on 2 steps of every 20 only, which a median of step times does not see, so its mean cost per
    step is timed apart (upd%: that mean over the steps after the warm-up, as a share of the plain step;
    the warm-up holds the one-time set-up)."""

    def __init__(self, monitor, warmup: int) -> None:
        self.times: list[float] = []
        self.warmup = warmup
        inner = monitor._updates.end_of_step

        def end_of_step(step: int) -> None:
            t0 = time.perf_counter()
            inner(step)
            self.times.append(time.perf_counter() - t0)
        monitor._updates.end_of_step = end_of_step

    def mean(self) -> float:
        timed = self.times[self.warmup:]
        return sum(timed) / max(len(timed), 1)


def fused_ready() -> str:
    """Build (or load) the fused pass's kernel before timing anything; what happened, in words."""
    kernel = deadwatch.fused.KERNEL
    started = time.perf_counter()
    kernel.start()
    while kernel.fn is None and not kernel.failed and kernel.target() is not None:
        time.sleep(0.05)
    if kernel.fn is None:
        return "off (no C++ compiler)" if kernel.target() is None else "off (its build failed)"
    took = time.perf_counter() - started
    return "ready (from the cache)" if took < 0.5 else f"ready (built in {took:.1f} s)"


def cold_start(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    """--cold-start: the fused pass's kernel is not built yet (a fresh cache directory); watch, then time the
    first steps, plain and watched interleaved, and say when the kernel got ready."""
    import tempfile
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="deadwatch-cold-")
    kernel = deadwatch.fused.KERNEL
    twin = copy.deepcopy(model)
    plain = Unpatched().wrap(make_step(model, x, y))
    started = time.perf_counter()
    with deadwatch.watch(twin, reporters=[], fused=not args.no_fused) as monitor:
        step = make_step(twin, x, y, monitor)
        ready_at = None
        for n in range(1, args.steps + 1):
            w, p = step(), plain()
            if kernel.fn is not None and ready_at is None:
                ready_at = (n, time.perf_counter() - started)
            print(f"{name} step {n:>3}: plain {1e3 * p:8.2f} ms, watched {1e3 * w:8.2f} ms, ratio {w / p:6.3f}"
                  f"{'  (fused pass ready)' if ready_at and ready_at[0] == n else ''}")
    if args.no_fused:
        print("fused pass off (--no-fused): the torch ops at every step")
    elif ready_at:
        print(f"kernel ready {ready_at[1]:.1f} s after watch(), by step {ready_at[0]}")
    else:
        print(f"kernel not ready after {args.steps} steps" + (" (no C++ compiler)" if kernel.target() is None else ""))


def boundaries_row(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    """--boundaries: two watched copies, one with its boundary hooks pruned after two steps (the default), one
    keeping every module hooked; their forwards (where hooks run) timed interleaved under no_grad."""
    twin = copy.deepcopy(model)
    with deadwatch.watch(model, reporters=[]) as pruned, deadwatch.watch(twin, reporters=[]) as full:
        full._capture.keep_all = True
        for _ in range(3):
            make_step(model, x, y, pruned)()
            make_step(twin, x, y, full)()

        def forward(m: nn.Module) -> Callable[[], float]:
            def run() -> float:
                t0 = time.perf_counter()
                with torch.no_grad():
                    m(x)
                return time.perf_counter() - t0
            return run
        run = median_round([forward(model), forward(twin)], args)
        p = run.median(0)
        f = p * run.ratio(1)
        print(f"{name:<12} hooked modules {len(pruned._capture.boundaries):>3} pruned, {len(full._capture.boundaries):>3} "
              f"all; forward {1e3 * p:.2f} ms against {1e3 * f:.2f} ms: {1e3 * (f - p):.2f} ms saved", flush=True)


def graph_breaks() -> tuple[int, str]:
    breaks = torch._dynamo.utils.counters["graph_break"]
    return sum(breaks.values()), (next(iter(breaks)).splitlines()[0][:100] if breaks else "")


def compiled_row(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    """Plain and watched copies, each through torch.compile (watch first, then compile); compilation in the
    warm-up steps. A failed compile is one line, not a traceback."""
    fullgraph = not args.no_fullgraph
    twin, again = copy.deepcopy(model), copy.deepcopy(model)
    plain, plain_again = torch.compile(model, fullgraph=fullgraph), torch.compile(again, fullgraph=fullgraph)
    with deadwatch.watch(twin, reporters=[]) as monitor:
        watched = torch.compile(twin, fullgraph=fullgraph)
        steps = [Unpatched().wrap(make_step(plain, x, y)), make_step(watched, x, y, monitor),
                 Unpatched().wrap(make_step(plain_again, x, y))]
        torch._dynamo.utils.counters.clear()
        try:  # the watched copy first: deadwatch runs every model eagerly until its first step()
            for _ in range(3):
                steps[1]()
            breaks, reason = graph_breaks()
            torch._dynamo.utils.counters.clear()
            for _ in range(3):
                steps[0]()
                steps[2]()
            plain_breaks = graph_breaks()[0]
        except Exception as e:  # noqa: BLE001 - the benchmark reports the failure and goes on
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            msg = "; ".join(lines[:1] + [line for line in lines if line.startswith("Explanation:")][:1])[:240]
            print(f"{name + '*':<12} compile failed (fullgraph={fullgraph}): {type(e).__name__}: {msg}")
            return float("nan")
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        run = median_round(steps, args)
        recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        sites = len(monitor.report().layers)
    p, w, ratio = run.median(0), run.median(1), run.ratio(1)
    print(f"{name + '*':<12} {sites:>5} {1e3 * p:>9.2f} {1e3 * w:>10.2f} {ratio:>7.3f} {1e3 * (ratio - 1) * p:>7.2f} "
          f"{'-':>5} {'-':>7} {'-':>7} {'-':>7} {run.ratio(2):>7.3f} {'-':>6}   graph breaks: watched {breaks}, plain {plain_breaks}"
          + (f" ({reason})" if breaks else "") + (f"; {recompiled} graphs compiled while timed" if recompiled else ""))
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", help="comma-separated, of: mlp, cnn, transformer, small, mobilenet, resnet18, "
                                     "convnext, vit, mha (default mlp,cnn,transformer; with --compile, mha)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each pairing, report the median round")
    ap.add_argument("--size", type=int, help="image side for mobilenet (default 128), resnet18 (112), convnext and "
                                             "vit (96)")
    ap.add_argument("--compile", action="store_true", help="plain and watched both torch.compile(fullgraph=True)")
    ap.add_argument("--no-fullgraph", action="store_true", help="with --compile: allow graph breaks")
    ap.add_argument("--update-every", type=int, help="measure ||dW||/||W|| of the producer layers every N-th step "
                    f"(default {deadwatch.updates.EVERY}; 0: never), to time that cost apart")
    ap.add_argument("--boundaries", action="store_true", help="time forwards with the boundary hooks pruned "
                    "(the default after two steps) against every module hooked, instead of the table")
    ap.add_argument("--no-fused", action="store_true", help="watch with fused: false (the eager ops everywhere)")
    ap.add_argument("--cold-start", action="store_true", help="time the first --steps steps with an empty build "
                    "cache for the fused pass (it builds meanwhile), instead of the table")
    args = ap.parse_args()
    if args.update_every is not None:
        deadwatch.updates.EVERY = args.update_every
    torch.set_num_threads(args.threads)
    loads = workloads(args.size)
    names = (args.models or ("mha" if args.compile else "mlp,cnn,transformer")).split(",")
    unknown = [n for n in names if n not in loads]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(loads)}")
    if args.cold_start:
        for name in names:
            cold_start(name, *loads[name](), args)
        return
    fused = "off (--no-fused)" if args.no_fused else fused_ready()
    if args.boundaries:
        for name in names:
            boundaries_row(name, *loads[name](), args)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} rounds of interleaved steps, ratios "
          f"to the plain step of the same round, medians (median round of {args.rounds})"
          + (f"; * compiled, fullgraph={not args.no_fullgraph}" if args.compile else "") + f"; fused pass {fused}")
    print(f"{'model':<12} {'sites':>5} {'plain ms':>9} {'watched ms':>10} {'ratio':>7} {'+ms':>7} "
          f"{'hooks':>5} {'noop':>7} {'amax':>7} {'naive':>7} {'a/a':>7} {'upd%':>6} {'rec%':>6} {'amax%':>6}")
    ratios = []
    for name in names:
        model, x, y = loads[name]()
        ratios.append((compiled_row if args.compile else eager_row)(name, model, x, y, args))
    ok = [r for r in ratios if r == r]
    print(f"worst watched/plain {max(ok):.3f}" if ok else "no model timed")


if __name__ == "__main__":
    main()
