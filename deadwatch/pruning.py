"""Pruning: remove dead units physically, with Torch-Pruning (optional extra `prune`).

Torch-Pruning traces the model once and gives, for a producer's output channels, the group of every layer
that must change with them: the producer's rows, a norm's channels, every consumer's columns (through
flatten, pooling, concatenation), and the other producers tied to them by a residual add. A site is
pruned only when its group changes nothing but its own producers and norm besides the consumers: a group
that also takes rows from another producer means the units' channels are shared with a residual stream,
and removing them would remove that producer's live channels too. Units that are exactly 0 for every input
(certified) contribute nothing to the consumers, so the outputs stay the same up to the order of sums.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from torch import nn

from .errors import DeadwatchError
from .sitemap import SiteLayers, is_conv1d

if TYPE_CHECKING:
    from .analysis import Report

SELECT = ("certified", "dead")


@dataclass
class PruneResult:
    """What prune() did. `model` is the pruned copy; the model passed in is left as it was."""

    model: nn.Module = field(repr=False)
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    removed: dict[str, list[int]]     # site -> units removed
    skipped: dict[str, str]           # site -> why its units were kept
    max_difference: float             # largest |output difference| on the example inputs

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "model"}

    def lines(self) -> list[str]:
        n = sum(len(u) for u in self.removed.values())
        out = [f"pruned {n} unit(s) at {len(self.removed)} site(s): parameters {self.params_before:,} -> "
               f"{self.params_after:,}, MACs {self.macs_before:,.0f} -> {self.macs_after:,.0f}, largest output "
               f"difference {self.max_difference:.3g}"]
        out += [f"  {site}: removed {len(units)} unit(s)" for site, units in self.removed.items()]
        out += [f"  {site}: skipped: {why}" for site, why in self.skipped.items()]
        return out


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise DeadwatchError("pruning needs Torch-Pruning: pip install 'deadwatch[prune]'") from None
    return torch_pruning


def _wanted(units: Report | Mapping[str, Any], select: str) -> dict[str, list[int]]:
    if select not in SELECT:
        raise ValueError(f"deadwatch: prune(select=...) must be one of {', '.join(SELECT)}, got {select!r}")
    if isinstance(units, Mapping):
        return {site: sorted({int(u) for u in us}) for site, us in units.items() if len(us)}
    if not hasattr(units, "layers"):
        raise TypeError(f"deadwatch: prune() takes a Report or a mapping {{site: [units]}}, got {type(units).__name__}")
    if select == "dead":
        warnings.warn("deadwatch: prune(select='dead') also removes units that were only dead on the data seen: "
                      "answers may differ on inputs that data did not cover", RuntimeWarning, stacklevel=3)
    return {layer.name: list(layer.certified_units if select == "certified" else layer.dead_units)
            for layer in units.layers if (layer.certified_units if select == "certified" else layer.dead_units)}


def _outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a tuple, a dict, a Hugging Face ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _outputs(v)]
    return []


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Torch-Pruning prints notes to stdout and warns about layers it does not know: `deadwatch check --json`
    prints one JSON object there, and the result says what was skipped."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def _run(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        return _outputs(_call(model, inputs))


def _count(tp: Any, model: nn.Module, inputs: Any) -> tuple[float, int]:
    """(multiply-accumulates, parameters); MACs are NaN where Torch-Pruning's counter cannot run the model."""
    params = sum(p.numel() for p in model.parameters())
    try:
        with _quiet():
            macs, _ = tp.utils.count_ops_and_params(model, dict(inputs) if isinstance(inputs, Mapping) else inputs)
    except Exception:
        macs = float("nan")
    return float(macs), params


def _layers(model: nn.Module, inputs: Any) -> dict[str, SiteLayers]:
    """The site map of `model`, traced by one forward of the example inputs (model left as it was)."""
    from .check import scanned

    return scanned(model, [inputs], forward=lambda m, _, batch: _call(m, batch))[1]


def prune(model: nn.Module, units: Report | Mapping[str, Any], example_inputs: Any, select: str = "certified"
          ) -> PruneResult:
    """Remove dead units from a copy of `model`: the producers' rows, the norm's channel, every consumer's
    columns. `units`: a Report (its certified units; select="dead" also its units dead on the data, with
    a warning) or {site: [units]}. `example_inputs`: a tensor, a tuple of positional inputs or a mapping of
    keyword inputs, for the trace and the output check. Sites whose units cannot be removed alone are
    skipped with the reason."""
    tp = _torch_pruning()
    wanted = _wanted(units, select)
    pruned = copy.deepcopy(model)
    training = [(m, m.training) for m in list(model.modules()) + list(pruned.modules())]
    model.eval()
    pruned.eval()
    try:
        inputs = example_inputs if isinstance(example_inputs, (tuple, Mapping)) else (example_inputs,)
        layers = _layers(pruned, inputs)
        macs_before, params_before = _count(tp, pruned, inputs)
        removed, skipped = {}, {}
        try:
            with _quiet():
                    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=inputs, forward_fn=_call,
                                                              output_transform=lambda out: [t for t in _outputs(out)
                                                                                            if t.grad_fn is not None])
        except Exception as e:  # an op Torch-Pruning does not know: nothing is pruned, and the result says why
            graph, untraced = None, f"Torch-Pruning could not trace the model ({type(e).__name__}: {e})"
        for site, chosen in wanted.items():
            why = _unprunable(site, layers, pruned) or (untraced if graph is None else None)
            group = None
            if why is None:
                group, why = _group(tp, graph, pruned, layers[site], chosen)
            if why is not None:
                skipped[site] = why
                continue
            group.prune()
            removed[site] = chosen
        macs_after, params_after = _count(tp, pruned, inputs)
        before, after = _run(model, inputs), _run(pruned, inputs)
        if [t.shape for t in before] != [t.shape for t in after]:
            raise DeadwatchError("prune(): the pruned model's outputs have other shapes than the model's; "
                                 "nothing is returned")
        diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(before, after) if a.numel()),
                   default=0.0)
    finally:
        for m, mode in training:
            m.training = mode
    return PruneResult(pruned, params_before, params_after, macs_before, macs_after, removed, skipped, diff)


def _unprunable(site: str, layers: Mapping[str, SiteLayers], model: nn.Module) -> str | None:
    """Why the site map rules the site out, or None."""
    around = layers.get(site)
    if around is None:
        return "no such site in this model (or it did not run on the example inputs)"
    if around.coupled:
        return around.coupled
    if around.why or not around.producers:
        return f"its layers are not known: {around.why or 'no single layer makes its units'}"
    if around.repeated:
        return f"{list(around.repeated)} are used more than once per forward (shared or tied weights)"
    if len(around.producers) > 1:
        return f"its units are made by several layers {list(around.producers)} (a gated product)"
    producer = model.get_submodule(around.producers[0])
    if is_conv1d(producer):
        return "Torch-Pruning has no rule for Hugging Face's Conv1D (GPT-2): its rows are columns"
    if not isinstance(producer, nn.Linear) and not (isinstance(producer, nn.modules.conv._ConvNd)
                                                    and not producer.transposed):
        return f"its producer {around.producers[0]!r} is a {type(producer).__name__}, not a Linear or Conv"
    return None


def _group(tp: Any, graph: Any, model: nn.Module, around: Any, chosen: list[int]) -> tuple[Any, str | None]:
    """Torch-Pruning's group for the producer's (a Linear or Conv) output channels `chosen`, or why it is not
    pruned."""
    producer = model.get_submodule(around.producers[0])
    fn = tp.prune_linear_out_channels if isinstance(producer, nn.Linear) else tp.prune_conv_out_channels
    if len(chosen) >= (producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels):
        return None, "every unit of the site is dead: removing them all would leave a layer with no outputs"
    group = graph.get_pruning_group(producer, fn, idxs=list(chosen))
    mine = {producer, model.get_submodule(around.norm) if around.norm else None}
    readers, others = set(), []
    paths = {m: p for p, m in model.named_modules()}
    for dep, _ in group:
        target = dep.target.module
        if target not in paths or not any(True for _ in target.parameters(recurse=False)):
            continue  # Torch-Pruning's own nodes (elementwise ops, reshapes)
        name = getattr(dep.handler, "__name__", "")
        if "in_channels" in name:
            readers.add(paths[target])
        elif target not in mine:
            others.append(paths[target])
    if others:
        return None, f"its channels are shared with {sorted(set(others))} (a residual add or another coupling)"
    if not readers:
        return None, "no layer reads its units (they are the model's output)"
    if readers != set(around.consumers):  # two traces of one forward must agree on who reads the units
        return None, (f"Torch-Pruning finds {sorted(readers)} reading its units, the site map "
                      f"{sorted(around.consumers)}")
    if not graph.check_pruning_group(group):
        return None, "Torch-Pruning refuses the group (it would leave a layer with no channels)"
    return group, None
