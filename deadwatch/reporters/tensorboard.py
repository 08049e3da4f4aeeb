"""TensorBoard reporter: scalars, firing-rate histograms, a custom-scalars layout, two heatmaps, a text table.

Tags (stable: site names only, no shapes or counters):
  deadwatch/dead_fraction/<site>, deadwatch/zero_fraction/<site>   per site
  deadwatch/dormant_fraction/<site>                                 per site (from its first counted run)
  deadwatch/saturated_fraction/<site>                               per site with a bounded activation
  deadwatch/dead_fraction/all, deadwatch/flagged_sites              whole run
  deadwatch/threshold/warn, deadwatch/threshold/critical            the configured lines
  deadwatch/scale/full                                              a constant 1.0 (see layout())
  deadwatch/firing_rate/<site>                                      histogram over units
  deadwatch/heatmap, deadwatch/heatmap_dormant                      images: dead / dormant fraction,
                                                                    sites (rows) x report steps (columns)
  deadwatch/summary                                                 text: the console table as markdown
  deadwatch/recycled/<site>                                         units recycled at a step (Monitor.recycle)
An idle site (no counted forward in the window) gets no dead_fraction point at that step, and
dead_fraction/all none when every site is idle: not judged is not 0% dead.

The custom-scalars layout (written with the first report, when the sites are known) has a chart per figure
with every site, and a chart per site. The heatmaps (colours: see heatmap.py) are matplotlib figures (site
names on the rows, report steps on the columns, a colour bar) when matplotlib is installed (`pip install "deadwatch[plots]"`), else raw images of coloured cells under the
same tags. The figures are made without pyplot, each on its own Agg canvas (add_figure's plt.close is a
no-op for them), so a notebook's or script's own matplotlib backend and open figures are left alone.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from tensorboard.plugins.text.summary_v2 import text_pb

from ..analysis import IDLE, Report
from ..config import Config
from .heatmap import (DEFAULT_BANDS, FIELDS, HEATMAP_COLUMNS, IDLE_RGB, MAX_LABELLED_ROWS, MAX_X_TICKS,  # noqa: F401
                      NONFINITE_RGB, bands, cells, colour, figure, grid, heat, plotting_available)
from .scalars import scalars
from .console import certified_lines, count_cell, dead_cell, died_text, flag_lines, has_verdicts, headline, percent

CELL_H, CELL_W = 12, 6  # pixels per site row and per report column
HEATMAPS = {"deadwatch/heatmap": "dead_fraction", "deadwatch/heatmap_dormant": "dormant_fraction"}  # tag: field
LABELS = FIELDS


def layout(config: Config, sites: list[str] = ()) -> dict:
    """The custom-scalars layout: every site's dead (dormant, saturated, zero) fraction in one chart each, then
    one chart per site (its dead, dormant and saturated fractions with the thresholds), so that a line is told
    from another by the chart's title. TensorBoard's default y range ignores outliers: it ends a fifth above
    the 95% quantile of the chart's points, which cuts off a site at 90% dead among sites at 0, or a late
    spike. The constant deadwatch/scale/full line (1.0) in these charts is a large enough share of a
    site's chart to hold that quantile at 100%, so every line shows whole, on a 0-100% scale."""
    full = r"deadwatch/scale/full"
    overview = {
        "dead fraction per site (with warn/critical thresholds)":
            ["Multiline", [r"deadwatch/dead_fraction/.*", r"deadwatch/threshold/.*", full]],
        "dormant fraction per site (with the warn threshold)":
            ["Multiline", [r"deadwatch/dormant_fraction/.*", r"deadwatch/threshold/warn", full]],
        "saturated fraction per site (with the warn threshold)":
            ["Multiline", [r"deadwatch/saturated_fraction/.*", r"deadwatch/threshold/warn", full]],
        "zero fraction per site": ["Multiline", [r"deadwatch/zero_fraction/.*"]],
    }
    per_site = {f"{site}: dead, dormant, saturated fraction":
                ["Multiline", [rf"deadwatch/(dead|dormant|saturated)_fraction/{re.escape(site)}$",
                               r"deadwatch/threshold/.*", full]] for site in sites}
    return {"deadwatch": overview, **({"deadwatch per site": per_site} if per_site else {})}


def heatmap(history: list[dict[str, float]], sites: list[str], band: tuple[float, float] = DEFAULT_BANDS) -> torch.Tensor:
    """The fallback without matplotlib, a CHW image: one row of CELL_H pixels per site, one column of CELL_W
    per report (the latest HEATMAP_COLUMNS); no labels (the text summary gives the row order)."""
    return torch.from_numpy(cells(history, sites, CELL_H, CELL_W, band).astype(np.float32))


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
    hints += [f"- **{line.plain.split(': ', 1)[0]}**: {line.plain.split(': ', 1)[1]}"
              for line in flag_lines(report) + certified_lines(report)]
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
        self.laid_out = False          # the custom-scalars layout, written at the first report
        self.plots = plotting_available()
        self.history: dict[str, list[dict[str, float]]] = {tag: [] for tag in HEATMAPS}
        self.steps: list[int] = []
        self.sites: list[str] = []
        self.drawn: int | None = None  # the step of the last heatmaps drawn
        self.reports = 0

    def emit(self, report: Report) -> None:
        w, step = self.writer, report.step
        if not self.laid_out:  # the first layout a run writes is the one TensorBoard shows: with the sites known
            w.add_custom_scalars(layout(self.config, [layer.name for layer in report.layers]))
            self.laid_out = True
        for tag, value in scalars(report).items():
            w.add_scalar(tag, value, step)
        for layer in report.layers:
            if layer.firing_rate is not None and layer.firing_rate.size:
                w.add_histogram(f"deadwatch/firing_rate/{layer.name}", np.asarray(layer.firing_rate), step,
                                bins=np.linspace(0.0, 1.0, 21))
        w.add_scalar("deadwatch/threshold/warn", self.config.warn, step)
        w.add_scalar("deadwatch/threshold/critical", self.config.critical, step)
        w.add_scalar("deadwatch/scale/full", 1.0, step)
        for tag, field in HEATMAPS.items():
            self.history[tag] = (self.history[tag] + [heat(report, field)])[-HEATMAP_COLUMNS:]
        self.steps = (self.steps + [step])[-HEATMAP_COLUMNS:]
        self.sites = [layer.name for layer in report.layers]
        if self.reports % self.config.image_every == 0:
            self._draw()
        self.reports += 1
        # add_text would append "/text_summary" to the tag: write the text plugin's summary as is
        w._get_file_writer().add_summary(text_pb("deadwatch/summary", markdown(report)), step)
        w.flush()
        self._raise_kept()

    def recycled(self, step: int, units: dict[str, list[int]]) -> None:
        for name, recycled in units.items():
            self.writer.add_scalar(f"deadwatch/recycled/{name}", len(recycled), step)
        self.writer.flush()
        self._raise_kept()

    def _draw(self) -> None:
        """The heatmaps of the reports so far (drawing a figure takes a tenth of a second or more: every
        image_every reports, and the last one at close)."""
        step = self.steps[-1]
        for tag, field in HEATMAPS.items():
            if self.plots:
                self.writer.add_figure(tag, figure(self.history[tag], self.sites, self.steps, LABELS[field],
                                                   bands(self.config, field)), step, close=True)
            else:
                self.writer.add_image(tag, heatmap(self.history[tag], self.sites, bands(self.config, field)), step)
        self.drawn = step

    def close(self) -> None:
        try:
            if self.steps and self.drawn != self.steps[-1]:
                self._draw()
        finally:
            self.writer.close()
        self._raise_kept()

    def _raise_kept(self) -> None:
        """Raise, once, what the writer thread failed with; its record writer writes nothing after a failure."""
        error = self.kept.error if self.kept is not None else None
        if error is not None:
            self.kept = None
            raise error
