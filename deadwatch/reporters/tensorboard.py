"""TensorBoard reporter: scalars, firing-rate histograms, a custom-scalars layout, a heatmap, a text table.

Tags (stable: site names only, no shapes or counters):
  deadwatch/dead_fraction/<site>, deadwatch/zero_fraction/<site>   per site
  deadwatch/dormant_fraction/<site>                                 per site (from its first counted run)
  deadwatch/saturated_fraction/<site>                               per site with a bounded activation
  deadwatch/dead_fraction/all, deadwatch/flagged_sites              whole run
  deadwatch/threshold/warn, deadwatch/threshold/critical            the configured lines
  deadwatch/firing_rate/<site>                                      histogram over units
  deadwatch/heatmap                                                 image: sites (rows) x reports (columns)
  deadwatch/summary                                                 text: the console table as markdown
An idle site (no counted forward in the window) gets no dead_fraction point at that step, and
dead_fraction/all none when every site is idle: not judged is not 0% dead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tensorboard.plugins.text.summary_v2 import text_pb

from ..analysis import IDLE, NONFINITE, Report
from ..config import Config
from .console import count_cell, dead_cell, died_text, flag_lines, has_verdicts, headline, percent

HEATMAP_COLUMNS = 200   # reports kept in the heatmap (the latest)
CELL_H, CELL_W = 12, 6  # pixels per site row and per report column
NONFINITE_RGB = (1.0, 0.0, 1.0)   # magenta
IDLE_RGB = (0.25, 0.3, 0.4)       # slate grey: blue above red, which the dead-fraction scale never has


def layout(config: Config) -> dict:
    """The custom-scalars layout: every site's dead fraction in one chart, zero fractions in another."""
    return {"deadwatch": {
        "dead fraction per site (with warn/critical thresholds)":
            ["Multiline", [r"deadwatch/dead_fraction/.*", r"deadwatch/threshold/.*"]],
        "dormant fraction per site (with the warn threshold)":
            ["Multiline", [r"deadwatch/dormant_fraction/.*", r"deadwatch/threshold/warn"]],
        "saturated fraction per site (with the warn threshold)":
            ["Multiline", [r"deadwatch/saturated_fraction/.*", r"deadwatch/threshold/warn"]],
        "zero fraction per site": ["Multiline", [r"deadwatch/zero_fraction/.*"]],
    }}


def colour(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1]: black -> red -> yellow -> white as the dead fraction goes 0 -> 1 (sqrt scale, so 1% shows);
    magenta for NaN (a nonfinite site), slate grey for -inf (an idle site, not judged)."""
    v = np.sqrt(np.clip(np.nan_to_num(values, nan=0.0, neginf=0.0), 0.0, 1.0))
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)])
    rgb[:, np.isnan(values)] = np.array(NONFINITE_RGB)[:, None]
    rgb[:, np.isneginf(values)] = np.array(IDLE_RGB)[:, None]
    return rgb


def heat(report: Report) -> dict[str, float]:
    """One heatmap column: each site's dead fraction, NaN when nonfinite, -inf when idle."""
    return {layer.name: math.nan if layer.status == NONFINITE else -math.inf if layer.status == IDLE
            else layer.dead_fraction for layer in report.layers}


def heatmap(history: list[dict[str, float]], sites: list[str]) -> torch.Tensor:
    """CHW image: one row per site, one column per report (the latest HEATMAP_COLUMNS); a site absent from a
    report (not yet run) shows as idle."""
    values = np.array([[column.get(site, -math.inf) for column in history] for site in sites],
                      dtype=np.float64).reshape(len(sites), len(history))
    img = colour(values).repeat(CELL_H, axis=1).repeat(CELL_W, axis=2)
    return torch.from_numpy(img.astype(np.float32))


def markdown(report: Report) -> str:
    if has_verdicts(report):
        rows = ["| site | kind | units | dead | zero frac | dormant | flags | status |",
                "|---|---|---:|---:|---:|---:|---|---|"]
        rows += [f"| {layer.name} | {layer.kind} | {layer.units} | {dead_cell(layer)} | {percent(layer.zero_fraction)} "
                 f"| {count_cell(layer.dormant_units, layer.dormant_fraction)} | {', '.join(layer.flags)} "
                 f"| {layer.status} |" for layer in report.layers]
    else:
        rows = ["| site | kind | units | dead | zero frac | status |", "|---|---|---:|---:|---:|---|"]
        rows += [f"| {layer.name} | {layer.kind} | {layer.units} | {dead_cell(layer)} "
                 f"| {percent(layer.zero_fraction)} | {layer.status} |" for layer in report.layers]
    hints = [f"- **{layer.name}**: {layer.hint}" + (f" ({died_text(layer)})" if died_text(layer) else "")
             for layer in report.flagged]
    hints += [f"- **{line.plain.split(': ', 1)[0]}**: {line.plain.split(': ', 1)[1]}" for line in flag_lines(report)]
    idle = [layer.name for layer in report.layers if layer.status == IDLE]
    if idle:
        hints.append(f"- idle (no counted forward in the window, not judged): {', '.join(idle)}")
    if report.error is not None:
        hints.append(f"- **the run ended in an error after step {report.step}**: {report.error}")
    return "\n".join([f"step {report.step}, window {report.window}: {headline(report)}", "", *rows, "", *hints,
                      "", "Heatmap rows, top to bottom: " + ", ".join(layer.name for layer in report.layers)])


class _KeptErrors:
    """Stands in for the record writer of tensorboard's writer thread (EventFileWriter's _AsyncWriter): a write
    or flush that fails is kept, for emit() to raise, instead of ending the thread with a traceback on stderr
    (a vanished logdir). After a failure it writes nothing more."""

    def __init__(self, writer: Any):
        self.writer = writer
        self.error: Exception | None = None

    def write(self, data: bytes) -> None:
        self._do(self.writer.write, data)

    def flush(self) -> None:
        self._do(self.writer.flush)

    def close(self) -> None:
        self.writer.close()

    def _do(self, method: Any, *args: Any) -> None:
        if self.error is None:
            try:
                method(*args)
            except Exception as e:
                self.error = e


def _keep_errors(writer: Any) -> _KeptErrors | None:
    """Put a _KeptErrors around the writer thread's record writer; None if this tensorboard is laid out otherwise
    (then its thread prints its own failure, and the next emit raises it)."""
    event_writer = getattr(writer._get_file_writer(), "event_writer", None)
    worker = getattr(getattr(event_writer, "_async_writer", None), "_worker", None)
    if worker is None or not hasattr(worker, "_record_writer"):
        return None
    worker._record_writer = kept = _KeptErrors(worker._record_writer)
    return kept


class TensorBoardReporter:
    def __init__(self, logdir: str, config: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(log_dir=logdir)
        self.kept = _keep_errors(self.writer)
        self.writer.add_custom_scalars(layout(config))
        self.history: list[dict[str, float]] = []
        self.reports = 0

    def emit(self, report: Report) -> None:
        w, step = self.writer, report.step
        for layer in report.layers:
            if layer.dead_fraction is not None:   # idle: not judged, no point rather than a fake 0
                w.add_scalar(f"deadwatch/dead_fraction/{layer.name}", layer.dead_fraction, step)
            if layer.zero_fraction is not None:
                w.add_scalar(f"deadwatch/zero_fraction/{layer.name}", layer.zero_fraction, step)
            if layer.dormant_fraction is not None:
                w.add_scalar(f"deadwatch/dormant_fraction/{layer.name}", layer.dormant_fraction, step)
            if layer.bounds is not None and layer.saturated_fraction is not None:
                w.add_scalar(f"deadwatch/saturated_fraction/{layer.name}", layer.saturated_fraction, step)
            if layer.firing_rate is not None and layer.firing_rate.size:
                w.add_histogram(f"deadwatch/firing_rate/{layer.name}", np.asarray(layer.firing_rate), step,
                                bins=np.linspace(0.0, 1.0, 21))
        if not report.layers or any(layer.status != IDLE for layer in report.layers):
            w.add_scalar("deadwatch/dead_fraction/all", report.dead_fraction, step)
        w.add_scalar("deadwatch/flagged_sites", len(report.flagged), step)
        w.add_scalar("deadwatch/threshold/warn", self.config.warn, step)
        w.add_scalar("deadwatch/threshold/critical", self.config.critical, step)
        self.history = (self.history + [heat(report)])[-HEATMAP_COLUMNS:]
        if self.reports % self.config.image_every == 0:
            w.add_image("deadwatch/heatmap", heatmap(self.history, [layer.name for layer in report.layers]), step)
        self.reports += 1
        # add_text would append "/text_summary" to the tag: write the text plugin's summary as is
        w._get_file_writer().add_summary(text_pb("deadwatch/summary", markdown(report)), step)
        w.flush()
        self._raise_kept()

    def close(self) -> None:
        self.writer.close()
        self._raise_kept()

    def _raise_kept(self) -> None:
        """Raise, once, what the writer thread failed with; its record writer writes nothing after a failure."""
        error = self.kept.error if self.kept is not None else None
        if error is not None:
            self.kept = None
            raise error
