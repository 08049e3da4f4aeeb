"""deadwatch: find dead units in PyTorch training runs, per layer and per unit."""

from .analysis import LayerReport, Report
from .config import Config
from .errors import ConfigError, DeadwatchError, RunLogError
from .monitor import Monitor, watch

__version__ = "0.1.0"
__all__ = ["watch", "Monitor", "Report", "LayerReport", "Config", "ConfigError", "DeadwatchError",
           "RunLogError", "__version__"]
