"""Dashboards that people read: the heatmaps as labelled matplotlib figures (dead and dormant), the raw image
when matplotlib is missing, and the CLI summary's sparkline of the dead fraction and top cause per site.

Reports are built by hand (no training): the figures under test are the reporter's and the CLI's drawing of
known fractions.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

import deadwatch
from deadwatch import cli
from deadwatch.analysis import HINTS, LayerReport, Report
from deadwatch.causes import Cause
from deadwatch.reporters import runlog
from deadwatch.reporters import tensorboard as tb
from test_cli import table  # the rich-table parser the CLI tests use

matplotlib = pytest.importorskip("matplotlib")   # in the dev extra; the fallback tests below run either way
from matplotlib.figure import Figure  # noqa: E402

SITES = ["encoder.layers.0.mlp.act", "head.act"]
TAGS = ("deadwatch/heatmap", "deadwatch/heatmap_dormant")


def layer(name, status, dead=0, dormant=0, units=8, causes=()):
    idle = status == "idle"
    return LayerReport(name=name, kind="ReLU", units=units, dead_units=[] if idle else list(range(dead)),
                       dead_fraction=None if idle else dead / units, zero_fraction=None if idle else 0.5,
                       observations=0 if idle else 64, status=status,
                       dormant_units=[] if idle else list(range(dormant)),
                       dormant_fraction=None if idle else dormant / units, causes=list(causes))


# encoder: dead 0, 4/8, 8/8, 8/8; dormant 8/8 throughout (dormant, not dead, at first)
# head: idle, ok, nonfinite, ok
REPORTS = [
    Report(step=10, window=10, layers=[layer(SITES[0], "ok", 0, 8), layer(SITES[1], "idle")]),
    Report(step=20, window=10, layers=[layer(SITES[0], "critical", 4, 8), layer(SITES[1], "ok", 0, 2)]),
    Report(step=30, window=10, layers=[layer(SITES[0], "critical", 8, 8), layer(SITES[1], "nonfinite", 0, 0)]),
    Report(step=40, window=10, layers=[layer(SITES[0], "critical", 8, 8), layer(SITES[1], "ok", 0, 0)]),
]


def emit_all(logdir, reports=REPORTS, image_every=1):
    reporter = tb.TensorBoardReporter(str(logdir), deadwatch.config.load(image_every=image_every))
    for report in reports:
        reporter.emit(report)
    reporter.close()
    acc = ea.EventAccumulator(str(logdir), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return reporter, acc


def decode(event):
    img = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"), dtype=np.int64)
    assert img.shape == (event.height, event.width, 3)
    return img


def history(field="dead_fraction"):
    return [tb.heat(report, field) for report in REPORTS]


def cells_axes(fig):
    """The axes with the cells (the other one is the colour bar)."""
    (ax,) = [ax for ax in fig.axes if ax.get_images() and ax.get_ylabel() == ""]
    return ax


def pixel(fig, ax, row, col):
    """The rendered RGB at the centre of cell (row, col)."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    x, y = ax.transData.transform((col, row))
    return tuple(int(v) for v in rgba[int(round(rgba.shape[0] - y)), int(round(x)), :3])


# ---- the figure ---------------------------------------------------------------------------------

def test_figure_names_sites_on_rows_and_steps_on_columns():
    fig = tb.figure(history(), SITES, [r.step for r in REPORTS])
    assert isinstance(fig, Figure)
    ax = cells_axes(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == SITES
    assert list(ax.get_yticks()) == [0, 1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "20", "30", "40"]
    assert list(ax.get_xticks()) == [0, 1, 2, 3]
    assert "step" in ax.get_xlabel()
    # a colour bar, labelled with what the colour is
    bars = [a for a in fig.axes if a is not ax]
    assert len(bars) == 1 and bars[0].get_ylabel().startswith("dead fraction")
    # idle and nonfinite are named in a legend
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["idle / not run yet", "nonfinite"]


def test_figure_cells_hold_the_fractions_with_idle_and_nonfinite_apart():
    fig = tb.figure(history(), SITES, [r.step for r in REPORTS])
    ax = cells_axes(fig)
    values, marks = (im.get_array() for im in ax.get_images())
    expected = np.array([[0.0, 0.5, 1.0, 1.0], [-math.inf, 0.0, math.nan, 0.0]])
    finite = np.isfinite(expected)
    assert (np.ma.getmaskarray(values) == ~finite).all()
    assert np.array_equal(values.data[finite], expected[finite])
    assert (np.ma.getmaskarray(marks) == finite).all()
    assert marks[1, 0] == 0 and marks[1, 2] == 1                    # idle, nonfinite
    # rendered: each cell in its band's colour (up to a step of the 256-entry colour table), slate idle,
    # magenta nonfinite
    rgb = {(r, c): pixel(fig, ax, r, c) for r in range(2) for c in range(4)}

    def near(got, value, tolerance=4):
        want = 255 * tb.colour(np.array([value]))[:, 0]
        return max(abs(a - b) for a, b in zip(got, want)) <= tolerance

    assert rgb[0, 0] == rgb[1, 1] and near(rgb[0, 0], 0.0)
    assert rgb[0, 2] == rgb[0, 3] and near(rgb[0, 2], 1.0)
    assert near(rgb[0, 1], 0.5, tolerance=8)
    assert max(abs(a - 255 * b) for a, b in zip(rgb[1, 0], tb.IDLE_RGB)) <= 1   # 8-bit rounding
    assert rgb[1, 2] == (255, 0, 255)


def hue(rgb):
    import colorsys
    h, l, s = colorsys.rgb_to_hls(*rgb)
    return 360 * h, l, s


@pytest.mark.parametrize("warn, critical", [(0.01, 0.10), (0.02, 0.3), (0.0, 0.1)])
def test_colour_bands_keep_healthy_calm_warn_distinct_critical_red(warn, critical):
    """Below warn: a neutral grey (saturation low), lighter at 0; the warn band amber/orange; critical red,
    darker towards 100%. A 5%-dead layer with the default thresholds is amber, not red."""
    values = np.array([0.0, warn / 2, warn, (warn + critical) / 2, critical, 1.0])
    rgb = tb.colour(values, warn, critical).T
    zero, below, at_warn, mid_warn, at_critical, full = (hue(c) for c in rgb)
    for h, l, s in ([zero, below] if warn > 0 else []):
        assert s < 0.3 and l > 0.75                                      # neutral, light
    if warn > 0:
        assert zero[1] > below[1]                                        # darker towards warn
    for h, l, s in (at_warn, mid_warn):
        assert 25 <= h <= 50 and s > 0.8                                 # amber / orange
    for h, l, s in (at_critical, full):
        assert (h <= 5 or h >= 345) and s > 0.6                          # red
    assert at_critical[1] > full[1]                                      # darker towards 100%
    five = hue(tb.colour(np.array([0.05]))[:, 0])
    assert 25 <= five[0] <= 50                                           # the default bands: 5% is warn, amber


def test_bands_per_field():
    config = deadwatch.config.load(thresholds={"warn": 0.02, "critical": 0.2, "dormant": 0.3})
    assert tb.bands(config, "dead_fraction") == (0.02, 0.2)
    assert tb.bands(config, "dormant_fraction") == (0.3, 0.5)          # the dormant flag share, then half
    assert tb.bands(deadwatch.config.load(thresholds={"dormant": 0.7}), "dormant_fraction") == (0.7, 0.7)


def test_colour_bar_marks_the_bands():
    fig = tb.figure(history(), SITES, [r.step for r in REPORTS], band=(0.02, 0.2))
    (bar,) = [a for a in fig.axes if a is not cells_axes(fig)]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0%", "2%", "20%", "100%"]
    # each band a third of the bar
    assert np.allclose(bar.get_yticks(), [0, 0.02, 0.2, 1.0])


def test_figure_labels_every_kth_site_when_there_are_many():
    sites = [f"blocks.{i}.act" for i in range(150)]
    fig = tb.figure([{s: 0.0 for s in sites}] * 3, sites, [1, 2, 3])
    labels = [t.get_text() for t in cells_axes(fig).get_yticklabels()]
    assert labels == sites[::3]                 # ceil(150 / MAX_LABELLED_ROWS=60) = 3


@pytest.mark.parametrize("last_step", [2_000, 20_000_000])
def test_figure_x_ticks_are_at_most_ten_report_steps_that_do_not_overlap(last_step):
    steps = np.linspace(last_step / 200, last_step, 200).astype(int).tolist()       # 200 reports
    fig = tb.figure([{"a": 0.1}] * 200, ["a"], steps)
    ax = cells_axes(fig)
    ticks = [int(t) for t in ax.get_xticks()]
    assert ticks[0] == 0 and ticks[-1] == 199
    assert len(ticks) == (tb.MAX_X_TICKS if last_step == 2_000 else 7)   # 8-digit steps: fewer fit
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == [str(steps[t]) for t in ticks]
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in labels]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


# ---- the event file -----------------------------------------------------------------------------

def test_figure_heatmaps_written_dead_and_dormant(tmp_path):
    reporter, acc = emit_all(tmp_path)
    assert reporter.plots
    assert set(acc.Tags()["images"]) == set(TAGS)
    for tag, field in tb.HEATMAPS.items():
        images = acc.Images(tag)
        assert [im.step for im in images] == [10, 20, 30, 40]
        last = images[-1]
        fig = tb.figure(history(field), SITES, [10, 20, 30, 40], tb.LABELS[field])
        assert (last.width, last.height) == fig.canvas.get_width_height()   # the figure, not the raw cells
        assert last.width > 400 and last.height > 150
        decode(last)
    dead, dormant = (decode(acc.Images(tag)[-1]) for tag in TAGS)
    assert dead.shape == dormant.shape and not np.array_equal(dead, dormant)


def test_dormant_heatmap_shows_the_dormant_fraction():
    assert [tb.heat(r, "dormant_fraction")[SITES[0]] for r in REPORTS] == [1.0, 1.0, 1.0, 1.0]
    head = [tb.heat(r, "dormant_fraction")[SITES[1]] for r in REPORTS]
    assert head[0] == -math.inf and head[1] == 0.25 and math.isnan(head[2]) and head[3] == 0.0
    fig = tb.figure(history("dormant_fraction"), SITES, [10, 20, 30, 40], "dormant fraction")
    ax = cells_axes(fig)
    assert ax.get_title(loc="left") == "dormant fraction"
    want = 255 * tb.colour(np.array([1.0]), *tb.bands(deadwatch.config.load(), "dormant_fraction"))[:, 0]
    assert max(abs(a - b) for a, b in zip(pixel(fig, ax, 0, 0), want)) <= 4   # dormant everywhere, barely dead


def test_fallback_without_matplotlib_is_the_raw_image(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` raises ImportError
    reporter, acc = emit_all(tmp_path, image_every=2)
    assert not reporter.plots
    assert set(acc.Tags()["images"]) == set(TAGS)              # the same tags
    for tag, field in tb.HEATMAPS.items():
        images = acc.Images(tag)
        assert [im.step for im in images] == [10, 30, 40]      # every image_every=2 reports, and the last at close
        for im, columns in zip(images, (1, 3, 4)):
            assert (im.height, im.width) == (len(SITES) * tb.CELL_H, columns * tb.CELL_W)
        img = decode(images[1])
        band = {"dead_fraction": (0.01, 0.10), "dormant_fraction": (0.10, 0.5)}[field]   # default.yaml's thresholds
        expected = tb.heatmap(history(field)[:3], SITES, band).numpy()
        assert np.abs(img - 255 * expected.transpose(1, 2, 0)).max() <= 1      # 8-bit rounding


# ---- the CLI: sparkline and top cause -----------------------------------------------------------

@pytest.mark.parametrize("values, line", [
    ([0.0, 0.5, 1.0], "▁▅█"),
    ([None, 0.0, 0.01, None], "·▁▂·"),                              # idle: the blank mark; any dead unit shows
    ([1 / 7, 1 / 7 + 1e-6, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 6 / 7 + 1e-6], "▂▃▃▄▅▆▇█"),
    ([], ""),
])
def test_sparkline(values, line):
    assert cli.sparkline(values) == line


def test_sparkline_bins_long_runs_keeping_spikes():
    values = [0.0] * 48
    values[7] = 1.0                      # one spike in bin 3 of 24 (2 reports a bin)
    values[20:24] = [None] * 4           # bins 10 and 11: idle throughout
    assert cli.sparkline(values) == "▁▁▁█▁▁▁▁▁▁··▁▁▁▁▁▁▁▁▁▁▁▁"
    assert len(cli.sparkline([0.5] * 1000)) == cli.SPARK_WIDTH


def write_log(run_dir, *runs):
    """A run log holding `runs` (each a list of Reports), each after its own header."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for reports in runs:
        lines.append({"type": "header", "started": "2025-01-01T00:00:00+00:00", "deadwatch": "0.1.0",
                      "torch": "2.0", "config": {}, "resumed": False})
        lines += [{"type": "report", "time": "2025-01-01T00:00:00+00:00", **r.to_dict(), "firing_rate": {}}
                  for r in reports]
    (run_dir / runlog.FILENAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(run_dir)


@pytest.fixture(autouse=True)
def wide_plain_console(monkeypatch):
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "250")


def summary(capsys, *argv):
    capsys.readouterr()
    assert cli.main(["summary", *map(str, argv)]) == 0
    out = capsys.readouterr().out
    return out, *table(out)


CAUSE = Cause(code="negative_bias", score=1.0, evidence="dead units' bias median -4.1, live 0.02", units=8, dead=8)


def test_summary_shows_the_sparkline_of_the_latest_run_and_the_top_cause(tmp_path, capsys):
    earlier = [Report(step=10, window=10, layers=[layer(SITES[0], "critical", 8), layer(SITES[1], "critical", 8)])]
    latest = list(REPORTS)
    latest[-1] = Report(step=40, window=10, layers=[layer(SITES[0], "critical", 8, causes=[CAUSE]),
                                                    layer(SITES[1], "ok", 0)])
    path = write_log(tmp_path / "run", earlier, latest)
    out, header, rows = summary(capsys, path)
    assert header.index("dead per report") == header.index("dead trend") - 1
    assert rows[SITES[0]]["dead per report"] == "▁▅██"          # 0, 4/8, 8/8, 8/8
    assert rows[SITES[1]]["dead per report"] == "·▁▁▁"          # idle, then 0 (nonfinite at 30 with 0 dead)
    # the top cause with its evidence on the flagged site's line
    line = next(line for line in out.splitlines() if line.startswith(f"{SITES[0]} (critical): "))
    assert line == f"{SITES[0]} (critical): {CAUSE.hint()}"
    assert CAUSE.hint().startswith("negative_bias (score 1.00, 8 of 8 dead units): dead units' bias median -4.1, "
                                   "live 0.02. Try: ")
    # --site keeps the sparkline of the kept site
    out, header, rows = summary(capsys, path, "--site", "head")
    assert list(rows) == [SITES[1]] and rows[SITES[1]]["dead per report"] == "·▁▁▁"


def test_summary_without_a_cause_shows_the_status_hint(tmp_path, capsys):
    path = write_log(tmp_path / "run", REPORTS)
    out, header, rows = summary(capsys, path)
    assert f"{SITES[0]} (critical): {HINTS['critical']}" in out.splitlines()
    assert re.fullmatch(r"[▁-█·]{4}", rows[SITES[0]]["dead per report"])


def test_custom_scalars_put_dormant_and_saturated_beside_dead(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    reporter, acc = emit_all(tmp_path, REPORTS[:1])
    (tag,) = acc.PluginTagToContent("custom_scalars")
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(tag)[0].tensor_proto.string_val[0])
    category = layout.category[0]
    shown = [[t for t in ("deadwatch/dead_fraction/a", "deadwatch/dormant_fraction/a",
                          "deadwatch/saturated_fraction/a", "deadwatch/threshold/warn")
              if any(re.match(rx, t) for rx in chart.multiline.tag)] for chart in category.chart]
    assert shown[:3] == [["deadwatch/dead_fraction/a", "deadwatch/threshold/warn"],
                         ["deadwatch/dormant_fraction/a", "deadwatch/threshold/warn"],
                         ["deadwatch/saturated_fraction/a", "deadwatch/threshold/warn"]]


def tensorboard_y_range(values):
    """TensorBoard's y range for a chart with "ignore outliers in chart scaling" (its default): the 5% and 95%
    quantiles, a fifth of their span added above (vz_chart_helpers.computeDomain)."""
    a, b = np.quantile(values, 0.05), np.quantile(values, 0.95)
    return a, b + 0.2 * (b - a) if b > a else b + (0.1 if abs(b) < 1e-5 else 0.1 * abs(b))


def test_custom_scalars_chart_per_site_named_and_unclipped(tmp_path):
    """One chart per site, titled with the site, showing that site's lines only (with the thresholds and the
    100% line): a reader tells the lines apart, and a site that jumps to 90% dead in the last report, among 30
    sites at 0, is inside TensorBoard's outlier-ignoring y range, which would cut it off without the 100% line."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    sites = [f"blocks.{i}.act" for i in range(30)]
    reports = [Report(step=10 * (s + 1), window=10, layers=[layer(site, "ok") for site in sites[:-1]]
                      + [layer(sites[-1], "critical", dead=9, dormant=9, units=10) if s == 19 else layer(sites[-1], "ok")])
               for s in range(20)]
    reporter, acc = emit_all(tmp_path, reports, image_every=100)
    (tag,) = acc.PluginTagToContent("custom_scalars")
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(tag)[0].tensor_proto.string_val[0])
    per_site = {c.title: c for category in layout.category[1:] for c in category.chart}
    assert [t.split(":")[0] for t in per_site] == sites
    tags = acc.Tags()["scalars"]

    def shown(chart):   # TensorBoard's custom-scalars plugin selects tags with re.match
        return {t for t in tags if any(re.match(rx, t) for rx in chart.multiline.tag)}

    for site in sites:
        chart = next(c for t, c in per_site.items() if t.startswith(site + ":"))
        assert {t for t in shown(chart) if "threshold" not in t and "scale" not in t} == {
            f"deadwatch/{f}_fraction/{site}" for f in ("dead", "dormant")}
    last = next(c for t, c in per_site.items() if t.startswith(sites[-1] + ":"))
    values = [e.value for t in shown(last) for e in acc.Scalars(t)]
    assert max(values) == 1.0 and tensorboard_y_range(values)[1] >= 1.0       # 0-100%: the 90% point shows
    without_full = [e.value for t in shown(last) - {"deadwatch/scale/full"} for e in acc.Scalars(t)]
    assert tensorboard_y_range(without_full)[1] < 0.9                           # it would be cut off
    overview = next(c for c in layout.category[0].chart if c.title.startswith("dead fraction per site"))
    every_site = [e.value for t in shown(overview) - {"deadwatch/scale/full"} for e in acc.Scalars(t)]
    assert tensorboard_y_range(every_site)[1] < 0.9                             # why the per-site charts


# ---- the summary in a narrow terminal ----------------------------------------------------------------

LONG = "encoder.layer.11.intermediate.intermediate_act_fn"


@pytest.mark.parametrize("columns", [30, 36, 60, 72, 200])
def test_summary_fits_a_narrow_terminal_without_cutting(tmp_path, capsys, monkeypatch, columns):
    """In a terminal of 60 columns: site names, dead counts and status are never cut to an ellipsis; the
    lower-priority columns go first (kind, zero frac, units, trend, ...); a long site name wraps."""
    reports = [Report(step=s, window=10, layers=[layer(LONG, "critical", dead=d, dormant=d),
                                                 layer("head.act", "ok", 0, 0)]) for s, d in ((10, 2), (20, 5))]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [{"type": "header", "started": "t", "deadwatch": "0.1.0", "torch": "2", "config": {}, "resumed": False}]
    lines += [{"type": "report", "time": "t", **r.to_dict(), "firing_rate": {}} for r in reports]
    (run_dir / runlog.FILENAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("TTY_COMPATIBLE", "1")      # rich: a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli.main(["summary", str(run_dir)]) == 0
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert max(len(line) for line in out.splitlines()) <= columns
    assert "…" not in out
    assert "5 (62.5%)" in out and "0 (0.0%)" in out and "critical" in out    # whole, on one line each
    if columns < 36:   # narrower than site + dead + status: even the header names fold
        return
    body = [line for line in out.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in body]
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    names = [c.strip() for c in header.strip("┃").split("┃")]
    assert names[0] == "site" and "dead" in names and names[-1] == "status"
    assert "".join(c[0] for c in cells) == LONG + "head.act"            # wrapped, whole
    dead = names.index("dead")
    assert [c[dead] for c in cells if c[dead]] == ["5 (62.5%)", "0 (0.0%)"]
    assert [c[-1] for c in cells if c[-1]] == ["critical", "ok"]
    if columns == 200:
        assert len(names) == 10                                          # room enough: every column
    if columns == 60:
        assert "kind" not in names and "zero frac" not in names          # dropped first
