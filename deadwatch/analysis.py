"""Analysis: the verdict per layer, from the host copy of the counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .causes import Cause, headline

if TYPE_CHECKING:
    from .config import Config
    from .stats import Figures

OK, WARN, CRITICAL, NONFINITE, IDLE = "ok", "warn", "critical", "nonfinite", "idle"
STATUSES = (OK, WARN, CRITICAL, NONFINITE, IDLE)

HINTS = {
    WARN: "some units stopped firing; if it grows: lower the LR, check for biases drifting negative",
    CRITICAL: "many dead units: LR too high, negative bias drift or poor init? "
              "Try a lower LR, He init, LeakyReLU/ELU, normalisation",
    NONFINITE: "NaN/inf output: training likely diverged; lower the LR, clip gradients, check inputs and AMP scaling",
}
FLAGS = ("dormant", "saturated", "rare")  # verdicts besides dead, flagged from thresholds.<name> of a site's units
STYLES = {OK: "green", WARN: "yellow", CRITICAL: "bold red", NONFINITE: "bold magenta", IDLE: "dim"}


@dataclass
class LayerReport:
    """The verdict for one site."""

    name: str
    kind: str
    units: int
    dead_units: list[int]
    dead_fraction: float | None   # None when idle: the site ran no counted forward in the window
    zero_fraction: float | None   # None when the site ran no counted forward in the interval
    observations: int
    status: str
    firing_rate: np.ndarray | None = field(default=None, repr=False, compare=False)  # per unit, interval
    # Verdicts besides dead (absent from run logs written before them: these defaults then)
    dormant_units: list[int] = field(default_factory=list)    # s_i = mean|h_i| / mean_k mean|h_k| <= dormant_tau
    dormant_fraction: float | None = None      # None when the site ran no counted forward in the interval
    saturated_units: list[int] = field(default_factory=list)  # bounded activations only
    saturated_fraction: float | None = None    # 0.0 at sites whose activation is not bounded
    rare_units: list[int] = field(default_factory=list)       # fired in > 0 and < rare_rate of counted values
    last_fired: list[int] | None = field(default=None, repr=False)  # per unit: step (from 1) it last fired, -1 never
    bounds: list[float] | None = None          # [lower, upper] of a bounded activation
    flags: list[str] = field(default_factory=list)  # FLAGS whose share of units is at least thresholds.<flag>
    causes: list[Cause] = field(default_factory=list)  # why the dead units died, best first (flagged sites)
    certified_units: list[int] = field(default_factory=list)  # dead for every input, provably (certify.py)
    certify_note: str | None = None            # why units proved dead now are not certified (training)

    @property
    def hint(self) -> str | None:
        """For a flagged site: the top cause with its score and evidence when it explains most of the dead
        units (causes.headline), else the generic hint for the status. None for sites not flagged."""
        top = headline(self.causes) if self.status in (WARN, CRITICAL) else None
        return top.hint() if top is not None else HINTS.get(self.status)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("firing_rate")
        return d


@dataclass
class Report:
    """Every watched site's verdict after `step` training steps."""

    step: int
    window: int
    layers: list[LayerReport]

    error: str | None = None   # the training loop ended with this exception (the final report only)

    @property
    def flagged(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status not in (OK, IDLE)]

    @property
    def units(self) -> int:
        return sum(layer.units for layer in self.layers)

    @property
    def dead_fraction(self) -> float:
        """Dead units over the units of the sites that ran in the window (not idle)."""
        units = sum(layer.units for layer in self.layers if layer.status != IDLE)
        return sum(len(layer.dead_units) for layer in self.layers) / units if units else 0.0

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no site {name!r}; sites: {', '.join(layer.name for layer in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        d = {
            "step": self.step,
            "window": self.window,
            "units": self.units,
            "dead_fraction": self.dead_fraction,
            "layers": [layer.to_dict() for layer in self.layers],
            "flagged": [layer.name for layer in self.flagged],
        }
        if self.error is not None:
            d["error"] = self.error
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        layers = [LayerReport(**{k: layer[k] for k in LayerReport.__dataclass_fields__ if k in layer})
                  for layer in d["layers"]]
        for layer in layers:
            layer.causes = [Cause(**c) if isinstance(c, dict) else c for c in layer.causes]
        return cls(step=d["step"], window=d["window"], layers=layers, error=d.get("error"))

    def __rich__(self) -> Any:
        """`rich.print(report)` shows the console table: rendering is the console reporter's, imported
        when asked for (analysis itself imports no reporter)."""
        from .reporters.console import render
        return render(self)


def status(dead_fraction: float, nonfinite: bool, config: Config) -> str:
    """The status of a site that ran in the window."""
    if nonfinite:
        return NONFINITE
    if dead_fraction >= config.critical:
        return CRITICAL
    if dead_fraction >= config.warn:
        return WARN
    return OK


def layer_report(figures: Figures, config: Config) -> LayerReport:
    """One site's verdict from its merged figures. A site that ran no counted forward in the window is
    idle: not running is no evidence of dead units."""
    units = figures.alive.size
    idle = figures.judged and figures.idle
    dead = np.flatnonzero(~figures.alive).tolist() if figures.judged and not idle else []
    dead_fraction = None if idle else len(dead) / units if units else 0.0
    obs = figures.observations
    rate = figures.fired / obs if obs else None
    dormant, saturated, rare = [], [], []
    dormant_fraction: float | None = None
    saturated_fraction: float | None = None if figures.bounds is not None else 0.0
    if obs and units:
        is_dormant = _dormant(figures.abs_sum, config.dormant_tau)
        dormant = np.flatnonzero(is_dormant).tolist()
        dormant_fraction = len(dormant) / units
        rare = np.flatnonzero((rate > 0) & (rate < config.rare_rate)).tolist()
        if figures.bounds is not None:
            saturated = np.flatnonzero(figures.near >= config.saturation_share * obs).tolist()
            saturated_fraction = len(saturated) / units
    flags = []
    if not idle and units:
        counts = {"dormant": len(dormant), "saturated": len(saturated), "rare": len(rare)}
        for name, share in config.flag_at:
            if counts[name] and counts[name] / units >= share:
                flags.append(name)
    last = figures.last_fired
    return LayerReport(
        name=figures.name,
        kind=figures.kind,
        units=units,
        dead_units=dead,
        dead_fraction=dead_fraction,
        zero_fraction=float(1.0 - rate.mean()) if rate is not None and units else None,
        observations=obs,
        status=IDLE if idle else status(dead_fraction, figures.judged and figures.nonfinite, config),
        firing_rate=rate,
        dormant_units=dormant,
        dormant_fraction=dormant_fraction,
        saturated_units=saturated,
        saturated_fraction=saturated_fraction,
        rare_units=rare,
        last_fired=np.where(last >= 0, last + 1, -1).tolist() if last is not None else None,
        bounds=list(figures.bounds) if figures.bounds is not None else None,
        flags=flags,
    )


def _dormant(abs_sum: np.ndarray, tau: float) -> np.ndarray:
    """Per unit: dormant, i.e. its mean |output| is at most tau times the mean over the site's units (the interval's value
    count is the same for every unit, so the sums compare as the means do). A unit with a NaN/inf sum is left
    out of the mean and is not dormant; when every unit's sum is 0 every unit is dormant."""
    finite = np.isfinite(abs_sum)
    if not finite.any():
        return np.zeros(abs_sum.shape, dtype=bool)
    mean = float(abs_sum[finite].mean())
    return finite & (abs_sum <= tau * mean)
