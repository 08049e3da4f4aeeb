"""deadwatch: find dead units in PyTorch training runs, per layer and per unit.

The names below are imported on first use, so that `import deadwatch` (and the `deadwatch` command,
which only reads run logs) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["watch", "scan", "prune", "PruneResult", "Monitor", "Report", "LayerReport", "Config", "ConfigError", "DeadwatchError",
           "RunLogError", "__version__"]

# prune() lives in `pruning`: a submodule named `prune` would replace the function on import
_HOMES = {"watch": "monitor", "scan": "check", "prune": "pruning", "PruneResult": "pruning", "Monitor": "monitor", "Report": "analysis", "LayerReport": "analysis",
          "Config": "config", "ConfigError": "errors", "DeadwatchError": "errors", "RunLogError": "errors"}
_SUBMODULES = {"analysis", "capture", "causes", "certify", "check", "cli", "config", "demo", "errors", "integrations",
               "monitor", "pruning", "recycle", "reporters", "stats", "sync"}

if TYPE_CHECKING:
    from .analysis import LayerReport, Report
    from .config import Config
    from .errors import ConfigError, DeadwatchError, RunLogError
    from .check import scan
    from .monitor import Monitor, watch
    from .pruning import PruneResult, prune


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    elif name in _SUBMODULES:  # `deadwatch.config.load(...)` after a bare `import deadwatch`
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
