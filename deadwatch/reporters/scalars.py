"""The scalars of a report, by name: what TensorBoard, W&B, MLflow and a trainer's own loggers all get.

  deadwatch/dead_fraction/<site>       per site that ran in the window (an idle site gets no point: not 0)
  deadwatch/zero_fraction/<site>       per site that ran a counted forward in the interval
  deadwatch/dormant_fraction/<site>    likewise
  deadwatch/saturated_fraction/<site>  per site with a bounded activation
  deadwatch/dead_fraction/all          the run's dead fraction (none when every site is idle)
  deadwatch/flagged_sites              sites at warn or worse
"""

from __future__ import annotations

from ..analysis import IDLE, Report


def scalars(report: Report) -> dict[str, float]:
    out: dict[str, float] = {}
    for layer in report.layers:
        if layer.dead_fraction is not None:
            out[f"deadwatch/dead_fraction/{layer.name}"] = layer.dead_fraction
        if layer.zero_fraction is not None:
            out[f"deadwatch/zero_fraction/{layer.name}"] = layer.zero_fraction
        if layer.dormant_fraction is not None:
            out[f"deadwatch/dormant_fraction/{layer.name}"] = layer.dormant_fraction
        if layer.bounds is not None and layer.saturated_fraction is not None:
            out[f"deadwatch/saturated_fraction/{layer.name}"] = layer.saturated_fraction
    if not report.layers or any(layer.status != IDLE for layer in report.layers):
        out["deadwatch/dead_fraction/all"] = report.dead_fraction
    out["deadwatch/flagged_sites"] = float(len(report.flagged))
    return out
