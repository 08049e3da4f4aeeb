"""Why units died: causes ranked by the evidence the run left, for flagged sites, in the report path.

Each rule looks at one kind of evidence and scores in [0, 1] how much of the site's dead units it
explains; rules that find no evidence say nothing. Nothing here runs in the hook path.

  negative_bias    the dead units' biases (of the layer feeding the activation) sit far below the
                   live units' biases
  lr_spike         the dead units last fired right after the learning rate jumped
  dead_from_start  the dead units never fired since the site first ran, with ordinary biases:
                   initialisation, or inputs that never reach them
  dead_input       the site feeding this one is itself mostly dead
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

SPIKE_FACTOR = 2.0    # a learning-rate change by at least this factor up is a jump
SPIKE_AFTER = 5       # deaths up to this many steps after the learning rate came down again count for a jump
BIAS_GAP = 3.0        # dead units' median bias this many live spreads below the live median
DEAD_INPUT = 0.5      # a feeding site with at least this dead fraction starves this one


REMEDIES = {
    "negative_bias": "lower the LR or clip gradients; init biases at 0 or small positive; LeakyReLU/ELU",
    "lr_spike": "lower the peak LR or lengthen the warm-up; clip gradients",
    "dead_from_start": "check the init (He for ReLU) and the inputs' range (normalise them)",
    "dead_input": "fix the site feeding it first",
}


@dataclass
class Cause:
    code: str
    score: float      # share of the site's dead units this explains, 0..1
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hint(self) -> str:
        return f"{self.code} ({self.evidence}): {REMEDIES.get(self.code, '')}".rstrip(": ")


@dataclass
class Evidence:
    """What the run left for one site, gathered by the monitor at report time."""

    dead_units: list[int]
    last_fired: Sequence[int]                 # per unit: training step (from 1) it last fired, -1 never
    bias: np.ndarray | None = None            # the producer layer's bias, per unit (None: not found)
    bias_name: str | None = None
    lr_changes: Sequence[tuple[int, tuple[float, ...]]] = ()  # (step from 1, lr per param group) at each change
    input_site: str | None = None             # the site feeding this one, and its dead fraction
    input_dead_fraction: float | None = None


def explain(ev: Evidence) -> list[Cause]:
    """Causes for a site's dead units, best first."""
    if not ev.dead_units:
        return []
    causes = [c for c in (_negative_bias(ev), _lr_spike(ev), _dead_from_start(ev), _dead_input(ev)) if c]
    return sorted(causes, key=lambda c: -c.score)


def _biases_apart(ev: Evidence) -> tuple[float, float, bool] | None:
    """(median bias of dead units, of live units, far apart) when the producer's bias is known."""
    if ev.bias is None or len(ev.bias) != len(ev.last_fired):
        return None
    dead = np.zeros(len(ev.bias), dtype=bool)
    dead[ev.dead_units] = True
    if dead.all():  # no live unit to compare with
        return None
    live = ev.bias[~dead]
    spread = max(float(np.median(np.abs(live - np.median(live)))) * 1.4826, 1e-3 + 0.05 * abs(float(np.median(live))))
    d, l = float(np.median(ev.bias[dead])), float(np.median(live))
    return d, l, d < l - BIAS_GAP * spread


def _negative_bias(ev: Evidence) -> Cause | None:
    apart = _biases_apart(ev)
    if apart is None or not apart[2]:
        return None
    d, l, _ = apart
    dead = ev.bias[ev.dead_units]
    live_min = np.min(np.delete(ev.bias, ev.dead_units))
    share = float(np.mean(dead < live_min))
    return Cause("negative_bias", share, f"{ev.bias_name or 'bias'}: median {d:.3g} for the dead units, "
                                         f"{l:.3g} for the live ones")


def _lr_spike(ev: Evidence) -> Cause | None:
    """Deaths from the step before a jump up in the learning rate to SPIKE_AFTER steps after it came down."""
    died = np.asarray(ev.last_fired)[ev.dead_units]
    died = died[died > 0]
    if not died.size:
        return None
    best = None
    changes = list(ev.lr_changes)
    for i in range(1, len(changes)):
        (step, lrs), (_, before) = changes[i], changes[i - 1]
        factor = max((a / b for a, b in zip(lrs, before) if b > 0), default=0.0)
        if factor < SPIKE_FACTOR:
            continue
        down = next((s for s, later in changes[i + 1:] if any(a < b for a, b in zip(later, lrs))), step)
        near = died[(died >= step - 1) & (died <= down + SPIKE_AFTER)]
        if near.size and (best is None or near.size > best[0].size):
            best = (near, step, factor)
    if best is None:
        return None
    near, step, factor = best
    when = f"step {near.min()}" if near.min() == near.max() else f"steps {near.min()}–{near.max()}"
    return Cause("lr_spike", near.size / len(ev.dead_units),
                 f"learning rate x{factor:.3g} at step {step}; {near.size} of {len(ev.dead_units)} dead units "
                 f"last fired at {when}")


def _dead_from_start(ev: Evidence) -> Cause | None:
    never = int(np.sum(np.asarray(ev.last_fired)[ev.dead_units] < 0))
    if not never:
        return None
    apart = _biases_apart(ev)
    if apart is not None and apart[2]:
        return None  # biases far below: that is negative_bias, whenever it happened
    note = "" if apart is None else f"; their biases look like the live ones (median {apart[0]:.3g})"
    return Cause("dead_from_start", never / len(ev.dead_units),
                 f"{never} of {len(ev.dead_units)} dead units never fired since the site first ran{note}: "
                 f"initialisation, or inputs that never reach them")


def _dead_input(ev: Evidence) -> Cause | None:
    if ev.input_dead_fraction is None or ev.input_dead_fraction < DEAD_INPUT:
        return None
    return Cause("dead_input", ev.input_dead_fraction,
                 f"the site feeding it, {ev.input_site}, is {100 * ev.input_dead_fraction:.0f}% dead")
