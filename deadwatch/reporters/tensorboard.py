"""TensorBoard reporter: scalars, firing-rate histograms, a custom-scalars layout, a heatmap, a text table.

Tags (stable: site names only, no shapes or counters):
  deadwatch/dead_fraction/<site>, deadwatch/zero_fraction/<site>   per site
  deadwatch/dead_fraction/all, deadwatch/flagged_sites              whole run
  deadwatch/threshold/warn, deadwatch/threshold/critical            the configured lines
  deadwatch/firing_rate/<site>                                      histogram over units
  deadwatch/heatmap                                                 image: sites (rows) x reports (columns)
  deadwatch/summary                                                 text: the console table as markdown
"""

from __future__ import annotations

import numpy as np
import torch
from tensorboard.plugins.text.summary_v2 import text_pb

from ..analysis import NONFINITE, Report
from ..config import Config
from .console import percent

HEATMAP_COLUMNS = 200   # reports kept in the heatmap (the latest)
CELL_H, CELL_W = 12, 6  # pixels per site row and per report column


def layout(config: Config) -> dict:
    """The custom-scalars layout: every site's dead fraction in one chart, zero fractions in another."""
    return {"deadwatch": {
        "dead fraction per site (with warn/critical thresholds)":
            ["Multiline", [r"deadwatch/dead_fraction/.*", r"deadwatch/threshold/.*"]],
        "zero fraction per site": ["Multiline", [r"deadwatch/zero_fraction/.*"]],
    }}


def colour(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1]: black -> red -> yellow -> white as the dead fraction goes 0 -> 1 (sqrt scale, so 1% shows);
    magenta for NaN (a nonfinite site)."""
    v = np.sqrt(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0))
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)])
    rgb[:, np.isnan(values)] = np.array([1.0, 0.0, 1.0])[:, None]
    return rgb


def heatmap(history: list[dict[str, float | None]], sites: list[str]) -> torch.Tensor:
    """CHW image: one row per site, one column per report (the latest HEATMAP_COLUMNS)."""
    values = np.array([[np.nan if (v := column.get(site, 0.0)) is None else v for column in history]
                       for site in sites], dtype=np.float64).reshape(len(sites), len(history))
    img = colour(values).repeat(CELL_H, axis=1).repeat(CELL_W, axis=2)
    return torch.from_numpy(img.astype(np.float32))


def markdown(report: Report) -> str:
    rows = ["| site | kind | units | dead | zero frac | status |", "|---|---|---:|---:|---:|---|"]
    rows += [f"| {layer.name} | {layer.kind} | {layer.units} | {len(layer.dead_units)} ({percent(layer.dead_fraction)}) "
             f"| {percent(layer.zero_fraction)} | {layer.status} |" for layer in report.layers]
    hints = [f"- **{layer.name}**: {layer.hint}" for layer in report.flagged]
    return "\n".join([f"step {report.step}, window {report.window}: {percent(report.dead_fraction)} of "
                      f"{report.units} units dead", "", *rows, "", *hints,
                      "", "Heatmap rows, top to bottom: " + ", ".join(layer.name for layer in report.layers)])


class TensorBoardReporter:
    def __init__(self, logdir: str, config: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(log_dir=logdir)
        self.writer.add_custom_scalars(layout(config))
        self.history: list[dict[str, float | None]] = []
        self.reports = 0

    def emit(self, report: Report) -> None:
        w, step = self.writer, report.step
        for layer in report.layers:
            w.add_scalar(f"deadwatch/dead_fraction/{layer.name}", layer.dead_fraction, step)
            if layer.zero_fraction is not None:
                w.add_scalar(f"deadwatch/zero_fraction/{layer.name}", layer.zero_fraction, step)
            if layer.firing_rate is not None and layer.firing_rate.size:
                w.add_histogram(f"deadwatch/firing_rate/{layer.name}", np.asarray(layer.firing_rate), step,
                                bins=np.linspace(0.0, 1.0, 21))
        w.add_scalar("deadwatch/dead_fraction/all", report.dead_fraction, step)
        w.add_scalar("deadwatch/flagged_sites", len(report.flagged), step)
        w.add_scalar("deadwatch/threshold/warn", self.config.warn, step)
        w.add_scalar("deadwatch/threshold/critical", self.config.critical, step)
        self.history = (self.history + [{layer.name: None if layer.status == NONFINITE else layer.dead_fraction
                                         for layer in report.layers}])[-HEATMAP_COLUMNS:]
        if self.reports % self.config.image_every == 0:
            w.add_image("deadwatch/heatmap", heatmap(self.history, [layer.name for layer in report.layers]), step)
        self.reports += 1
        # add_text would append "/text_summary" to the tag: write the text plugin's summary as is
        w._get_file_writer().add_summary(text_pb("deadwatch/summary", markdown(report)), step)
        w.flush()

    def close(self) -> None:
        self.writer.close()
