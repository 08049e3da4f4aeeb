"""Configuration: packaged defaults, documentation of every key, validation with errors naming the key."""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import deadwatch
import deadwatch.capture
from deadwatch import ConfigError
from deadwatch.config import FILE_REPORTERS, FUNCTIONS, REPORTERS, load

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "configs" / "default.yaml"


def packaged_text() -> str:
    return resources.files("deadwatch").joinpath("default.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# defaults


def test_configs_default_yaml_is_the_packaged_default():
    assert DEFAULT_YAML.read_text() == packaged_text()


def test_defaults_equal_configs_default_yaml():
    expected = yaml.safe_load(DEFAULT_YAML.read_text())
    assert load().to_dict() == expected
    assert deadwatch.config.default_mapping() == expected


def test_default_values_are_the_documented_ones():
    c = load()
    assert c.window == 100 and c.report_every == 100
    assert c.warn == 0.01 and c.critical == 0.10
    assert c.reporters == ("console", "jsonl", "tensorboard")
    assert c.include == () and c.exclude == ()
    assert c.count_eval is False
    assert c.functions == ("relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "silu", "mish", "hardswish")
    assert c.unit_axis == ()
    assert c.reporters_given is False


def _paragraphs(text: str) -> list[list[str]]:
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def test_every_key_is_documented_with_a_comment():
    text = DEFAULT_YAML.read_text()
    data = yaml.safe_load(text)
    documented = {}
    for para in _paragraphs(text):
        comments = []
        for line in para:
            if line.lstrip().startswith("#"):
                comments.append(line.lstrip("# ").strip())
                continue
            m = re.match(r"^(\w+):", line)
            if m:
                parent = m.group(1)
                documented[parent] = " ".join(comments)
            m = re.match(r"^\s+(\w+):", line)
            if m:  # a nested key: documented by its parent's comment
                documented[f"{parent}.{m.group(1)}"] = documented[parent]
    assert set(data) <= set(documented), f"keys not found in the text: {set(data) - set(documented)}"
    for key, comment in documented.items():
        assert comment, f"{key} has no comment above it"
        if "." in key:
            assert key.split(".")[1] in comment, f"{key} is not mentioned in its comment"
    for key, value in data.items():
        if isinstance(value, dict):
            for sub in value:
                assert f"{key}.{sub}" in documented


def test_documented_allowed_values_match_the_code():
    text = " ".join(line.lstrip("# ").strip() for line in DEFAULT_YAML.read_text().splitlines()
                    if line.startswith("#"))
    allowed = re.search(r"Allowed: ([^.]*)\.", text).group(1)
    assert tuple(x.strip() for x in allowed.split(",")) == FUNCTIONS
    reporters = re.search(r"any of (console[^.]*)\.", text).group(1)
    assert tuple(x.strip() for x in reporters.split(",")) == REPORTERS


def test_defaults_are_not_mutated_by_loading():
    mapping = {"thresholds": {"warn": 0.2, "critical": 0.5}, "include": ["a"], "unit_axis": {"x": -1}}
    snapshot = copy.deepcopy(mapping)
    c = load(mapping, window=3)
    assert mapping == snapshot
    assert c.warn == 0.2 and c.include == ("a",) and c.unit_axis == (("x", -1),)
    assert load().to_dict() == yaml.safe_load(DEFAULT_YAML.read_text())


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, deadwatch.DeadwatchError)
    with pytest.raises(ValueError):
        load(window=0)


# ---------------------------------------------------------------------------------------------
# validation: every error names the key

BAD = [
    # unknown keys
    ({"windw": 10}, "windw"),
    ({"thresholds": {"warning": 0.1}}, "thresholds.warning"),
    # window / report_every: positive integers, not bool
    ({"window": 0}, "window"),
    ({"window": -5}, "window"),
    ({"window": True}, "window"),
    ({"window": False}, "window"),
    ({"window": 1.5}, "window"),
    ({"window": "10"}, "window"),
    ({"window": None}, "window"),
    ({"report_every": 0}, "report_every"),
    ({"report_every": -1}, "report_every"),
    ({"report_every": True}, "report_every"),
    ({"report_every": 2.0}, "report_every"),
    # thresholds
    ({"thresholds": 0.1}, "thresholds"),
    ({"thresholds": {"warn": "0.1"}}, "thresholds.warn"),
    ({"thresholds": {"warn": True}}, "thresholds.warn"),
    ({"thresholds": {"warn": -0.01}}, "thresholds.warn"),
    ({"thresholds": {"critical": 1.5}}, "thresholds.critical"),
    ({"thresholds": {"critical": None}}, "thresholds.critical"),
    ({"thresholds": {"warn": 0.5, "critical": 0.2}}, "thresholds.warn"),
    ({"thresholds": {"warn": 0.5}}, "thresholds.warn"),            # above the default critical
    ({"thresholds": {"critical": 0.001}}, "thresholds.critical"),  # below the default warn
    # reporters
    ({"reporters": ["console", "wandbb"]}, "reporters"),
    ({"reporters": "console"}, "reporters"),
    ({"reporters": [1]}, "reporters"),
    # wandb / mlflow names
    ({"wandb": {"project": ""}}, "wandb.project"),
    ({"wandb": {"project": None}}, "wandb.project"),
    ({"wandb": {"name": 3}}, "wandb.name"),
    ({"wandb": "proj"}, "wandb"),
    ({"mlflow": {"experiment": None}}, "mlflow.experiment"),
    ({"mlflow": {"run_name": ""}}, "mlflow.run_name"),
    ({"mlflow": {"run": "x"}}, "mlflow.run"),
    # include / exclude: lists of valid regexes
    ({"include": "conv"}, "include"),
    ({"include": ["(unclosed"]}, "include"),
    ({"include": [3]}, "include"),
    ({"exclude": ["[a-"]}, "exclude"),
    ({"exclude": {"a": 1}}, "exclude"),
    # count_eval: a bool
    ({"count_eval": "yes"}, "count_eval"),
    ({"count_eval": 1}, "count_eval"),
    # functions
    ({"functions": ["relu", "softmax"]}, "functions"),
    ({"functions": "relu"}, "functions"),
    ({"functions": [None]}, "functions"),
    # unit_axis
    ({"unit_axis": [1]}, "unit_axis"),
    ({"unit_axis": {"(": 1}}, "unit_axis"),
    ({"unit_axis": {"fc": "1"}}, "unit_axis"),
    ({"unit_axis": {"fc": True}}, "unit_axis"),
    ({"unit_axis": {"fc": 1.0}}, "unit_axis"),
    ({"unit_axis": {1: 1}}, "unit_axis"),
]


def _names_key(message: str, key: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message) is not None


@pytest.mark.parametrize("values,key", BAD, ids=[f"{k}={v!r}" for v, k in BAD])
def test_bad_value_as_override_names_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        load(**values)
    assert _names_key(str(info.value), key), str(info.value)


@pytest.mark.parametrize("values,key", BAD, ids=[f"{k}={v!r}" for v, k in BAD])
def test_bad_value_in_mapping_names_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        load(values)
    assert _names_key(str(info.value), key), str(info.value)


@pytest.mark.parametrize("values,key", BAD[:12], ids=[f"{k}={v!r}" for v, k in BAD[:12]])
def test_bad_value_in_yaml_file_names_the_key(values, key, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert _names_key(str(info.value), key), str(info.value)


def test_error_names_key_check_can_fail():
    assert not _names_key("report_every must be a positive integer", "window")
    assert not _names_key("thresholds.warn must be in [0, 1]", "thresholds.critical")
    assert not _names_key("thresholds.warn must be in [0, 1]", "warn")


def _wrong_values(default):
    """Values of the wrong type (or out of range) for a key whose default is `default`."""
    if isinstance(default, bool):
        return ["yes", 1, None, [True]]
    if isinstance(default, int):
        return [0, -1, True, False, "1", 1.5, None, [1]]
    if isinstance(default, float):  # fractions (dormant_tau, rare_rate)
        return ["0.1", True, None, -0.5, 1.5, [0.1]]
    if isinstance(default, list):
        return ["relu", 5, {"a": 1}]
    if isinstance(default, dict):
        return [[1], 5, "x"]
    raise AssertionError(f"no wrong values for {default!r}")


def _generic_cases():
    cases = []
    for key, default in yaml.safe_load(DEFAULT_YAML.read_text()).items():
        if key == "thresholds":
            for sub in default:
                cases += [({key: {sub: v}}, f"{key}.{sub}") for v in ("0.1", True, None, -0.5, 1.5, [0.1])]
            continue
        cases += [({key: v}, key) for v in _wrong_values(default)]
    return cases


GENERIC = _generic_cases()


@pytest.mark.parametrize("values,key", GENERIC, ids=[f"{k}={list(v.values())[0]!r}" for v, k in GENERIC])
def test_every_key_rejects_wrong_values(values, key):
    """Derived from default.yaml, so keys added later are covered too."""
    with pytest.raises(ConfigError) as info:
        load(**values)
    assert _names_key(str(info.value), key), str(info.value)


def test_good_edge_values_are_accepted():
    c = load(window=1, report_every=1, thresholds={"warn": 0.3, "critical": 0.3}, reporters=[],
             include=[r"^features\.\d+$"], exclude=["head"], count_eval=True, functions=[],
             unit_axis={r"encoder\.act": -1})
    assert (c.window, c.report_every, c.warn, c.critical) == (1, 1, 0.3, 0.3)
    assert c.reporters == () and c.functions == () and c.count_eval is True
    assert c.unit_axis == ((r"encoder\.act", -1),)
    assert load(thresholds={"warn": 0, "critical": 1}).critical == 1.0


def test_partial_thresholds_keep_the_other_default():
    c = load(thresholds={"critical": 0.5})
    assert c.warn == 0.01 and c.critical == 0.5


def test_watch_validates_before_attaching():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    f_relu = torch.nn.functional.relu
    with pytest.raises(ConfigError, match="window"):
        deadwatch.watch(model, reporters=[], window=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.nn.functional.relu is f_relu
    assert deadwatch.capture.active_function_patches() == 0


def test_config_of_wrong_type_is_config_error():
    with pytest.raises(ConfigError, match="config"):
        load(42)
    with pytest.raises(ConfigError, match="config"):
        load(["window", 3])


# ---------------------------------------------------------------------------------------------
# YAML files, overrides


def test_yaml_file_path_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("window: 7\nthresholds:\n  critical: 0.5\ninclude: ['^features']\nreporters: [console]\n")
    for given in (path, str(path)):
        c = load(given)
        assert c.window == 7 and c.critical == 0.5 and c.warn == 0.01
        assert c.include == ("^features",)
        assert c.reporters == ("console",) and c.reporters_given
        assert c.report_every == 100  # left out: default


def test_yaml_file_through_watch(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("window: 3\nreporters: []\nfunctions: []\n")
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with deadwatch.watch(model, config=path) as monitor:
        assert monitor.config.window == 3 and monitor.config.functions == ()
        assert monitor._reporters == []


def test_empty_yaml_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load(path) == load()


def test_missing_file_is_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert "nope.yaml" in str(info.value)
    with pytest.raises(ConfigError):
        deadwatch.watch(nn.Linear(2, 2), config=str(missing))


def test_invalid_yaml_and_non_mapping_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("window: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- window\n- 3\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load(listing)


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("window: 7\nreport_every: 5\nthresholds: {warn: 0.05, critical: 0.5}\n")
    c = load(path, window=9, thresholds={"warn": 0.2})
    assert c.window == 9 and c.report_every == 5
    assert c.warn == 0.2 and c.critical == 0.5
    c = load({"window": 7}, window=11)
    assert c.window == 11


def test_bad_override_over_good_file_names_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("window: 7\n")
    with pytest.raises(ConfigError, match="report_every"):
        load(path, report_every=0)


# ---------------------------------------------------------------------------------------------
# reporters and logdir


@pytest.mark.parametrize("reporters", [["jsonl"], ["tensorboard"], ["console", "jsonl", "tensorboard"]])
def test_requested_file_reporters_without_logdir_is_config_error(reporters, tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ConfigError) as info:
        deadwatch.watch(model, reporters=reporters)
    assert "logdir" in str(info.value) and "reporters" in str(info.value)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"reporters": reporters}))
    with pytest.raises(ConfigError, match="logdir"):
        deadwatch.watch(model, config=path)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert deadwatch.capture.active_function_patches() == 0


def test_default_reporters_without_logdir_keep_console_only():
    from deadwatch.reporters.console import ConsoleReporter

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    monitor = deadwatch.watch(model)
    try:
        assert [type(r) for r in monitor._reporters] == [ConsoleReporter]
    finally:
        monitor.close()  # no step: prints nothing
    assert set(FILE_REPORTERS) <= set(REPORTERS)


def test_console_only_without_logdir_is_fine():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with deadwatch.watch(model, reporters=["console", "console"]) as monitor:
        assert len(monitor._reporters) == 1
        assert monitor.config.reporters == ("console",)
