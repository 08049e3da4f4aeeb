"""`deadwatch report RUN_DIR --html OUT.html`: one self-contained page.

Parsed everywhere (no request anywhere: no http in src/href, no external stylesheet or script; every tag
closed; the verdict, the per-site table, the heatmap cells and their colours, the recycling events and the
config checked against the run log), and opened in a real headless Chromium where one is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from deadwatch import cli, htmlreport
from deadwatch.analysis import LayerReport, Report
from deadwatch.causes import Cause
from deadwatch.reporters import runlog
from deadwatch.reporters.heatmap import colour

VOID = {"meta", "br", "img", "input", "link", "hr"}   # HTML's void elements; SVG ones close or self-close


class Page(HTMLParser):
    """The page's tags: (tag, attrs) in order, text per tag path; raises on a tag closed out of order."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[tuple[str, dict]] = []
        self.texts: list[tuple[list[str], str]] = []
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed: {[t for t, _ in self.stack]}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag not in VOID:
            self.stack.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1][0] if self.stack else None}"
        self.stack.pop()

    def handle_data(self, data):
        if data.strip():
            self.texts.append(([t for t, _ in self.stack], data))

    def text(self, tag=None, cls=None):
        return " ".join(d for path, d in self.texts if tag is None or tag in path)


def check_self_contained(text: str, page: Page) -> None:
    for tag, attrs in page.tags:
        for key in ("src", "href", "xlink:href", "srcset", "action", "data"):
            value = attrs.get(key)
            assert value is None or not any(p in value.lower() for p in ("http", "//")), (tag, key, value)
        assert tag not in ("script", "link", "iframe", "img", "object", "embed"), tag
    assert "url(" not in text and "@import" not in text
    assert "http" not in text.lower().replace("http-equiv", "")   # not even in text: nothing to fetch


def write(run_dir, out) -> tuple[str, Page]:
    assert cli.main(["report", str(run_dir), "--html", str(out)]) == 0
    text = Path(out).read_text(encoding="utf-8")
    return text, Page(text)


def expected_cells(log):
    """{(site, step): value} of the heatmap, from the run log's records: NaN nonfinite, -inf idle."""
    def value(layer):
        return np.nan if layer["status"] == "nonfinite" else -np.inf if layer["status"] == "idle" else layer["dead_fraction"]
    return {(layer["name"], r["step"]): value(layer) for r in log.records for layer in r["layers"]}


def check_against_log(page: Page, log: runlog.RunLog) -> None:
    last = log.last
    worst = htmlreport.verdict(last)
    statuses = {layer.status for layer in last.layers}
    assert worst in statuses
    assert page.text("section").split()[0] == worst
    rows = [attrs for tag, attrs in page.tags if tag == "tr" and attrs.get("class") == "site-row"]
    assert [r["data-status"] for r in rows] == [layer.status for layer in last.layers]
    site_cells = [d for path, d in page.texts if path[-2:] == ["tr", "td"]]
    for layer in last.layers:
        assert layer.name in site_cells
    # the heatmap: a cell per site and report, coloured as heatmap.colour() colours the run log's value
    rects = [attrs for tag, attrs in page.tags if tag == "rect" and attrs.get("class") == "cell"]
    cells = expected_cells(log)
    sites = list(dict.fromkeys(layer["name"] for r in log.records for layer in r["layers"]))
    assert len(rects) == len(sites) * len(log.records)
    titles = [d for path, d in page.texts if path[-2:] == ["rect", "title"]]
    assert len(titles) == len(rects)
    config = log.headers[-1]["config"]
    band = (config["thresholds"]["warn"], config["thresholds"]["critical"])
    for rect, title in zip(rects, titles):
        site, step = title.split(", step ")[0], int(title.split(", step ")[1].split(":")[0])
        value = cells.get((site, step))
        value = -np.inf if value is None else value
        want = "#" + "".join(f"{int(round(255 * c)):02x}" for c in colour(np.array([value]), *band)[:, 0])
        assert rect["fill"] == want, (site, step, value)


# ---- the demo's runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    pytest.importorskip("torch")
    from deadwatch import demo
    logdir = tmp_path_factory.mktemp("demo")
    demo.run(str(logdir))
    return logdir


@pytest.mark.slow
@pytest.mark.parametrize("name", ["healthy", "dying"])
def test_report_on_the_demo_runs(demo_runs, tmp_path, name):
    text, page = write(demo_runs / name, tmp_path / f"{name}.html")
    check_self_contained(text, page)
    log = runlog.read(str(demo_runs / name)).latest()
    check_against_log(page, log)
    assert htmlreport.verdict(log.last) == ("ok" if name == "healthy" else "critical")
    assert "window: 50" in page.text("pre") and "report_every: 20" in page.text("pre")   # the config used


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
def test_report_opens_in_headless_chromium(demo_runs, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium): the page is parsed by the other tests")
    out = tmp_path / "dying.html"
    write(demo_runs / "dying", out)
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1200,1000"]
    dom = subprocess.run(base + ["--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = Page(dom.stdout)                       # what the browser built from the page
    check_against_log(rendered, runlog.read(str(demo_runs / "dying")).latest())
    shot = tmp_path / "report.png"
    done = subprocess.run(base + [f"--screenshot={shot}", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-2000:]
    from PIL import Image
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1000, 1200)
    # the critical verdict's red is on screen
    assert ((np.abs(img.astype(int) - [0xc9, 0x2a, 0x2a]).max(axis=2)) < 10).sum() > 500


# ---- a hand-built run: causes, recycling, idle and nonfinite sites, an error, names to escape ------------

def lr(name, status, units=8, dead=(), causes=()):
    dead = list(dead)
    idle = status == "idle"
    return LayerReport(name=name, kind="ReLU", units=units, dead_units=[] if idle else dead,
                       dead_fraction=None if idle else len(dead) / units, zero_fraction=None if idle else 0.5,
                       observations=0 if idle else 64, status=status, dormant_units=dead,
                       dormant_fraction=None if idle else len(dead) / units, causes=list(causes),
                       last_fired=None if idle else [5 if u in dead else 20 for u in range(units)])


def test_report_of_a_run_with_causes_recycling_and_an_error(tmp_path):
    bias = Cause("negative_bias", 1.0, "dead units' median bias -3.1 vs live 0.2 (fc1.bias)")
    first = Report(step=10, window=10, layers=[lr("enc<0>.act", "ok"), lr("head", "idle"), lr("x", "ok")])
    last = Report(step=20, window=10, layers=[lr("enc<0>.act", "critical", dead=[1, 2, 3], causes=[bias]),
                                              lr("head", "nonfinite"), lr("x", "warn", dead=[0])],
                  error="RuntimeError: boom")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"window": 10, "thresholds": {"warn": 0.02, "critical": 0.3}}
    lines = [{"type": "header", "started": "2025-01-01T00:00:00+00:00", "deadwatch": "0.1.0", "torch": "2.0",
              "config": config, "resumed": False},
             {"type": "report", "time": "t", **first.to_dict(), "firing_rate": {}},
             {"type": "recycle", "time": "t", "step": 15, "units": {"x": [4, 5]}},
             {"type": "report", "time": "t", **last.to_dict(), "firing_rate": {}}]
    (run_dir / runlog.FILENAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    text, page = write(run_dir, tmp_path / "out.html")
    check_self_contained(text, page)
    log = runlog.read(str(run_dir)).latest()
    check_against_log(page, log)
    assert htmlreport.verdict(last) == "nonfinite"
    assert "enc&lt;0&gt;.act" in text and "enc<0>" not in text      # escaped
    assert bias.evidence in page.text("li") and "negative_bias" in page.text("b")
    assert "RuntimeError: boom" in page.text("p")
    recycling = [d for path, d in page.texts if "table" in path and path[-1] == "td"]
    assert ["15", "x", "2", "4, 5"] == recycling[-4:]
    assert "warn: 0.02" in page.text("pre")


def test_report_errors_exit_2_with_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing"), "--html", str(tmp_path / "o.html")]) == 2
    assert "no such directory" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runlog.FILENAME).write_text(json.dumps(
        {"type": "report", "step": 1, "window": 1, "layers": []}) + "\n")
    assert cli.main(["report", str(run_dir), "--html", str(tmp_path / "nodir" / "o.html")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and err.count("\n") == 1
    assert cli.main(["report", str(run_dir)]) == 2                    # --html is required
    assert "--html" in capsys.readouterr().err
