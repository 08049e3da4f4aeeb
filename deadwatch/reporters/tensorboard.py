"""TensorBoard reporter: scalars, firing-rate histograms, a custom-scalars layout, two heatmaps, a text table.

Tags (stable: site names only, no shapes or counters):
  deadwatch/dead_fraction/<site>, deadwatch/zero_fraction/<site>   per site
  deadwatch/dormant_fraction/<site>                                 per site (from its first counted run)
  deadwatch/saturated_fraction/<site>                               per site with a bounded activation
  deadwatch/dead_fraction/all, deadwatch/flagged_sites              whole run
  deadwatch/threshold/warn, deadwatch/threshold/critical            the configured lines
  deadwatch/firing_rate/<site>                                      histogram over units
  deadwatch/heatmap, deadwatch/heatmap_dormant                      images: dead / dormant fraction,
                                                                    sites (rows) x report steps (columns)
  deadwatch/summary                                                 text: the console table as markdown
  deadwatch/recycled/<site>                                         units recycled at a step (Monitor.recycle)
An idle site (no counted forward in the window) gets no dead_fraction point at that step, and
dead_fraction/all none when every site is idle: not judged is not 0% dead.

The heatmaps are matplotlib figures (site names on the rows, report steps on the columns, a colour bar)
when matplotlib is installed (`pip install "deadwatch[plots]"`), else raw images of coloured cells under the
same tags. The figures are made without pyplot, each on its own Agg canvas (add_figure's plt.close is a
no-op for them), so a notebook's or script's own matplotlib backend and open figures are left alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tensorboard.plugins.text.summary_v2 import text_pb

from ..analysis import IDLE, NONFINITE, Report
from ..config import Config
from .console import certified_lines, count_cell, dead_cell, died_text, flag_lines, has_verdicts, headline, percent

HEATMAP_COLUMNS = 200   # reports kept in the heatmap (the latest)
CELL_H, CELL_W = 12, 6  # pixels per site row and per report column
NONFINITE_RGB = (1.0, 0.0, 1.0)   # magenta
IDLE_RGB = (0.25, 0.3, 0.4)       # slate grey: blue above red, which the dead-fraction scale never has
HEATMAPS = {"deadwatch/heatmap": "dead_fraction", "deadwatch/heatmap_dormant": "dormant_fraction"}  # tag: field
LABELS = {"dead_fraction": "dead fraction", "dormant_fraction": "dormant fraction"}
MAX_X_TICKS = 10        # report steps labelled under a figure heatmap, fewer when they would not fit
MAX_LABELLED_ROWS = 60  # beyond this many sites, every k-th site is named (the text summary names them all)


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


# black -> red -> yellow -> white, as colour() draws it, sampled for matplotlib
_SCALE = colour(np.linspace(0.0, 1.0, 256) ** 2).T


def heat(report: Report, field: str = "dead_fraction") -> dict[str, float]:
    """One heatmap column: each site's `field` (dead_fraction or dormant_fraction), NaN when nonfinite, -inf
    when idle (or, for dormant, when the site ran no counted forward in the interval)."""
    def value(layer: Any) -> float:
        v = getattr(layer, field)
        return math.nan if layer.status == NONFINITE else -math.inf if layer.status == IDLE or v is None else v
    return {layer.name: value(layer) for layer in report.layers}


def grid(history: list[dict[str, float]], sites: list[str]) -> np.ndarray:
    """Sites x reports; a site absent from a report (not yet run) is idle (-inf)."""
    return np.array([[column.get(site, -math.inf) for column in history] for site in sites],
                    dtype=np.float64).reshape(len(sites), len(history))


def heatmap(history: list[dict[str, float]], sites: list[str]) -> torch.Tensor:
    """The fallback without matplotlib, a CHW image: one row of CELL_H pixels per site, one column of CELL_W
    per report (the latest HEATMAP_COLUMNS); no labels (the text summary gives the row order)."""
    img = colour(grid(history, sites)).repeat(CELL_H, axis=1).repeat(CELL_W, axis=2)
    return torch.from_numpy(img.astype(np.float32))


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        return False
    return True


def figure(history: list[dict[str, float]], sites: list[str], steps: list[int], label: str = "dead fraction") -> Any:
    """A matplotlib Figure (on its own Agg canvas): site names on the rows (in report order), report steps on
    the columns, a colour bar for `label` on the same black -> red -> yellow -> white square-root scale as
    the fallback image; idle and nonfinite cells in slate grey and magenta, named in a legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap, PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    values = grid(history, sites)
    rows, cols = values.shape
    finite = np.isfinite(values)
    # laid out in inches: site names | cells | colour bar and its label; title and legend above, steps below
    names = min(0.2 + 0.06 * max((len(site) for site in sites), default=4), 4.0)
    cells_w, cells_h = max(3.0, min(0.03 * cols, 6.0)), max(1.2, 0.15 * min(rows, MAX_LABELLED_ROWS))
    width, height = names + cells_w + 1.15, 0.35 + cells_h + 0.6
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((names / width, 0.6 / height, cells_w / width, cells_h / height))
    bar_ax = fig.add_axes(((names + cells_w + 0.12) / width, 0.6 / height, 0.14 / width, cells_h / height))
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
    cmap = ListedColormap(_SCALE).with_extremes(bad=(0, 0, 0, 0))
    image = ax.imshow(np.ma.masked_array(values, mask=~finite), cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                      aspect="auto", interpolation="nearest", extent=extent)
    # not judged: a second layer over the masked cells, 0 idle, 1 nonfinite
    marks = np.ma.masked_array(np.isnan(values).astype(np.float64), mask=finite)
    ax.imshow(marks, cmap=ListedColormap([IDLE_RGB, NONFINITE_RGB]), vmin=0, vmax=1, aspect="auto",
              interpolation="nearest", extent=extent)
    every = max(1, math.ceil(rows / MAX_LABELLED_ROWS))
    ax.set_yticks(range(0, rows, every), [sites[r] for r in range(0, rows, every)], fontsize=7)
    fit = int(cells_w / (0.07 * len(str(max(steps, default=0))) + 0.25))   # labels that fit side by side
    ticks = sorted(set(np.linspace(0, cols - 1, min(cols, MAX_X_TICKS, fit)).round().astype(int).tolist())) if cols else []
    ax.set_xticks(ticks, [str(steps[c]) for c in ticks], fontsize=8)
    ax.set_xlabel("report step", fontsize=8)
    ax.set_title(label, fontsize=9, loc="left")
    bar = fig.colorbar(image, cax=bar_ax, ticks=[0, 0.05, 0.25, 0.5, 1.0])
    bar.ax.tick_params(labelsize=7)
    bar.set_label(f"{label} (sqrt scale)", fontsize=8)
    fig.legend(handles=[Patch(color=IDLE_RGB, label="idle / not run yet"), Patch(color=NONFINITE_RGB, label="nonfinite")],
               loc="upper right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=7, frameon=False, borderaxespad=0.3,
               handlelength=1.2, columnspacing=1.0)
    return fig


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
        self.writer.add_custom_scalars(layout(config))
        self.plots = plotting_available()
        self.history: dict[str, list[dict[str, float]]] = {tag: [] for tag in HEATMAPS}
        self.steps: list[int] = []
        self.sites: list[str] = []
        self.drawn: int | None = None  # the step of the last heatmaps drawn
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
                self.writer.add_figure(tag, figure(self.history[tag], self.sites, self.steps, LABELS[field]), step,
                                       close=True)
            else:
                self.writer.add_image(tag, heatmap(self.history[tag], self.sites), step)
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
