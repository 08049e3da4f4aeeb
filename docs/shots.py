"""The docs' images that are not TensorBoard pages: the heatmap's colour bands, the summary in a 60-column
terminal, the HTML report. Run from the repository root after `make demo` (docs/screenshot.sh calls it):
    .venv/bin/python docs/shots.py [runs/demo]
Needs Debian's chromium for the two screenshots."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile

from rich.console import Console

from deadwatch import cli, htmlreport
from deadwatch.reporters import runlog
from deadwatch.reporters.heatmap import figure, png

DOCS = os.path.dirname(os.path.abspath(__file__))


def chromium(url: str, out: str, width: int, height: int) -> None:
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                    "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND",
                    f"--user-data-dir={tempfile.mkdtemp()}", f"--window-size={width},{height}",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)


def heatmap_bands() -> None:
    """Sites at 0%, 0.5% (below warn), 5% (warn band), 30% and a site dying to 90% (critical), idle and nonfinite."""
    steps = list(range(100, 3100, 100))
    ramp = [min(0.9, max(0.0, (i - 8) / 18)) for i in range(len(steps))]
    rows = {"encoder.0.act (0%)": [0.0] * 30, "encoder.1.act (0.5%)": [0.005] * 30,
            "encoder.2.act (5%)": [0.05] * 30, "decoder.0.act (30%)": [0.3] * 30, "decoder.1.act (dying)": ramp,
            "head.act (idle, then nonfinite)": [-math.inf] * 10 + [0.0] * 15 + [math.nan] * 5}
    history = [{site: values[i] for site, values in rows.items()} for i in range(len(steps))]
    with open(os.path.join(DOCS, "heatmap-colours.png"), "wb") as f:
        f.write(png(figure(history, list(rows), steps)))


def summary_60(run_dir: str) -> None:
    log = runlog.read(run_dir).latest()
    console = Console(record=True, width=60, force_terminal=True, color_system="truecolor", file=open(os.devnull, "w"))
    console.print(cli.summary_view(log, log.last, 60))
    svg = console.export_svg(title="deadwatch summary (60 columns)")
    width, height = (int(float(v)) + 1 for v in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups())
    path = os.path.join(tempfile.mkdtemp(), "summary.svg")
    with open(path, "w") as f:
        f.write(svg)
    chromium("file://" + path, os.path.join(DOCS, "summary-60-columns.png"), width, height)


def report(run_dir: str) -> None:
    path = os.path.join(tempfile.mkdtemp(), "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(htmlreport.render(runlog.read(run_dir).latest()))
    chromium("file://" + path, os.path.join(DOCS, "report.png"), 1200, 1000)


if __name__ == "__main__":
    demo = sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "demo")
    heatmap_bands()
    summary_60(os.path.join(demo, "dying"))
    report(os.path.join(demo, "dying"))
