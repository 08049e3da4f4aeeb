"""Capture: which activations are watched, where they run (sites), and which axis holds units.

  activations.py  what counts as an activation, and the value at which it fires
  axis.py         the unit axis of an activation's output
  functions.py    activation functions called inside forward, intercepted process-wide
  hooks.py        the hooks a Capture keeps on one model, its sites and their names
"""

from .activations import is_activation
from .functions import active_function_patches
from .hooks import Capture, SiteKey

__all__ = ["Capture", "SiteKey", "active_function_patches", "is_activation"]
