"""Saved models, with no training loop: load them (`deadwatch check`), and scan a model over batches.

Formats: a torch.save'd state dict or whole model (.pt/.pth/.bin; a whole model only with trust=True,
since unpickling runs code), .safetensors, a Lightning .ckpt, a Hugging Face model folder (built from its
local config.json with transformers, nothing downloaded). A state dict needs `model` (MODULE:CALLABLE) for
its structure; without one only suspects are reported, from the tensors alone, never certificates.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, NamedTuple

import torch
from torch import nn

from .errors import DeadwatchError

if TYPE_CHECKING:
    from .analysis import Report
    from .config import Config

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
SUSPECT_SCALE = 1e-6   # a norm scale this close to 0 makes a suspect (unproved: only exactly 0 certifies)
TOKENS = (2, 16)       # the dummy batch of token ids for models whose first layer is an embedding


class CheckError(DeadwatchError):
    """A saved model that cannot be read, is not supported, or is refused."""


class Loaded(NamedTuple):
    model: nn.Module | None          # None: a state dict with no architecture given
    state: dict[str, torch.Tensor]   # the saved tensors
    format: str                      # "state dict", "whole model", "safetensors", "lightning", "hugging face"
    example: Any                     # a dummy batch for the structure forward (None: no model)


# -- scan
def scan(model: nn.Module, batches: Iterable[Any], config: Config | str | os.PathLike | Mapping | None = None,
         **overrides: Any) -> Report:
    """The report of `model` over `batches`, with certificates: every forward of the scan counts, whatever
    the model's mode; the window spans the whole scan unless given. A batch is a tensor (model(x)), a
    mapping (model(**batch); its attention_mask, if any, masks the padding as in training) or a tuple or
    list whose first item is the input (the rest, labels, are not passed). The model is left as it was:
    its buffers (BatchNorm running statistics) are restored and every hook is removed. The first batch
    runs with gradients on (its autograd graph shows the layers around each site); no backward runs."""
    return scanned(model, batches, config, **overrides)[0]


def scanned(model: nn.Module, batches: Iterable[Any], config: Any = None, forward: Any = None,
            **overrides: Any) -> tuple[Report, dict[str, Any]]:
    """scan()'s report and the site map (Monitor.site_layers()); `forward(model, monitor, batch)` runs
    one batch (default: as scan() describes)."""
    from .monitor import Monitor

    forward = forward or _forward
    overrides.setdefault("reporters", [])
    overrides.setdefault("count_eval", True)
    if config is None:
        overrides.setdefault("window", 2**31 - 1)
        overrides.setdefault("report_every", 2**31 - 1)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    monitor = Monitor(model, config, **overrides)
    monitor._scan = True
    failed = True
    try:
        for i, batch in enumerate(batches):
            if i == 0:  # a graph for the site map, also through frozen layers
                for p, _ in grads:
                    p.requires_grad_(p.is_floating_point())
            with torch.enable_grad() if i == 0 else torch.no_grad():
                forward(model, monitor, batch)
            if i == 0:
                for p, wanted in grads:
                    p.requires_grad_(wanted)
            monitor.step()
        if not monitor.steps:
            raise DeadwatchError("scan(): `batches` yielded no batch")
        report = monitor.report()
        failed = False
        return report, monitor.site_layers()
    finally:
        with warnings.catch_warnings():
            if failed:  # the scan's own error says what went wrong: no warning that nothing was judged
                warnings.simplefilter("ignore")
            monitor.close()
        for p, wanted in grads:
            p.requires_grad_(wanted)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _forward(model: nn.Module, monitor: Any, batch: Any) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        with monitor.mask(mask) if isinstance(mask, torch.Tensor) else contextlib.nullcontext():
            model(**batch)
    elif isinstance(batch, (tuple, list)) and batch:
        _forward(model, monitor, batch[0])
    else:
        raise DeadwatchError(f"a batch must be a tensor, a mapping of keyword arguments or a tuple/list whose first "
                             f"item is the input; got {type(batch).__name__}")


# -- loading
def callable_from(spec: str, flag: str) -> Any:
    """MODULE:CALLABLE (the module importable, or a .py path), as --model and --data name them."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise CheckError(f"{flag} {spec!r} must be MODULE:CALLABLE, e.g. mypkg.models:build")
    try:
        if module.endswith(".py"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(module)))
            module = os.path.basename(module)[:-3]
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise CheckError(f"{flag} {spec!r}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(obj):
        raise CheckError(f"{flag} {spec!r} is not callable")
    return obj


def load(path: str, model: str | None = None, trust: bool = False, input_shape: tuple[int, ...] | None = None) -> Loaded:
    """The saved model at `path` (see the module's doc); CheckError naming the problem otherwise."""
    if not os.path.exists(path):
        raise CheckError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if model is not None:
            raise CheckError("--model is for state dicts; a Hugging Face folder is built from its config.json")
        return _hugging_face(path, input_shape)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise CheckError(f"{path}: unsupported file type {suffix or '(none)'!r}; allowed: {', '.join(FILE_SUFFIXES)} "
                         f"or a Hugging Face model folder")
    if suffix == ".safetensors":
        obj, fmt = _safetensors(path), "safetensors"
    else:
        obj, fmt = _torch_load(path, trust), "state dict"
    if isinstance(obj, nn.Module):
        if model is not None:
            raise CheckError(f"{path} holds a whole model; --model is for state dicts")
        return Loaded(obj.eval(), obj.state_dict(), "whole model", example_input(obj, input_shape))
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj, fmt = obj["state_dict"], "lightning"
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor), a whole model "
                         f"or a Lightning checkpoint")
    state = dict(obj)
    if model is None:
        return Loaded(None, state, fmt, None)
    built = callable_from(model, "--model")()
    if not isinstance(built, nn.Module):
        raise CheckError(f"--model {model!r} returned a {type(built).__name__}, not a torch.nn.Module")
    _load_into(built, state, path)
    return Loaded(built.eval(), state, fmt, example_input(built, input_shape))


def _torch_load(path: str, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if not trust and "Unsupported global" in str(e):  # a class to import: readable, but only by running code
            raise CheckError(f"refused: {path} holds pickled objects beyond tensors (a whole model?), and unpickling "
                             f"runs code; pass --trust if you trust this file") from None
        raise CheckError(f"cannot read {path}: not a file torch.save wrote, or a damaged one (UnpicklingError)") from None
    except Exception as e:
        raise CheckError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckError("reading .safetensors needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise CheckError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Strict load; a checkpoint whose every key carries one extra prefix (Lightning's `model.`) is tried
    without it."""
    tries = [state]
    heads = {key.split(".", 1)[0] for key in state}
    if len(heads) == 1 and all("." in key for key in state):
        head = heads.pop() + "."
        tries.append({key[len(head):]: value for key, value in state.items()})
    error = None
    for attempt in tries:
        try:
            model.load_state_dict(attempt, strict=True)
            return
        except RuntimeError as e:
            error = error or e
    first = str(error).splitlines()[1].strip() if error is not None and len(str(error).splitlines()) > 1 else str(error)
    raise CheckError(f"{path} does not fit the --model architecture: {first}")


def _hugging_face(path: str, input_shape: tuple[int, ...] | None) -> Loaded:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckError(f"{path} is a folder without config.json: a folder must be a Hugging Face model folder")
    try:
        import transformers
    except ImportError:
        raise CheckError("a Hugging Face folder needs transformers: pip install 'deadwatch[transformers]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = (cls or transformers.AutoModel).from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise CheckError(f"cannot build the Hugging Face model in {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    model.eval()
    if input_shape is None and getattr(config, "vocab_size", None):
        example: Any = {"input_ids": torch.randint(0, config.vocab_size, TOKENS)}
    else:
        example = example_input(model, input_shape)
    return Loaded(model, model.state_dict(), "hugging face", example)


def example_input(model: nn.Module, shape: tuple[int, ...] | None) -> torch.Tensor:
    """A dummy batch for the structure forward: `shape` if given, else from the first layer: Linear
    (2, in), ConvNd (2, C, 32, ...), Embedding token ids (2, 16)."""
    if shape is not None:
        return torch.randn(shape)
    for _, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return torch.randn(2, m.in_features)
        if isinstance(m, nn.modules.conv._ConvNd):
            return torch.randn(2, m.in_channels, *([32] * (m.weight.ndim - 2)))
        if isinstance(m, nn.Embedding):
            return torch.randint(0, m.num_embeddings, TOKENS)
        if next(m.parameters(recurse=False), None) is not None:
            break
    raise CheckError(f"cannot infer an input shape for {type(model).__name__}: pass --input-shape, e.g. 1,3,224,224")


# -- suspects: from the tensors alone
class Suspect(NamedTuple):
    tensor: str        # the module path the tensors belong to
    units: int
    suspects: list[int]
    rule: str          # "norm scale ~0, shift <= 0" or "zero row, bias <= 0"


def suspects(state: Mapping[str, torch.Tensor]) -> list[Suspect]:
    """Units that look dead from their tensors alone: unproved, since which layers feed which activation is
    not known without the structure."""
    found = []
    for key, weight in state.items():
        if not key.endswith(".weight") or not weight.is_floating_point():
            continue
        prefix = key[:-len(".weight")]
        bias = state.get(prefix + ".bias")
        if weight.ndim == 1 and prefix + ".running_mean" in state and bias is not None:
            hit = (weight.abs() <= SUSPECT_SCALE) & (bias <= 0)
            rule = "norm scale ~0, shift <= 0"
        elif weight.ndim >= 2:
            rows = weight.flatten(1)
            hit = (rows == 0).all(1) & (bias <= 0 if bias is not None and bias.shape == rows.shape[:1] else True)
            rule = "zero row, bias <= 0"
        else:
            continue
        units = hit.nonzero().flatten().tolist()
        if units:
            found.append(Suspect(prefix, int(hit.numel()), units, rule))
    return found


def batches_from(spec: str) -> Iterator[Any]:
    data = callable_from(spec, "--data")()
    try:
        return iter(data)
    except TypeError:
        raise CheckError(f"--data {spec!r} returned a {type(data).__name__}, which is not iterable") from None


# -- the `deadwatch check` command
def proved_only(report: Report) -> Report:
    """With no data, what the structure forward on a dummy batch saw proves nothing: the dead units are
    the certified ones only."""
    from .analysis import IDLE, status

    for layer in report.layers:
        if layer.status == IDLE:
            continue
        layer.dead_units = list(layer.certified_units)
        layer.dead_fraction = len(layer.dead_units) / layer.units if layer.units else 0.0
        layer.zero_fraction = layer.dormant_fraction = layer.saturated_fraction = None
        layer.dormant_units, layer.saturated_units, layer.rare_units, layer.flags = [], [], [], []
        layer.last_fired, layer.causes, layer.observations = None, [], 0
        layer.status = status(layer.dead_fraction, False, _config())
    return report


def _config() -> Config:
    from . import config
    return config.load(None)


def inspect(loaded: Loaded, data: str | None) -> Report:
    """The report of a loaded model: over --data (eval mode), else certificates from one dummy forward."""
    assert loaded.model is not None
    loaded.model.eval()
    batches = [loaded.example] if data is None else batches_from(data)
    try:
        report = scan(loaded.model, batches)
    except DeadwatchError:
        raise
    except Exception as e:
        what = "the --data batches" if data is not None else \
            f"a dummy input {tuple(loaded.example.shape) if isinstance(loaded.example, torch.Tensor) else ''}"
        raise CheckError(f"the model failed on {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         + ("; pass --input-shape with the shape it takes" if data is None else "")) from None
    return report if data is not None else proved_only(report)


def died(base: Report, now: Report, data: bool) -> dict[str, dict[str, list[int]]]:
    """Per site, the units certified (and, with data, dead) now and not in `base`."""
    before = {layer.name: layer for layer in base.layers}
    out: dict[str, dict[str, list[int]]] = {"newly_certified": {}, "newly_dead": {}}
    for layer in now.layers:
        old = before.get(layer.name)
        for key, units, was in (("newly_certified", layer.certified_units, old.certified_units if old else []),
                                ("newly_dead", layer.dead_units if data else [], old.dead_units if old else [])):
            new = sorted(set(units) - set(was))
            if new:
                out[key][layer.name] = new
    return out


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise CheckError(f"--input-shape {text!r} must be positive integers separated by commas, e.g. 1,3,224,224")
    return shape


def command(args: Any, out: Any, err: Any) -> int:
    """`deadwatch check`: exit 1 when --fail-on triggers, else 0 (errors: CheckError, exit 2)."""
    import json

    shape = parse_shape(args.input_shape)
    loaded = load(args.path, args.model, args.trust, shape)
    if loaded.model is None:
        if args.data or args.prune:
            raise CheckError("--data and --prune need the model's structure: a state dict holds none, pass --model "
                             "MODULE:CALLABLE")
        found = suspects(loaded.state)
        base = suspects(load(args.against, None, args.trust, shape).state) if args.against else None
        if args.json:
            print(json.dumps({"path": args.path, "format": loaded.format, "structure": False,
                              "suspects": [s._asdict() for s in found],
                              "against": None if base is None else {"base": args.against,
                                                                    "new_suspects": new_suspects(base, found)}}))
        else:
            print_suspects(out, args.path, loaded, found, base, args.against)
        return 0
    report = inspect(loaded, args.data)
    changes = None
    if args.against:
        base = load(args.against, args.model, args.trust, shape)
        if base.model is None:
            raise CheckError(f"--against {args.against}: no structure for it (pass --model)")
        changes = died(inspect(base, args.data), report, args.data is not None)
    result = None
    if args.prune:
        from .pruning import prune
        example = loaded.example if args.data is None else _first(batches_from(args.data))
        result = prune(loaded.model, report, example)
        try:
            torch.save(result.model if loaded.format == "whole model" else result.model.state_dict(), args.prune)
        except (OSError, RuntimeError) as e:  # torch.save: RuntimeError for a missing folder
            raise CheckError(f"--prune {args.prune}: cannot write it ({getattr(e, 'strerror', None) or e})") from None
    if args.json:
        print(json.dumps({"path": args.path, "format": loaded.format, "structure": True, "data": args.data is not None,
                          "report": report.to_dict(), "against": None if changes is None else
                          {"base": args.against, **changes}, "prune": None if result is None else result.to_dict()}))
    else:
        print_check(out, args.path, loaded.format, report, args.data is not None, changes, args.against, result)
    failing = [layer.name for layer in report.layers if args.fail_on == "certified" and layer.certified_units
               or args.fail_on == "dead" and layer.dead_units]
    if failing:
        err.print(f"deadwatch: {len(failing)} site(s) with {args.fail_on} units: {', '.join(failing)}",
                  markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0


def _first(batches: Iterator[Any]) -> Any:
    """The first batch's input (the scan before has checked that there is one)."""
    batch = next(batches)
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


# -- output, in the style of `deadwatch summary`
def new_suspects(base: list[Suspect], now: list[Suspect]) -> dict[str, list[int]]:
    before = {s.tensor: set(s.suspects) for s in base}
    return {s.tensor: sorted(set(s.suspects) - before.get(s.tensor, set())) for s in now
            if set(s.suspects) - before.get(s.tensor, set())}


def print_suspects(out: Any, path: str, loaded: Loaded, found: list[Suspect], base: list[Suspect] | None,
                   against: str | None) -> None:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from .cli import units_text
    from .reporters.console import print_fitted, site_column, title_line

    units = sum(s.units for s in found)
    title = title_line(f"{path} ({loaded.format}, {len(loaded.state)} tensors, no structure): "
                       f"{sum(len(s.suspects) for s in found)} suspect unit(s)")
    table = Table()
    site_column(table)
    for column in ("units", "suspects", "rule"):
        table.add_column(column, justify="right" if column != "rule" else "left")
    for s in found:
        table.add_row(Text(s.tensor), str(s.units), units_text(s.suspects), s.rule)
    lines = [Text("suspects are unproved: without the model's structure (which layer feeds which activation) "
                  "nothing is certified; pass --model MODULE:CALLABLE", style="yellow")]
    if not found:
        lines.insert(0, Text(f"no suspect among {units} units", style="green"))
    if base is not None:
        new = new_suspects(base, found)
        lines.append(Text(f"new since {against}: " + ("; ".join(f"{t}: {units_text(u)}" for t, u in new.items())
                                                      or "none")))
    print_fitted(out, Group(title, table, *lines))


def print_check(out: Any, path: str, fmt: str, report: Report, data: bool, changes: dict | None,
                against: str | None, result: Any) -> None:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from .analysis import STYLES
    from .cli import units_text
    from .reporters.console import certified_lines, dead_cell, headline, notes, print_fitted, site_column, title_line

    certified = sum(len(layer.certified_units) for layer in report.layers)
    title = title_line(f"{path} ({fmt}): {len(report.layers)} sites, {certified} certified unit(s), "
                       + (f"on the data: {headline(report)}" if data else "no data (dead = certified)"))
    table = Table()
    site_column(table)
    for column, justify in (("kind", "left"), ("units", "right"), ("dead", "right"), ("certified", "right"),
                            ("status", "left")):
        table.add_column(column, justify=justify)
    for layer in report.layers:
        table.add_row(Text(layer.name), Text(layer.kind), str(layer.units), dead_cell(layer),
                      str(len(layer.certified_units)), Text(layer.status, style=STYLES[layer.status]))
    lines = certified_lines(report)
    if changes is not None:
        for key, label in (("newly_certified", "newly certified"), ("newly_dead", "newly dead on the data")):
            if key == "newly_dead" and not data:
                continue
            text = "; ".join(f"{site}: {units_text(units)}" for site, units in changes[key].items()) or "none"
            lines.append(Text(f"{label} since {against}: {text}"))
    if result is not None:
        lines += [Text(line) for line in result.lines()]
    print_fitted(out, Group(title, table, *lines, *notes(report)))
