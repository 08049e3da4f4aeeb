"""Why units died: causes ranked by the evidence the run left, for flagged sites, in the report path.

Each rule looks at one kind of evidence and says how many of the site's dead units it explains;
rules that find no evidence say nothing. A cause's score is that share (0..1). Nothing here runs in
the hook path.

  lr_spike         the dead units last fired around a jump of the learning rate well above any rate
                   the run had used before (a schedule's warm-up, decay or one-cycle ramp is no jump)
  large_update     the dead units last fired while the updates of the layer feeding them were large
                   for its weights (||dW|| / ||W|| far above the usual ~1e-3)
  negative_bias    the dead units' shift (the norm's bias when a norm sits between the layer and the
                   activation, else the layer's own bias) sits far below the live units'
  dead_input       the site feeding this one is itself mostly dead
  dead_from_start  the dead units never fired since the site first ran, with ordinary biases:
                   initialisation, or inputs that never reach them

The headline hint names the top cause only when it explains at least HEADLINE of the dead units;
otherwise the generic hint for the status stays (a 2-of-84 story is no diagnosis).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

SPIKE_FACTOR = 2.0    # a rate at least this many times the highest the run had used before is a jump
SPIKE_AFTER = 20      # deaths up to this many steps after the jump ended count for it: momentum (0.9)
                      # carries its updates on, 0.9**20 = 0.12
BIAS_GAP = 3.0        # dead units' median bias this many live spreads below the live median
DEAD_INPUT = 0.5      # a feeding site with at least this dead fraction starves this one
UPDATE_USUAL = 1e-3   # the usual ||dW|| / ||W|| of one optimizer step (Adam or SGD at a sane rate)
UPDATE_LARGE = 2e-2   # twenty times that: updates that push a layer's units off within a few steps
UPDATE_AROUND = 5     # deaths this many steps either side of a large update count for it
HEADLINE = 0.5        # the top cause headlines the hint when it explains at least this share of dead units

# The order of causes that explain as many units: the more specific story first (a spike makes the
# updates large, which drive biases down).
ORDER = ("lr_spike", "large_update", "negative_bias", "dead_input", "dead_from_start")

REMEDIES = {
    "lr_spike": "lower the peak LR or lengthen the warm-up; clip gradients",
    "large_update": "lower the LR (or add warm-up) for this layer; clip gradients",
    "negative_bias": "lower the LR or clip gradients; init biases at 0 or small positive; LeakyReLU/ELU",
    "dead_input": "fix the site feeding it first",
    "dead_from_start": "check the init (He for ReLU) and the inputs' range (normalise them)",
}


@dataclass
class Cause:
    code: str
    score: float      # share of the site's dead units this explains, 0..1
    evidence: str
    units: int = 0    # how many of the site's dead units it explains (0 in run logs written before)
    dead: int = 0     # of how many

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hint(self) -> str:
        """'lr_spike (score 0.95, 54 of 57 dead units): <evidence>. Try: <remedy>' (run logs written before
        the counts: the score alone)."""
        remedy = REMEDIES.get(self.code)
        share = f", {self.units} of {self.dead} dead units" if self.dead else ""
        return f"{self.code} (score {self.score:.2f}{share}): {self.evidence}" + (f". Try: {remedy}" if remedy else "")


@dataclass
class Evidence:
    """What the run left for one site, gathered by the monitor at report time."""

    dead_units: list[int]
    last_fired: Sequence[int]                 # per unit: training step (from 1) it last fired, -1 never
    bias: np.ndarray | None = None            # the units' shift parameter, per unit (None: there is none)
    bias_name: str | None = None
    lr_changes: Sequence[tuple[int, tuple[float, ...]]] = ()  # (step from 1, lr per param group) at each change
    input_site: str | None = None             # the site feeding this one, and its dead fraction
    input_dead_fraction: float | None = None
    update_layer: str | None = None           # the producer's weight whose updates were measured
    update_spans: Sequence[tuple[int, int]] = ()  # (first, last step) each measured ratio stands for
    update_ratios: Sequence[float] = ()       # ||dW|| / ||W||: the largest measured in each span


def explain(ev: Evidence) -> list[Cause]:
    """Causes for a site's dead units, best first."""
    if not ev.dead_units:
        return []
    rules = (_lr_spike, _large_update, _negative_bias, _dead_input, _dead_from_start)
    causes = [c for c in (rule(ev) for rule in rules) if c is not None and c.score > 0]
    return sorted(causes, key=lambda c: (-c.score, ORDER.index(c.code)))


def headline(causes: Sequence[Cause]) -> Cause | None:
    """The cause the hint names: the top one, when it explains at least HEADLINE of the dead units."""
    return causes[0] if causes and causes[0].score >= HEADLINE else None


def _cause(code: str, explained: int, ev: Evidence, evidence: str) -> Cause:
    dead = len(ev.dead_units)
    return Cause(code, explained / dead, evidence, units=explained, dead=dead)


def _died(ev: Evidence) -> np.ndarray:
    """The steps the dead units that fired at all last fired."""
    died = np.asarray(ev.last_fired)[ev.dead_units]
    return died[died > 0]


def _biases_apart(ev: Evidence) -> tuple[float, float, bool] | None:
    """(median bias of dead units, of live units, far apart) when the units' shift parameter is known."""
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
    return _cause("negative_bias", int(np.sum(dead < live_min)), ev,
                  f"{ev.bias_name or 'bias'}: median {d:.3g} for the dead units, {l:.3g} for the live ones")


def spikes(lr_changes: Sequence[tuple[int, tuple[float, ...]]]) -> list[tuple[int, int, float]]:
    """The jumps of a learning-rate history: (step, last step of the jump, factor).

    A jump at step s: some param group's rate at s is at least SPIKE_FACTOR times the highest it had
    at any earlier step, and its rise into s is at least SPIKE_FACTOR times its rise into the step
    before and into the step after. The second test is what a schedule fails: a warm-up rises by
    about as much at every step (doubling its rate early on, from a tiny one), a one-cycle or cosine
    ramp changes smoothly; a jump is a step apart from its neighbours. A rate that goes back to one
    used before (warm restarts) is no jump either. The jump lasts while the rate stays at least
    SPIKE_FACTOR times that earlier peak."""
    changes = list(lr_changes)
    found = []
    if not changes:
        return found

    def rate(i: int, g: int, step: int) -> float:
        """Group g's rate at `step`, from change i (at or before it) on."""
        while i > 0 and changes[i][0] > step:
            i -= 1
        return changes[i][1][g] if changes[i][0] <= step else 0.0

    for i in range(1, len(changes)):
        step, lrs = changes[i]
        for g, lr in enumerate(lrs):
            peak = max(c[1][g] for c in changes[:i])
            if peak <= 0 or lr < SPIKE_FACTOR * peak:
                continue
            rise = lr - rate(i - 1, g, step - 1)
            before = rate(i - 1, g, step - 1) - rate(i - 1, g, step - 2)  # the first rate rose from 0
            after = changes[i + 1][1][g] - lr if i + 1 < len(changes) and changes[i + 1][0] == step + 1 else 0.0
            if rise < SPIKE_FACTOR * max(before, after, 0.0):
                continue
            end = next((s - 1 for s, later in changes[i + 1:] if later[g] < SPIKE_FACTOR * peak), None)
            found.append((step, end if end is not None else -1, lr / peak))
            break
    return found


def _lr_spike(ev: Evidence) -> Cause | None:
    """Deaths from the step before a jump (see spikes()) to SPIKE_AFTER steps after it ended."""
    died = _died(ev)
    if not died.size:
        return None
    best = None
    for step, end, factor in spikes(ev.lr_changes):
        last = (end if end >= 0 else step) + SPIKE_AFTER
        near = died[(died >= step - 1) & (died <= last)]
        if near.size and (best is None or near.size > best[0].size):
            best = (near, step, factor)
    if best is None:
        return None
    near, step, factor = best
    return _cause("lr_spike", int(near.size), ev,
                  f"learning rate x{factor:.3g} at step {step}, above any rate used before; "
                  f"they last fired at {_steps(near)}")


def _large_update(ev: Evidence) -> Cause | None:
    """Deaths within UPDATE_AROUND steps of a measured update of the producer's weight with
    ||dW|| / ||W|| >= UPDATE_LARGE. Updates made large by a learning-rate jump are the jump's story
    (lr_spike): measurements from the step before a jump to SPIKE_AFTER steps after it ended are left out."""
    died = _died(ev)
    ratios = np.asarray(ev.update_ratios, dtype=float)
    if not died.size or not ratios.size:
        return None
    spans = np.asarray(ev.update_spans, dtype=int).reshape(-1, 2)
    large = np.isfinite(ratios) & (ratios >= UPDATE_LARGE)
    for step, end, _ in spikes(ev.lr_changes):
        large &= ~((spans[:, 0] <= (end if end >= 0 else step) + SPIKE_AFTER) & (spans[:, 1] >= step - 1))
    if not large.any():
        return None
    near = np.array([bool(np.any(large & (spans[:, 0] <= d + UPDATE_AROUND) & (spans[:, 1] >= d - UPDATE_AROUND)))
                     for d in died])
    if not near.any():
        return None
    when = died[near]
    around = large & (spans[:, 0] <= when.max() + UPDATE_AROUND) & (spans[:, 1] >= when.min() - UPDATE_AROUND)
    usual = float(np.median(ratios[np.isfinite(ratios)]))
    return _cause("large_update", int(near.sum()), ev,
                  f"{ev.update_layer or 'the layer feeding it'}: updates ||dW||/||W|| up to "
                  f"{float(ratios[around].max()):.2g} around {_steps(when)}, where they last fired "
                  f"(usual about {UPDATE_USUAL:g}; this run's median {usual:.2g})")


def _dead_from_start(ev: Evidence) -> Cause | None:
    never = int(np.sum(np.asarray(ev.last_fired)[ev.dead_units] < 0))
    if not never:
        return None
    apart = _biases_apart(ev)
    if apart is not None and apart[2]:
        return None  # biases far below: that is negative_bias, whenever it happened
    note = "" if apart is None else f"; their {ev.bias_name or 'biases'} look like the live ones' (median {apart[0]:.3g})"
    return _cause("dead_from_start", never, ev,
                  f"they never fired since the site first ran{note}: initialisation, or inputs that never reach them")


def _dead_input(ev: Evidence) -> Cause | None:
    if ev.input_dead_fraction is None or ev.input_dead_fraction < DEAD_INPUT:
        return None
    return Cause("dead_input", ev.input_dead_fraction,
                 f"the site feeding it, {ev.input_site}, is {100 * ev.input_dead_fraction:.0f}% dead",
                 units=len(ev.dead_units), dead=len(ev.dead_units))


def _steps(steps: np.ndarray) -> str:
    return f"step {steps.min()}" if steps.min() == steps.max() else f"steps {steps.min()}–{steps.max()}"
