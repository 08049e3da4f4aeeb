"""Configuration: the packaged defaults (default.yaml), a user file or mapping, overrides.

Everything is validated here, when watch() is called, so that a bad key fails
before the first training step with one message naming the key.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import yaml

from .errors import ConfigError

REPORTERS = ("console", "jsonl", "tensorboard", "wandb", "mlflow")
SUBKEYS = {"thresholds": ("warn", "critical", "dormant", "saturated", "rare"), "saturation": ("share", "eps"),
           "recycle": ("every", "units", "max_fraction"), "activations": ("extra",), "wandb": ("project", "name"),
           "mlflow": ("experiment", "run_name")}
RECYCLE_UNITS = ("dead", "dormant")
FILE_REPORTERS = ("jsonl", "tensorboard")
FUNCTIONS = (
    "relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "silu", "mish",
    "hardswish", "rrelu", "softplus", "tanh", "sigmoid", "hardsigmoid",
)


@dataclass(frozen=True)
class Config:
    window: int
    report_every: int
    warn: float
    critical: float
    reporters: tuple[Any, ...]   # names (REPORTERS) and reporter objects (emit(report), close())
    image_every: int
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    count_eval: bool
    count_subsample: int
    watch_every: int
    functions: tuple[str, ...]
    unit_axis: tuple[tuple[str, int], ...]
    dormant_tau: float = 0.025
    saturation_share: float = 0.99
    saturation_eps: float = 0.01
    rare_rate: float = 0.01
    flag_at: tuple[tuple[str, float], ...] = (("dormant", 0.1), ("saturated", 0.1), ("rare", 0.1))
    recycle_every: int = 0          # recycle at every N-th periodic report; 0: never (off)
    recycle_units: str = "dead"     # RECYCLE_UNITS
    recycle_max_fraction: float = 0.1  # at most this share of a site's units per recycling
    wandb: tuple[tuple[str, str | None], ...] = (("project", "deadwatch"), ("name", None))  # a run deadwatch starts
    mlflow: tuple[tuple[str, str | None], ...] = (("experiment", "deadwatch"), ("run_name", None))
    fused: bool = True                # the fused statistics pass for CPU outputs (fused.py)
    activations_extra: tuple[str, ...] = ()  # dotted paths of more activation module classes
    extra_classes: tuple[type, ...] = field(default=(), compare=False)  # those classes, imported
    reporters_given: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The configuration in the shape of default.yaml."""
        return {
            "window": self.window,
            "report_every": self.report_every,
            "thresholds": {"warn": self.warn, "critical": self.critical, **dict(self.flag_at)},
            "reporters": [r if isinstance(r, str) else type(r).__name__ for r in self.reporters],
            "image_every": self.image_every,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "count_eval": self.count_eval,
            "count_subsample": self.count_subsample,
            "fused": self.fused,
            "watch_every": self.watch_every,
            "functions": list(self.functions),
            "unit_axis": dict(self.unit_axis),
            "dormant_tau": self.dormant_tau,
            "saturation": {"share": self.saturation_share, "eps": self.saturation_eps},
            "rare_rate": self.rare_rate,
            "recycle": {"every": self.recycle_every, "units": self.recycle_units,
                        "max_fraction": self.recycle_max_fraction},
            "wandb": dict(self.wandb),
            "mlflow": dict(self.mlflow),
            "activations": {"extra": list(self.activations_extra)},
        }


def default_mapping() -> dict[str, Any]:
    """The packaged default.yaml as a mapping."""
    text = resources.files("deadwatch").joinpath("default.yaml").read_text()
    return yaml.safe_load(text)


def load(config: str | os.PathLike | Mapping | None = None, **overrides: Any) -> Config:
    """Merge defaults, `config` (None, a YAML path or a mapping) and `overrides`; validate."""
    merged = default_mapping()
    given: set[str] = set()
    for source, what in ((_read(config), "config"), (overrides, "override")):
        if not isinstance(source, Mapping):
            raise ConfigError(f"{what} must be a mapping of keys to values, got {type(source).__name__}")
        for key, value in source.items():
            if key not in merged:
                raise ConfigError(f"unknown config key {key!r}; allowed: {', '.join(sorted(merged))}")
            if key in SUBKEYS and isinstance(value, Mapping):
                for sub in value:
                    if sub not in SUBKEYS[key]:
                        allowed = ", ".join(f"{key}.{s}" for s in SUBKEYS[key])
                        raise ConfigError(f"unknown config key '{key}.{sub}'; allowed: {allowed}")
                merged[key] = {**merged[key], **value}
            elif key == "reporters" and isinstance(value, (list, tuple)):
                merged[key] = list(value)  # reporter objects are the caller's: not copied
            else:
                merged[key] = copy.deepcopy(value)
            given.add(key)
    return _validate(merged, reporters_given="reporters" in given)


def _read(config: str | os.PathLike | Mapping | None) -> Mapping:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config must be None, a path to a YAML file or a mapping, got {type(config).__name__}")
    try:
        with open(config, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(config)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {os.fspath(config)!r} cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {os.fspath(config)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {os.fspath(config)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads 1e-2 as text: write 0.01 or 1.0e-2)"
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number in [0, 1], got {value!r}{hint}")
    return float(value)


def _names(key: str, value: Any, allowed: tuple[str, ...] | None = None, regex: bool = True) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{key} must be a list of strings, got item {item!r}")
        if allowed is not None and item not in allowed:
            raise ConfigError(f"{key} has {item!r}; allowed: {', '.join(allowed)}")
        if allowed is None and regex:
            _regex(key, item)
    return tuple(value)


def _reporters(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"reporters must be a list, got {value!r}")
    for item in value:
        if isinstance(item, str):
            if item not in REPORTERS:
                raise ConfigError(f"reporters has {item!r}; allowed: {', '.join(REPORTERS)}, "
                                  f"or an object with emit(report) and close()")
        elif not (callable(getattr(item, "emit", None)) and callable(getattr(item, "close", None))):
            raise ConfigError(f"reporters has {item!r}, which is neither a reporter name ({', '.join(REPORTERS)}) "
                              f"nor an object with emit(report) and close()")
    out: list[Any] = []
    for item in value:  # a name or object listed twice reports once
        if not any(item is o or (isinstance(item, str) and item == o) for o in out):
            out.append(item)
    return tuple(out)


def _classes(paths: tuple[str, ...]) -> tuple[type, ...]:
    """activations.extra: dotted paths of nn.Module subclasses ("package.module.QuickGELU"), imported."""
    from torch import nn

    out = []
    for path in paths:
        found, why, parts = None, "it names no module", path.split(".")
        for i in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
            try:
                found = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                found = getattr(found, attr, None)
            why = f"module {'.'.join(parts[:i])!r} has no {'.'.join(parts[i:])!r}"
            break
        if found is None:
            raise ConfigError(f"activations.extra has {path!r}, which does not resolve ({why}); each item must be "
                              f"the dotted path of an activation class, a torch.nn.Module subclass "
                              f"(e.g. 'mypackage.layers.QuickGELU')")
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise ConfigError(f"activations.extra has {path!r}, which is {found!r}, not a torch.nn.Module subclass; "
                              f"each item must be the dotted path of an activation module class")
        out.append(found)
    return tuple(out)


def _regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key} has an invalid regular expression {pattern!r}: {e}") from None


def _validate(m: dict[str, Any], reporters_given: bool) -> Config:
    thresholds = m["thresholds"]
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"thresholds must be a mapping with warn and critical, got {thresholds!r}")
    flag_at = tuple((name, _fraction(f"thresholds.{name}", thresholds[name])) for name in ("dormant", "saturated", "rare"))
    warn = _fraction("thresholds.warn", thresholds["warn"])
    critical = _fraction("thresholds.critical", thresholds["critical"])
    if warn > critical:
        raise ConfigError(f"thresholds.warn ({warn}) must not exceed thresholds.critical ({critical})")
    saturation = m["saturation"]
    if not isinstance(saturation, Mapping):
        raise ConfigError(f"saturation must be a mapping with share and eps, got {saturation!r}")
    share = _fraction("saturation.share", saturation["share"])
    if share == 0:
        raise ConfigError("saturation.share must be above 0 (a share of 0 calls every unit saturated), got 0")
    eps = _fraction("saturation.eps", saturation["eps"])
    if not eps < 0.5:
        raise ConfigError(f"saturation.eps must be below 0.5 (a fraction of the output range from each bound), "
                          f"got {eps}")
    recycle = m["recycle"]
    if not isinstance(recycle, Mapping):
        raise ConfigError(f"recycle must be a mapping with every, units and max_fraction, got {recycle!r}")
    every = recycle["every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"recycle.every must be a non-negative integer (reports between recyclings; 0 turns "
                          f"recycling off), got {every!r}")
    if recycle["units"] not in RECYCLE_UNITS:
        raise ConfigError(f"recycle.units must be one of {', '.join(RECYCLE_UNITS)}, got {recycle['units']!r}")
    max_fraction = _fraction("recycle.max_fraction", recycle["max_fraction"])
    if max_fraction == 0:
        raise ConfigError("recycle.max_fraction must be above 0 (it caps the share of a site's units recycled at "
                          "once), got 0")
    names = {}
    for key, required in (("wandb", "project"), ("mlflow", "experiment")):
        if not isinstance(m[key], Mapping):
            raise ConfigError(f"{key} must be a mapping with {', '.join(SUBKEYS[key])}, got {m[key]!r}")
        for sub in SUBKEYS[key]:
            value = m[key][sub]
            if not (isinstance(value, str) and value) and not (value is None and sub != required):
                what = "a non-empty string" if sub == required else "a non-empty string or null"
                raise ConfigError(f"{key}.{sub} must be {what}, got {value!r}")
        names[key] = tuple((sub, m[key][sub]) for sub in SUBKEYS[key])
    activations = m["activations"]
    if not isinstance(activations, Mapping):
        raise ConfigError(f"activations must be a mapping with extra, got {activations!r}")
    extra_paths = _names("activations.extra", activations["extra"], regex=False)
    extra = _classes(extra_paths)
    for key in ("count_eval", "fused"):
        if not isinstance(m[key], bool):
            raise ConfigError(f"{key} must be true or false, got {m[key]!r}")
    axes = m["unit_axis"] or {}
    if not isinstance(axes, Mapping):
        raise ConfigError(f"unit_axis must be a mapping of site regex to dim, got {axes!r}")
    for pattern, dim in axes.items():
        if not isinstance(pattern, str):
            raise ConfigError(f"unit_axis keys must be regex strings, got {pattern!r}")
        _regex("unit_axis", pattern)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ConfigError(f"unit_axis[{pattern!r}] must be an integer dim, got {dim!r}")
    return Config(
        window=_int("window", m["window"]),
        report_every=_int("report_every", m["report_every"]),
        warn=warn,
        critical=critical,
        reporters=_reporters(m["reporters"]),
        image_every=_int("image_every", m["image_every"]),
        include=_names("include", m["include"]),
        exclude=_names("exclude", m["exclude"]),
        count_eval=m["count_eval"],
        count_subsample=_int("count_subsample", m["count_subsample"]),
        fused=m["fused"],
        watch_every=_int("watch_every", m["watch_every"]),
        functions=tuple(dict.fromkeys(_names("functions", m["functions"], FUNCTIONS))),
        unit_axis=tuple(axes.items()),
        dormant_tau=_fraction("dormant_tau", m["dormant_tau"]),
        saturation_share=share,
        saturation_eps=eps,
        rare_rate=_fraction("rare_rate", m["rare_rate"]),
        flag_at=flag_at,
        recycle_every=every,
        recycle_units=recycle["units"],
        recycle_max_fraction=max_fraction,
        wandb=names["wandb"],
        mlflow=names["mlflow"],
        activations_extra=extra_paths,
        extra_classes=extra,
        reporters_given=reporters_given,
    )
