"""`deadwatch report RUN_DIR --html OUT.html`: one self-contained page about a run, to attach to a PR or send.

Everything is inline (styles, the trend charts and the heatmap as SVG): the page makes no request, so it
opens the same offline, from a mail attachment or a CI artifact. Built from the run log alone (no torch):
the verdict at a glance, the per-site table with causes and evidence, the dead-fraction trends, the
heatmap (the colours of reporters/heatmap.py), the recycling events and the config the run used.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import yaml

from . import __version__
from .analysis import CRITICAL, IDLE, NONFINITE, OK, WARN, LayerReport, Report
from .cli import dead_series, recycled_text, units_text
from .reporters import runlog
from .reporters.console import count_cell, dead_cell, died_text, headline, percent
from .reporters.heatmap import DEFAULT_BANDS, HEATMAP_COLUMNS, colour, grid, heat

COLOURS = {OK: "#2b8a3e", WARN: "#e67700", CRITICAL: "#c92a2a", NONFINITE: "#ae3ec9", IDLE: "#868e96"}
SEVERITY = [NONFINITE, CRITICAL, WARN, OK, IDLE]   # the page's verdict: the worst status a site has
CELL_H = 16                                         # heatmap cell height; width: HEATMAP_WIDTH / reports,
HEATMAP_WIDTH, MIN_CELL_W, MAX_CELL_W = 640, 3, 40  # within these bounds, pixels
TREND_W, TREND_H = 160, 36                          # per-site trend chart, pixels

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #212529; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #dee2e6; }
.sub { color: #6c757d; margin-top: 0; word-break: break-all; }
.verdict { display: flex; gap: 1em; align-items: center; padding: 1em; border-radius: 8px; border-left: 8px solid; }
.verdict .status { font-size: 1.6em; font-weight: 700; text-transform: uppercase; }
.counts span { display: inline-block; margin-right: 1em; }
table { border-collapse: collapse; width: 100%; } th, td { padding: 4px 8px; border-bottom: 1px solid #e9ecef;
        text-align: left; vertical-align: top; } th { background: #f8f9fa; }
td.num { text-align: right; white-space: nowrap; }
td.site { font-family: ui-monospace, monospace; overflow-wrap: anywhere; min-width: 8em; }
.badge { color: #fff; border-radius: 4px; padding: 1px 6px; font-size: 0.85em; font-weight: 600; }
.cause { margin: 0; padding-left: 1.2em; } .muted { color: #6c757d; } .error { color: #c92a2a; font-weight: 600; }
pre { background: #f8f9fa; padding: 1em; overflow-x: auto; border-radius: 6px; }
.heatmap { overflow-x: auto; } .legend span { display: inline-block; margin-right: 1em; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px;
          border: 1px solid #ced4da; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(round(255 * float(c))):02x}" for c in rgb)


def _badge(status: str) -> str:
    return f'<span class="badge" style="background:{COLOURS[status]}">{_e(status)}</span>'


def verdict(report: Report) -> str:
    """The worst status any site has (idle only when every site is)."""
    statuses = {layer.status for layer in report.layers}
    return next((s for s in SEVERITY if s in statuses), OK)


def trend_svg(series: list[float | None], status: str, wide: bool = False) -> str:
    """The dead fraction over the reports, 0 at the bottom, 100% at the top; gaps where the site was idle.
    `wide`: stretched to the page's width."""
    n = len(series)
    if n == 0:
        return ""
    x = [TREND_W / 2] if n == 1 else [i * (TREND_W - 4) / (n - 1) + 2 for i in range(n)]
    runs, run = [], []
    for xi, v in zip(x, series):
        if v is None:
            runs, run = runs + [run] * bool(run), []
        else:
            run.append(f"{xi:.1f},{TREND_H - 2 - v * (TREND_H - 4):.1f}")
    runs += [run] * bool(run)
    lines = "".join(f'<polyline points="{" ".join(r)}" fill="none" stroke="{COLOURS[status]}" stroke-width="1.5"/>'
                    if len(r) > 1 else f'<circle cx="{r[0].split(",")[0]}" cy="{r[0].split(",")[1]}" r="2" '
                    f'fill="{COLOURS[status]}"/>' for r in runs)
    last = next((v for v in reversed(series) if v is not None), None)
    label = "idle" if last is None else percent(last)
    size = (f'width="100%" height="80" viewBox="0 0 {TREND_W} {TREND_H}" preserveAspectRatio="none"' if wide
            else f'width="{TREND_W}" height="{TREND_H}"')
    return (f'<svg {size} role="img" aria-label="dead fraction per report, last {label}">'
            f'<rect width="{TREND_W}" height="{TREND_H}" fill="#f8f9fa"/>{lines}</svg>')


def heatmap_svg(reports: list[Report], band: tuple[float, float]) -> str:
    """Sites (rows) x reports (columns, the latest HEATMAP_COLUMNS), one rect per cell with a tooltip."""
    reports = reports[-HEATMAP_COLUMNS:]
    sites = list(dict.fromkeys(layer.name for report in reports for layer in report.layers))
    values = grid([heat(report) for report in reports], sites)
    rgb = colour(values, *band)
    cell_w = max(MIN_CELL_W, min(MAX_CELL_W, HEATMAP_WIDTH // max(1, len(reports))))
    label_w = min(7 * max((len(s) for s in sites), default=4) + 10, 420)
    width, height = label_w + cell_w * len(reports), CELL_H * len(sites) + 20
    parts = [f'<svg class="heatmap-svg" width="{width}" height="{height}" role="img" '
             f'aria-label="dead fraction heatmap, sites by report">']
    for r, site in enumerate(sites):
        y = r * CELL_H
        parts.append(f'<text x="{label_w - 6}" y="{y + CELL_H - 4}" text-anchor="end" font-size="11" '
                     f'font-family="monospace">{_e(site)}</text>')
        for c, report in enumerate(reports):
            v = values[r, c]
            what = "nonfinite" if np.isnan(v) else "idle / not run yet" if np.isneginf(v) else percent(float(v))
            parts.append(f'<rect class="cell" x="{label_w + c * cell_w}" y="{y}" width="{cell_w}" height="{CELL_H}" '
                         f'fill="{_hex(rgb[:, r, c])}"><title>{_e(site)}, step {report.step}: {what}</title></rect>')
    parts.append(f'<text x="{label_w}" y="{height - 4}" font-size="10">step {reports[0].step}</text>')
    if len(reports) > 1:
        parts.append(f'<text x="{width}" y="{height - 4}" font-size="10" text-anchor="end">step {reports[-1].step}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(band: tuple[float, float]) -> str:
    warn, critical = band
    keys = [(0.0, f"below warn ({percent(warn)}): ok"), ((warn + critical) / 2, f"warn ({percent(warn)}–{percent(critical)})"),
            (min(1.0, critical), f"critical (from {percent(critical)})"), (1.0, "100%"),
            (float("-inf"), "idle / not run yet"), (float("nan"), "nonfinite")]
    return '<p class="legend">' + "".join(f'<span><i class="swatch" style="background:{_hex(colour(np.array([v]), *band)[:, 0])}"></i>'
                                         f'{_e(text)}</span>' for v, text in keys) + "</p>"


def _causes(layer: LayerReport) -> str:
    if not layer.causes:
        return f'<span class="muted">{_e(layer.hint or "")}</span>'
    return '<ul class="cause">' + "".join(f"<li><b>{_e(c.code)}</b> ({c.score:.0%}): {_e(c.evidence)}</li>"
                                          for c in layer.causes) + "</ul>"


def _site_rows(log: runlog.RunLog, report: Report) -> str:
    rows = []
    for layer in report.layers:
        died = died_text(layer)
        units = f"units {units_text(layer.dead_units)}" + (f"; {died}" if died else "") if layer.dead_units else ""
        rows.append(
            f'<tr class="site-row" data-status="{_e(layer.status)}"><td class="site">{_e(layer.name)}</td>'
            f"<td>{_e(layer.kind)}</td><td class=num>{layer.units}</td><td class=num>{_e(dead_cell(layer))}</td>"
            f"<td class=num>{_e(count_cell(layer.dormant_units, layer.dormant_fraction))}</td>"
            f"<td>{_e(', '.join(layer.flags))}</td><td>{_badge(layer.status)}</td>"
            f"<td>{trend_svg(dead_series(log, layer.name), layer.status)}</td>"
            f'<td>{_causes(layer) if layer.status in (WARN, CRITICAL, NONFINITE) else ""}'
            f'{"<br>" if units and layer.status != OK else ""}<span class="muted">{_e(units)}</span></td></tr>')
    return "".join(rows)


def _recycling(log: runlog.RunLog) -> str:
    if not log.recycles:
        return '<p class="muted">No units were recycled.</p>'
    rows = "".join(f"<tr><td class=num>{r['step']}</td><td class=site>{_e(site)}</td><td class=num>{len(units)}</td>"
                   f"<td class=muted>{_e(units_text(units))}</td></tr>"
                   for _, r in log.recycles for site, units in r["units"].items())
    return (f"<p>{_e(recycled_text([r for _, r in log.recycles]))}</p><table><tr><th>step</th><th>site</th>"
            f"<th>units</th><th>unit indices</th></tr>{rows}</table>")


def render(log: runlog.RunLog) -> str:
    """The page for the latest run of `log` (a RunLog already cut to it)."""
    reports = log.reports
    report = reports[-1]
    header = log.headers[-1] if log.headers else {}
    config = header.get("config") or {}
    thresholds = config.get("thresholds") or {}
    band = (thresholds.get("warn", DEFAULT_BANDS[0]), thresholds.get("critical", DEFAULT_BANDS[1]))
    worst = verdict(report)
    counts = {s: sum(1 for layer in report.layers if layer.status == s) for s in SEVERITY}
    error = (f'<p class="error">The run ended in an error after step {report.step}: {_e(report.error)}</p>'
             if report.error else "")
    about = ", ".join(f"{k} {_e(header[k])}" for k in ("started", "deadwatch", "torch") if k in header)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>deadwatch report: {_e(log.path)}</title><style>{STYLE}</style></head>
<body>
<h1>deadwatch report</h1>
<p class="sub">{_e(log.path)} &middot; step {report.step}, window {report.window} steps, {len(reports)} reports
{"&middot; " + about if about else ""}</p>
<section id="verdict" class="verdict" style="border-color:{COLOURS[worst]}">
<div class="status" style="color:{COLOURS[worst]}">{_e(worst)}</div>
<div><div><b>{_e(headline(report))}</b></div>
<div class="counts">{"".join(f"<span>{_badge(s)} {n} site{'s' if n != 1 else ''}</span>" for s, n in counts.items() if n)}</div>
</div></section>
{error}
<h2 id="sites">Sites</h2>
<table><tr><th>site</th><th>kind</th><th>units</th><th>dead</th><th>dormant</th><th>flags</th><th>status</th>
<th>dead fraction per report</th><th>causes and evidence</th></tr>
{_site_rows(log, report)}</table>
<h2 id="trend">Dead fraction of the run</h2>
<p class="muted">Over the sites that ran in the window; 0% at the bottom, 100% at the top; step {reports[0].step} to
{report.step}.</p>
{trend_svg([r.dead_fraction for r in reports], worst, wide=True)}
<h2 id="heatmap">Heatmap: dead fraction, sites by report</h2>
<div class="heatmap">{heatmap_svg(reports, band)}</div>
{_legend(band)}
<h2 id="recycling">Recycling</h2>
{_recycling(log)}
<h2 id="config">Config used</h2>
<pre>{_e(yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100))}</pre>
<p class="muted">Made by deadwatch {_e(__version__)} from {_e(log.path)}.</p>
</body></html>
"""
