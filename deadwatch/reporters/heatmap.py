"""The heatmap of a run: sites (rows) x reports (columns), coloured by a fraction (dead or dormant).

Shared by the TensorBoard and W&B reporters and the HTML report; needs numpy only (matplotlib for the
labelled figure). The colour scale follows the status bands, so a reader sees the verdict, not a gradient:

  below `warn`               neutral grey (light at 0, a little darker towards warn): healthy, calm
  from `warn` to `critical`  amber to orange: the warn band
  from `critical` to 1       red to dark red: critical, unmistakable
  NaN                        magenta: a nonfinite site
  -inf                       slate blue-grey: an idle site (no counted forward), not judged

For the dead fraction the bands are thresholds.warn and thresholds.critical, as for the status; the dormant
fraction has no status, so its warn band starts at thresholds.dormant (the share that flags a site) and its
critical band at DORMANT_CRITICAL.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..analysis import IDLE, NONFINITE

if TYPE_CHECKING:
    from ..analysis import Report
    from ..config import Config

NONFINITE_RGB = (1.0, 0.0, 1.0)   # magenta
IDLE_RGB = (0.25, 0.3, 0.4)       # slate: blue over red, which no band of the scale has
# (colour at the band's start, colour just below its end)
NEUTRAL = ((0.95, 0.96, 0.97), (0.78, 0.81, 0.85))
WARN_BAND = ((1.0, 0.82, 0.30), (0.96, 0.55, 0.10))
CRITICAL_BAND = ((0.86, 0.12, 0.12), (0.42, 0.0, 0.06))
DEFAULT_BANDS = (0.01, 0.10)      # default.yaml's thresholds.warn and thresholds.critical
DORMANT_CRITICAL = 0.5            # the dormant heatmap's red band: half a site's units dormant
HEATMAP_COLUMNS = 200             # reports kept in the heatmap (the latest)
MAX_X_TICKS = 10                  # report steps labelled under a figure, fewer when they would not fit
MAX_LABELLED_ROWS = 60            # beyond this many sites, every k-th site is named
FIELDS = {"dead_fraction": "dead fraction", "dormant_fraction": "dormant fraction"}


def bands(config: Config, field: str = "dead_fraction") -> tuple[float, float]:
    """(start of the warn band, start of the critical band) for `field`."""
    if field == "dormant_fraction":
        share = dict(config.flag_at)["dormant"]
        return share, max(share, DORMANT_CRITICAL)
    return config.warn, config.critical


def _ramp(lo: tuple, hi: tuple, t: np.ndarray) -> np.ndarray:
    return np.array(lo)[:, None] + (np.array(hi) - np.array(lo))[:, None] * t[None, :]


def colour(values: np.ndarray, warn: float = DEFAULT_BANDS[0], critical: float = DEFAULT_BANDS[1]) -> np.ndarray:
    """RGB in [0, 1], shape (3, *values.shape): the band colours above; magenta for NaN, slate for -inf."""
    values = np.asarray(values, dtype=np.float64)
    v = np.clip(np.nan_to_num(values, nan=0.0, neginf=0.0), 0.0, 1.0).ravel()
    rgb = np.empty((3, v.size))
    neutral, critical_band = v < warn, v >= critical
    warn_band = ~neutral & ~critical_band
    rgb[:, neutral] = _ramp(*NEUTRAL, v[neutral] / warn if warn > 0 else v[neutral])
    rgb[:, warn_band] = _ramp(*WARN_BAND, (v[warn_band] - warn) / (critical - warn) if critical > warn else v[warn_band])
    rgb[:, critical_band] = _ramp(*CRITICAL_BAND, (v[critical_band] - critical) / (1 - critical)
                                  if critical < 1 else 0 * v[critical_band])
    rgb = rgb.reshape((3, *values.shape))
    rgb[:, np.isnan(values)] = np.array(NONFINITE_RGB)[:, None]
    rgb[:, np.isneginf(values)] = np.array(IDLE_RGB)[:, None]
    return rgb


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


def cells(history: list[dict[str, float]], sites: list[str], cell_h: int, cell_w: int,
          band: tuple[float, float] = DEFAULT_BANDS) -> np.ndarray:
    """The unlabelled image, CHW floats in [0, 1]: a cell of cell_h x cell_w pixels per site and report."""
    return colour(grid(history, sites), *band).repeat(cell_h, axis=1).repeat(cell_w, axis=2)


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        return False
    return True


def _norm(band: tuple[float, float]) -> Any:
    """Each band a third of the colour bar, whatever its width: 0 -> 0, warn -> 1/3, critical -> 2/3, 1 -> 1."""
    from matplotlib.colors import FuncNorm

    xs = np.array([0.0, band[0], band[1], 1.0])
    ys = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    return FuncNorm((lambda x: np.interp(x, xs, ys), lambda y: np.interp(y, ys, xs)), vmin=0.0, vmax=1.0)


def figure(history: list[dict[str, float]], sites: list[str], steps: list[int], label: str = "dead fraction",
           band: tuple[float, float] = DEFAULT_BANDS) -> Any:
    """A matplotlib Figure (on its own Agg canvas, without pyplot: a notebook's figures are left alone): site
    names on the rows (in report order), report steps on the columns, a colour bar for `label` with the
    bands marked; idle and nonfinite cells in slate and magenta, named in a legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    values = grid(history, sites)
    rows, cols = values.shape
    finite = np.isfinite(values)
    # laid out in inches: site names | cells | colour bar and its label; title and legend above, steps below
    names = min(0.2 + 0.06 * max((len(site) for site in sites), default=4), 4.0)
    cells_w, cells_h = max(3.0, min(0.03 * cols, 6.0)), max(1.2, 0.15 * min(rows, MAX_LABELLED_ROWS))
    width, height = names + cells_w + 1.3, 0.35 + cells_h + 0.6
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((names / width, 0.6 / height, cells_w / width, cells_h / height))
    bar_ax = fig.add_axes(((names + cells_w + 0.12) / width, 0.6 / height, 0.14 / width, cells_h / height))
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
    norm = _norm(band)
    scale = colour(norm.inverse(np.linspace(0.0, 1.0, 256)), *band).T   # the bar's 256 entries, band by band
    cmap = ListedColormap(scale).with_extremes(bad=(0, 0, 0, 0))
    image = ax.imshow(np.ma.masked_array(values, mask=~finite), cmap=cmap, norm=norm, aspect="auto",
                      interpolation="nearest", extent=extent)
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
    bar = fig.colorbar(image, cax=bar_ax, ticks=sorted({0.0, *band, 1.0}))
    bar.ax.set_yticklabels([f"{100 * t:g}%" for t in sorted({0.0, *band, 1.0})])
    bar.ax.tick_params(labelsize=7)
    bar.set_label(label, fontsize=8)
    fig.legend(handles=[Patch(color=IDLE_RGB, label="idle / not run yet"), Patch(color=NONFINITE_RGB, label="nonfinite")],
               loc="upper right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=7, frameon=False, borderaxespad=0.3,
               handlelength=1.2, columnspacing=1.0)
    return fig


def png(fig: Any) -> bytes:
    """A figure as PNG bytes."""
    import io

    buffer = io.BytesIO()
    fig.canvas.print_png(buffer)
    return buffer.getvalue()
