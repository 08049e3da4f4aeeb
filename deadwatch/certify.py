"""Certificates: dead units proved dead for every input from the weights and the structure, not the data.

A unit of a site whose activation is ReLU-family (output 0 and gradient 0 wherever its pre-activation is
<= 0) is certified when its pre-activation is <= 0 for every finite input, by one of:
- norm: a BatchNorm between the producer and the activation has scale exactly 0 and shift <= 0 (its output
  is then the shift, whatever it reads; in eval mode the running statistics must be finite, with
  running_var + eps > 0, so that 0 * (x - mean) / std stays 0);
- zero row: no norm, the producer's row is all zero and its bias <= 0 (or absent);
- non-positive row: no norm, the producer reads a ReLU-family / sigmoid / softmax output straight (its
  inputs are >= 0), every weight of the row is <= 0 and the bias <= 0.
A tiny but nonzero scale proves nothing: the shift plus a large normalised input can still fire.

During training a proved unit gets an exactly zero gradient for every input, so only the optimizer's state
and weight decay can move the entries of the proof. It is certified only when that cannot revive it: the
optimizer is SGD or Adam/AdamW, holds no nonzero first moment (momentum_buffer, exp_avg) for those
entries, and its weight decay keeps their sign (not Adam's coupled L2 on a nonzero entry: the normalised
step is about lr whatever the entry's size, so it can carry it past 0; not SGD momentum with weight decay;
not lr * weight_decay > 1). Otherwise LayerReport.certify_note says why.

Certificates read the layers around each site from the one site map (which layer makes the units, the norm,
whether the producer's inputs are non-negative); a certified unit must also be dead on the forwards seen,
which guards against an op the map does not see between the layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import torch
from torch import nn

from .sitemap import SiteLayers, is_conv1d, is_layer

if TYPE_CHECKING:
    from .analysis import Report

CERTIFIABLE = ("relu", "relu6", "relusquaredactivation")   # output 0 and gradient 0 at pre-activation <= 0
MOMENTS = ("momentum_buffer", "exp_avg")  # optimizer state that moves an entry whose gradient is 0


class Entry(NamedTuple):
    """Entries of a parameter a proof rests on: if the optimizer moves them, the unit may come back."""

    name: str
    param: torch.Tensor
    dim: int
    units: list[int]


class Proof(NamedTuple):
    units: list[int]        # proved dead for every input, from the weights
    entries: list[Entry]    # the parameter entries the proof rests on
    rule: str               # "norm", "row"


def _rows(m: nn.Module) -> torch.Tensor:
    """The producer's weight, one row per output unit."""
    w = m.weight.detach()
    return w.t() if is_conv1d(m) else w.flatten(1)


def _plain(*tensors: torch.Tensor | None) -> bool:
    """Whole tensors on this process (a sharded DTensor's local values prove nothing about the rest)."""
    return all(t is None or (type(t.data) is torch.Tensor and not t.is_meta) for t in tensors)


def prove(model: nn.Module, layers: SiteLayers, units: int) -> Proof | None:
    """The units of a site proved dead for every input from the weights, in the mode the model is in now;
    None when the layers around it are not known or not of a kind a proof covers. A pre-activation that is a
    sum (a residual add) has no producer in the map; an output added to other tensors (`coupled`) does
    not change what the site outputs, so it does not stop a proof."""
    producers = layers.producers
    if not producers or layers.why:
        return None
    producer = model.get_submodule(producers[0])
    if not is_layer(producer) or not _plain(producer.weight, producer.bias):
        return None
    rows = _rows(producer)
    if rows.shape[0] != units:
        return None
    bias = producer.bias.detach() if producer.bias is not None else None
    bias_ok = torch.ones(units, dtype=torch.bool, device=rows.device) if bias is None else bias <= 0
    norm_path = layers.norm
    if norm_path is not None:
        norm = model.get_submodule(norm_path)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.weight is None or norm.num_features != units \
                or not _plain(norm.weight, norm.bias):
            return None  # LayerNorm/GroupNorm mix units; no affine: the shift is 0 but the scale is 1
        gamma, beta = norm.weight.detach(), norm.bias.detach()
        ok = (gamma == 0) & (beta <= 0)
        if not norm.training and norm.track_running_stats and norm.running_var is not None:
            ok &= torch.isfinite(norm.running_mean) & torch.isfinite(norm.running_var) & (norm.running_var + norm.eps > 0)
        dead = ok.nonzero().flatten().tolist()
        return Proof(dead, [Entry(f"{norm_path}.weight", norm.weight, 0, dead),
                            Entry(f"{norm_path}.bias", norm.bias, 0, dead)], "norm")
    finite = torch.isfinite(rows).all(1)
    ok = (rows == 0).all(1) & bias_ok
    if layers.input_nonnegative:
        ok |= finite & (rows <= 0).all(1) & bias_ok
    dead = ok.nonzero().flatten().tolist()
    entries = [Entry(f"{producers[0]}.weight", producer.weight, 1 if is_conv1d(producer) else 0, dead)]
    if producer.bias is not None:
        entries.append(Entry(f"{producers[0]}.bias", producer.bias, 0, dead))
    return Proof(dead, entries, "row")


def revivable(optimizer: torch.optim.Optimizer, entries: list[Entry]) -> str | None:
    """Why `optimizer` could move the proof's entries (whose gradient is exactly 0) so that the units
    fire again; None when it cannot."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    kind = type(optimizer).__name__
    for e in entries:
        group = groups.get(id(e.param))
        if group is None or not e.units:
            continue  # not trained by this optimizer
        if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
            return f"{kind} trains {e.name}: certificates cover SGD and Adam/AdamW only"
        index = torch.tensor(e.units, dtype=torch.long, device=e.param.device)
        why = _decay(optimizer, group, e, index)  # first: under coupled Adam decay it is also why moments are nonzero
        if why is not None:
            return why
        state = optimizer.state.get(e.param, {})
        for key in MOMENTS:
            moment = state.get(key)
            if isinstance(moment, torch.Tensor) and bool((moment.index_select(e.dim, index) != 0).any()):
                return f"{kind} holds a nonzero {key} for {e.name}, which can move it back"
    return None


def _decay(optimizer: torch.optim.Optimizer, group: dict, e: Entry, index: torch.Tensor) -> str | None:
    """Why the weight decay of `group` could carry the entries past 0, or None."""
    decay = float(group.get("weight_decay", 0.0) or 0.0)
    if not decay or not bool((e.param.detach().index_select(e.dim, index) != 0).any()):
        return None  # decay leaves an entry at 0 where it is
    if type(optimizer) is torch.optim.Adam and not group.get("decoupled_weight_decay", False):
        return (f"Adam with coupled weight decay ({decay:g}) steps {e.name} by about lr per step whatever its "
                f"size: it can carry it past 0")
    if isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0):
        return f"SGD momentum with weight decay ({decay:g}) can carry {e.name} past 0"
    if float(group["lr"]) * decay > 1:
        return f"lr * weight_decay > 1 flips the sign of {e.name}"
    return None


def annotate(report: Report, model: nn.Module, layers: Mapping[str, SiteLayers], kinds: Mapping[str, str],
             optimizer: torch.optim.Optimizer | None = None, training: bool = False) -> None:
    """Set certified_units (and certify_note) of the report's sites from the site map `layers` (by site
    name) and each site's activation kind. `training`: the units must also be unable to come back under
    `optimizer`."""
    for layer in report.layers:
        if not layer.dead_units or kinds.get(layer.name, "").lower() not in CERTIFIABLE:
            continue
        around = layers.get(layer.name)
        proof = prove(model, around, layer.units) if around is not None else None
        if proof is None:
            continue
        proved = sorted(set(proof.units) & set(layer.dead_units))
        if not proved:
            continue
        if training:
            entries = [e._replace(units=proved) for e in proof.entries]
            why = "no optimizer was given to watch(), so recovery cannot be ruled out" if optimizer is None \
                else revivable(optimizer, entries)
            if why is not None:
                layer.certify_note = f"{len(proved)} unit(s) proved dead now but not certified: {why}"
                continue
        layer.certified_units = proved



def site_map(monitor: Any) -> tuple[dict[str, SiteLayers], dict[str, str]]:
    """({site name: its layers}, {site name: activation kind}) for the monitor's sites, from the one site
    map (Monitor.site_layers())."""
    capture = monitor._capture
    layout = capture.layout()
    kinds = {name: site.kind for name, (_, site) in zip(capture.names([key for key, _ in layout]), layout)}
    return monitor.site_layers(), kinds
