"""TensorBoard dashboards: scalars, histograms, custom-scalars layout, heatmap image, text summary;
read back with TensorBoard's EventAccumulator and from a real TensorBoard server.

Expected figures come from a plain re-computation of each step's activations (F.linear + relu on
the same weights and inputs), and are also compared with the monitor's own Reports.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2

from deadwatch.analysis import HINTS
from deadwatch.reporters import tensorboard as tb
from planted import report_ends, watch_planted

WARN, CRITICAL = 0.04, 0.20
SITES = ["act.0", "act.1", "act.2"]
SIZES = (4, 8, 20, 12)
PLANTED = {0: [1, 5], 1: [3]}          # act.0: 2/8 critical, act.1: 1/20 warn, act.2: none, ok
REPORT_EVERY, STEPS, WINDOW, IMAGE_EVERY = 5, 23, 5, 2


# ---- reference figures for the tiny MLP with planted dead units (tests/planted.py) ---------

def expected_report(history, step, interval_start, window, warn, critical):
    layers = {}
    for name in history[0]:
        counts = np.stack([h[name][0] for h in history[:step]])
        bad = np.stack([h[name][1] for h in history[:step]])
        obs = np.array([h[name][2] for h in history[:step]])
        lo = max(step - window, 0)
        dead = [u for u in range(counts.shape[1]) if not (counts[lo:step, u] > 0).any()]
        rate = counts[interval_start:step].sum(0) / obs[interval_start:step].sum()
        frac = len(dead) / counts.shape[1]
        status = ("nonfinite" if bad[lo:step].any() else
                  "critical" if frac >= critical else "warn" if frac >= warn else "ok")
        layers[name] = {"units": counts.shape[1], "dead_units": dead, "dead_fraction": frac, "firing_rate": rate,
                        "zero_fraction": float(1.0 - rate.mean()), "status": status}
    units = sum(e["units"] for e in layers.values())
    return {"step": step, "layers": layers, "units": units,
            "dead_fraction": sum(len(e["dead_units"]) for e in layers.values()) / units,
            "flagged": [n for n, e in layers.items() if e["status"] != "ok"]}


def train(logdir, *, sizes=SIZES, planted=PLANTED, steps=STEPS, report_every=REPORT_EVERY, window=WINDOW,
          batch=16, seed=0, warn=WARN, critical=CRITICAL, **overrides):
    history, own = watch_planted(logdir, sizes=sizes, planted=planted, steps=steps, report_every=report_every,
                                 window=window, batch=batch, seed=seed, reporters=["jsonl", "tensorboard"],
                                 thresholds={"warn": warn, "critical": critical}, **overrides)
    ends = report_ends(steps, report_every)
    expected = [expected_report(history, end, (end - 1) // report_every * report_every, window, warn, critical)
                for end in ends]
    return expected, own


def accumulator(logdir):
    acc = ea.EventAccumulator(str(logdir), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def _run(tmp_path_factory, name, **overrides):
    logdir = tmp_path_factory.mktemp(name)
    expected, own = train(logdir, image_every=IMAGE_EVERY, **overrides)
    # the set-up is what we think it is
    assert [e["step"] for e in expected] == [5, 10, 15, 20, 23]
    for e in expected:
        assert [e["layers"][s]["dead_units"] for s in SITES] == [[1, 5], [3], []]
        assert [e["layers"][s]["status"] for s in SITES] == ["critical", "warn", "ok"]
    return logdir, expected, own, accumulator(logdir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run at the default configuration: for the tests of tags, verdicts, image and text."""
    return _run(tmp_path_factory, "tb_run")


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    """The same run where matplotlib cannot be imported: the heatmaps are the raw images of coloured cells."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` raises ImportError
        return _run(tmp_path_factory, "tb_run_raw")


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    """The same run counting every value (count_subsample=1): for the tests that compare zero_fraction and
    firing rates with the figures recomputed from all values."""
    return _run(tmp_path_factory, "tb_run_exact", count_subsample=1)


def scalar_tags(sites):
    return ({f"deadwatch/dead_fraction/{s}" for s in sites} | {f"deadwatch/zero_fraction/{s}" for s in sites}
            | {f"deadwatch/dormant_fraction/{s}" for s in sites}
            | {"deadwatch/dead_fraction/all", "deadwatch/flagged_sites",
               "deadwatch/threshold/warn", "deadwatch/threshold/critical", "deadwatch/scale/full"})


# ---- tags -------------------------------------------------------------------------------------

def test_tags_are_exactly_the_documented_ones(run):
    logdir, expected, own, acc = run
    tags = acc.Tags()
    assert set(tags["scalars"]) == scalar_tags(SITES)
    assert set(tags["histograms"]) == {f"deadwatch/firing_rate/{s}" for s in SITES}
    assert set(tags["images"]) == {"deadwatch/heatmap", "deadwatch/heatmap_dormant"}


def test_tag_names_do_not_depend_on_shapes_or_counts(run, tmp_path):
    """Another batch size, step count, report interval: the same tags."""
    logdir, expected, own, acc = run
    train(tmp_path, steps=12, report_every=3, batch=7, seed=3)
    other = accumulator(tmp_path).Tags()
    tags = acc.Tags()
    for kind in ("scalars", "histograms", "images", "tensors"):
        assert set(other[kind]) == set(tags[kind]), kind


# ---- values -----------------------------------------------------------------------------------

def test_scalar_values_equal_the_reports(exact_run):
    logdir, expected, own, acc = exact_run
    steps = [e["step"] for e in expected]

    def series(tag):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == steps, tag
        return [e.value for e in events]

    for site in SITES:
        dead = series(f"deadwatch/dead_fraction/{site}")
        zero = series(f"deadwatch/zero_fraction/{site}")
        for i, (exp, report) in enumerate(zip(expected, own)):
            layer = report.layer(site)
            assert dead[i] == pytest.approx(exp["layers"][site]["dead_fraction"], rel=1e-6)
            assert dead[i] == pytest.approx(layer.dead_fraction, rel=1e-6)
            assert zero[i] == pytest.approx(exp["layers"][site]["zero_fraction"], rel=1e-6, abs=1e-7)
            assert zero[i] == pytest.approx(layer.zero_fraction, rel=1e-6, abs=1e-7)
    for value, exp, report in zip(series("deadwatch/dead_fraction/all"), expected, own):
        assert value == pytest.approx(exp["dead_fraction"], rel=1e-6)
        assert value == pytest.approx(report.dead_fraction, rel=1e-6)
        assert value == pytest.approx(3 / 40, rel=1e-6)
    for value, exp, report in zip(series("deadwatch/flagged_sites"), expected, own):
        assert value == len(exp["flagged"]) == len(report.flagged) == 2
    assert series("deadwatch/threshold/warn") == [pytest.approx(WARN)] * len(steps)
    assert series("deadwatch/threshold/critical") == [pytest.approx(CRITICAL)] * len(steps)


def test_firing_rate_histograms(exact_run):
    logdir, expected, own, acc = exact_run
    steps = [e["step"] for e in expected]
    for site in SITES:
        events = acc.Histograms(f"deadwatch/firing_rate/{site}")
        assert [e.step for e in events] == steps
        for event, exp, report in zip(events, expected, own):
            h = event.histogram_value
            rate = exp["layers"][site]["firing_rate"]
            assert np.allclose(np.asarray(report.layer(site).firing_rate, dtype=np.float64), rate, atol=1e-9)
            assert h.num == exp["layers"][site]["units"]
            assert sum(h.bucket) == exp["layers"][site]["units"]
            assert h.min == pytest.approx(rate.min(), abs=1e-6)
            assert h.max == pytest.approx(rate.max(), abs=1e-6)
            assert h.sum == pytest.approx(rate.sum(), abs=1e-5)
            assert h.sum_squares == pytest.approx((rate ** 2).sum(), abs=1e-5)
            if exp["layers"][site]["dead_units"]:
                assert h.min == 0.0


def decode(event):
    img = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"), dtype=np.float64)
    assert img.shape == (event.height, event.width, 3)
    return img


def test_heatmap_image_without_matplotlib(raw_run):
    """The fallback (tests/test_dashboards.py tests the figure drawn with matplotlib)."""
    logdir, expected, own, acc = raw_run
    assert set(acc.Tags()["images"]) == {"deadwatch/heatmap", "deadwatch/heatmap_dormant"}
    images = acc.Images("deadwatch/heatmap")
    report_steps = [e["step"] for e in expected]
    # every IMAGE_EVERY reports: consecutive images IMAGE_EVERY reports apart, none missed
    positions = [report_steps.index(im.step) for im in images]
    assert len(images) >= len(report_steps) // IMAGE_EVERY
    assert all(b - a == IMAGE_EVERY for a, b in zip(positions, positions[1:]))
    assert positions[-1] + IMAGE_EVERY > len(report_steps) - 1
    for im, pos in zip(images, positions):
        assert im.height == len(SITES) * tb.CELL_H                 # one row of cells per site
        assert im.width == (pos + 1) * tb.CELL_W                   # one column per report so far
        img = decode(im)
        # a row's colour follows its dead fraction: 25% vs 5% vs 0% give three distinct,
        # monotonically ordered brightnesses, the same in every column (the fractions do not change)
        bright = [img[r * tb.CELL_H:(r + 1) * tb.CELL_H].sum(axis=2) for r in range(len(SITES))]
        for b in bright:
            assert b.max() == b.min()   # constant dead fraction: one colour over all columns
        levels = [b[0, 0] for b in bright]          # act.0 25%, act.1 5%, act.2 0%
        assert levels[0] > levels[1] > levels[2] or levels[0] < levels[1] < levels[2], levels


def text_events(acc):
    tags = list(acc.PluginTagToContent("text"))
    assert len(tags) == 1, tags
    return acc.Tensors(tags[0])


def test_text_summary_per_report(run):
    logdir, expected, own, acc = run
    events = text_events(acc)
    assert [e.step for e in events] == [e["step"] for e in expected]
    assert len(own) == len(expected)
    for event, exp, mine in zip(events, expected, own):
        text = event.tensor_proto.string_val[0].decode()
        table = [line for line in text.splitlines() if line.startswith("|")]
        header = [c.strip() for c in table[0].strip("|").split("|")]
        assert "site" in header and "status" in header
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1].replace(" ", "")), table[1]  # markdown rule
        rows = {}
        for line in table[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
        assert list(rows) == SITES
        for site in SITES:
            e = exp["layers"][site]
            cells = rows[site]
            assert cells[header.index("status")] == e["status"]
            assert str(e["units"]) in cells
            dead_cell = [c for c in cells if c.startswith(f"{len(e['dead_units'])} (")]
            assert dead_cell and f"{100 * e['dead_fraction']:.1f}%" in dead_cell[0], cells
        for site in exp["flagged"]:  # the hint: the top cause with its evidence, or the status's generic one
            hint = mine.layer(site).hint
            assert any(site in line and hint in line for line in text.splitlines()), (site, text)


def test_text_summary_tag_is_deadwatch_summary(run):
    """The documented tag: `deadwatch/summary`, as listed by TensorBoard's text plugin."""
    logdir, expected, own, acc = run
    assert list(acc.PluginTagToContent("text")) == ["deadwatch/summary"]


def test_custom_scalars_layout_written_once(run):
    logdir, expected, own, acc = run
    content = acc.PluginTagToContent("custom_scalars")
    assert len(content) == 1
    (tag,) = content
    events = acc.Tensors(tag)
    assert len(events) == 1                                         # written once, not per report
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    charts = [chart for category in layout.category for chart in category.chart]
    assert charts

    all_scalars = scalar_tags(SITES)
    dead = {f"deadwatch/dead_fraction/{s}" for s in SITES} | {"deadwatch/dead_fraction/all"}
    zero = {f"deadwatch/zero_fraction/{s}" for s in SITES}
    thresholds = {"deadwatch/threshold/warn", "deadwatch/threshold/critical", "deadwatch/scale/full"}

    def shown(chart):  # TensorBoard's custom-scalars plugin selects tags with re.match
        assert chart.HasField("multiline")
        return {t for t in all_scalars if any(re.match(rx, t) for rx in chart.multiline.tag)}

    assert any(shown(chart) == dead | thresholds for chart in charts), [shown(c) for c in charts]
    assert any(shown(chart) == zero for chart in charts), [shown(c) for c in charts]


# ---- a real TensorBoard server --------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tensorboard_server_serves_the_values(exact_run, tmp_path):
    logdir, expected, own, acc = exact_run
    tensorboard = Path(sys.executable).parent / "tensorboard"
    assert tensorboard.exists(), tensorboard
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy

    def get(path, **params):
        url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with opener.open(url, timeout=10) as response:
            assert response.status == 200
            return json.loads(response.read().decode())

    log = open(tmp_path / "tensorboard.log", "wb")
    proc = subprocess.Popen([str(tensorboard), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                             "--load_fast=false"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        tags = {}
        while True:
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text(errors="replace")
            try:
                tags = get("/data/plugin/scalars/tags")
                if tags and all(scalar_tags(SITES) <= set(t) for t in tags.values()):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"TensorBoard did not serve the run within 60 s: {tags}"
            time.sleep(0.25)

        assert len(tags) == 1
        (run_name,) = tags
        assert set(tags[run_name]) == scalar_tags(SITES)
        steps = [e["step"] for e in expected]
        for site in SITES:
            points = get("/data/plugin/scalars/scalars", run=run_name, tag=f"deadwatch/dead_fraction/{site}")
            assert [p[1] for p in points] == steps
            for p, exp, report in zip(points, expected, own):
                assert p[2] == pytest.approx(exp["layers"][site]["dead_fraction"], rel=1e-6)
                assert p[2] == pytest.approx(report.layer(site).dead_fraction, rel=1e-6)
            points = get("/data/plugin/scalars/scalars", run=run_name, tag=f"deadwatch/zero_fraction/{site}")
            assert [p[1] for p in points] == steps
            for p, exp in zip(points, expected):
                assert p[2] == pytest.approx(exp["layers"][site]["zero_fraction"], rel=1e-6, abs=1e-7)
        points = get("/data/plugin/scalars/scalars", run=run_name, tag="deadwatch/flagged_sites")
        assert [p[2] for p in points] == [len(e["flagged"]) for e in expected]

        htags = get("/data/plugin/histograms/tags")
        assert set(htags[run_name]) == {f"deadwatch/firing_rate/{s}" for s in SITES}
        for site in SITES:
            series = get("/data/plugin/histograms/histograms", run=run_name, tag=f"deadwatch/firing_rate/{site}")
            assert [s[1] for s in series] == steps
            for (_, _, buckets), exp in zip(series, expected):
                rate = exp["layers"][site]["firing_rate"]
                assert sum(b[2] for b in buckets) == pytest.approx(exp["layers"][site]["units"])
                assert buckets[0][0] == pytest.approx(rate.min(), abs=1e-6)
                assert buckets[-1][1] == pytest.approx(rate.max(), abs=1e-6)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
