"""The `deadwatch` command: summary, compare, report, check, demo. summary, compare and report read run logs only
and never import torch (check does, to load a saved model; demo, to train).

Exit codes: 0 fine; 1 --fail-on triggered; 2 usage or input error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import warnings
from typing import Iterator, Sequence

from rich.console import Console, Group
from rich.measure import Measurement
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from .analysis import CRITICAL, FLAGS, IDLE, NONFINITE, OK, STYLES, WARN, LayerReport, Report
from .errors import DeadwatchError
from .reporters import runlog
from .reporters.console import (certified_lines, count_cell, dead_cell, died_text, flag_lines, flags_cell, has_verdicts, headline, notes,
                                percent, print_fitted, site_column, title_line)

LEVELS = {OK: 0, WARN: 1, CRITICAL: 2, NONFINITE: 3}  # --fail-on; an idle site is not judged, so never fails
PROGRESS_MIN_BYTES = 1 << 20
MAX_LISTED_UNITS = 12
BLOCKS = "▁▂▃▄▅▆▇█"   # dead fraction 0, then (0, 1/7], (1/7, 2/7], ... (6/7, 1]
IDLE_MARK = "·"        # a report where the site was idle, or not yet run: not judged
SPARK_WIDTH = 24       # characters; more reports than this are binned
UNBOUNDED_WIDTH = 1 << 16


class UsageError(DeadwatchError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def _read(run_dir: str, console: Console) -> runlog.RunLog:
    def progress(lines: Iterator[str], size: int) -> Iterator[str]:
        if size < PROGRESS_MIN_BYTES or not console.is_terminal:
            yield from lines
            return
        with Progress(TextColumn("reading run log"), BarColumn(), DownloadColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task("read", total=size)
            for line in lines:
                bar.advance(task, len(line.encode()))
                yield line

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = runlog.read(run_dir, progress)
    if caught:
        console.print(Text(f"warning: {log.path}: skipped {len(caught)} torn or corrupt line(s)", style="yellow"))
    if log.earlier_runs:
        console.print(Text(f"note: {log.path} holds {log.earlier_runs + 1} runs (a new run was started in the same "
                           f"logdir); showing the latest only", style="yellow"))
    return log.latest()


def _select(report: Report, pattern: str | None) -> Report:
    if pattern is None:
        return report
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"--site {pattern!r} is not a valid regular expression: {e}") from None
    layers = [layer for layer in report.layers if regex.search(layer.name)]
    if not layers:
        raise UsageError(f"--site {pattern!r} matches no site; sites: {', '.join(l.name for l in report.layers)}")
    return Report(step=report.step, window=report.window, layers=layers, error=report.error)


def units_text(units: list[int]) -> str:
    if len(units) <= MAX_LISTED_UNITS:
        return ", ".join(map(str, units))
    head = ", ".join(map(str, units[:MAX_LISTED_UNITS - 2]))
    return f"{head}, ..., {units[-1]} ({len(units)} units)"


def _fraction(layer: LayerReport) -> str:
    return "idle" if layer.dead_fraction is None else percent(layer.dead_fraction)


def _trend(first: LayerReport | None, last: LayerReport) -> Text:
    if first is None:
        return Text(f"new -> {_fraction(last)}")
    if first.dead_fraction is None or last.dead_fraction is None:  # no direction to or from "not judged"
        return Text(f"{_fraction(first)} -> {_fraction(last)}")
    arrow = "↑" if last.dead_fraction > first.dead_fraction else "↓" if last.dead_fraction < first.dead_fraction else "→"
    style = "red" if arrow == "↑" else "green" if arrow == "↓" else ""
    return Text(f"{percent(first.dead_fraction)} -> {percent(last.dead_fraction)} {arrow}", style=style)


def sparkline(values: Sequence[float | None], width: int = SPARK_WIDTH) -> str:
    """The dead fraction over reports, one character each: ▁ for 0, any dead unit lifts it to at least ▂, █
    above 6/7; IDLE_MARK where the site was not judged (None). More than `width` reports are cut into `width`
    consecutive bins, each showing its highest fraction (a spike is never averaged away)."""
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [max((v for v in values[a:b] if v is not None), default=None) for a, b in zip(edges, edges[1:])]
    return "".join(IDLE_MARK if v is None else BLOCKS[0] if v <= 0 else BLOCKS[min(7, max(1, math.ceil(v * 7 - 1e-9)))]
                   for v in values)


def dead_series(log: runlog.RunLog, site: str) -> list[float | None]:
    """The site's dead fraction in each report of the log (None: idle, or absent from that report)."""
    series: list[float | None] = []
    for record in log.records:
        layer = next((layer for layer in record["layers"] if layer["name"] == site), None)
        series.append(None if layer is None else layer.get("dead_fraction"))
    return series


# Columns of the summary table that a narrow terminal drops, first dropped first; site, dead and status stay.
DROP_ORDER = ("kind", "zero frac", "units", "dead trend", "flags", "dormant", "dead per report")


def summary_view(log: runlog.RunLog, report: Report, width: int | None = None) -> Group:
    """The summary: title, table, flagged sites. With `width` (a terminal's columns), the table's lower-priority
    columns (DROP_ORDER) are left out until it fits, so that site names, dead counts and status are never cut
    to an ellipsis (a site name too long even then wraps)."""
    first = {layer.name: layer for layer in Report.from_dict(log.records[0]).layers}
    title = title_line(f"{log.path}: step {report.step}, window {report.window} steps, {len(log.records)} reports, "
                       f"{headline(report)}")
    table = _summary_table(log, report, first, ())
    for n in range(1, len(DROP_ORDER) + 1):
        if width is None or _natural_width(table) <= width:
            break
        table = _summary_table(log, report, first, DROP_ORDER[:n])
    return Group(title, table, *_summary_lines(log, report))


def _natural_width(table: Table) -> int:
    console = Console(width=UNBOUNDED_WIDTH)
    return Measurement.get(console, console.options, table).maximum


def _summary_table(log: runlog.RunLog, report: Report, first: dict[str, LayerReport], drop: Sequence[str]) -> Table:
    table = Table()
    site_column(table)
    verdicts = has_verdicts(report)
    columns = [("kind", "left"), ("units", "right"), ("dead", "right"), ("zero frac", "right")]
    columns += [("dormant", "right"), ("flags", "left")] * verdicts
    columns += [("dead per report", "left"), ("dead trend", "left"), ("status", "left")]
    columns = [(name, justify) for name, justify in columns if name not in drop]
    for column, justify in columns:  # dead and status are never wrapped or cut (the site name folds)
        table.add_column(column, justify=justify, no_wrap=column in ("dead", "status"))
    for layer in report.layers:
        cells = {"kind": Text(layer.kind), "units": str(layer.units), "dead": dead_cell(layer),
                 "zero frac": percent(layer.zero_fraction),
                 "dormant": count_cell(layer.dormant_units, layer.dormant_fraction), "flags": flags_cell(layer),
                 "dead per report": Text(sparkline(dead_series(log, layer.name)), style=STYLES[layer.status]),
                 "dead trend": _trend(first.get(layer.name), layer),
                 "status": Text(layer.status, style=STYLES[layer.status])}
        table.add_row(Text(layer.name), *(cells[name] for name, _ in columns))
    return table


def _summary_lines(log: runlog.RunLog, report: Report) -> list[Text]:
    lines = flag_lines(report)
    for layer in report.flagged:
        lines.append(Text.assemble((f"{layer.name} ({layer.status}): ", STYLES[layer.status]), layer.hint or ""))
        if layer.dead_units:
            died = died_text(layer)
            lines.append(Text(f"  dead units: {units_text(layer.dead_units)}" + (f"; {died}" if died else "")))
    if not lines:
        lines.append(Text("no site flagged", style="green"))
    lines += certified_lines(report)
    if log.recycles:
        lines.append(Text(recycled_text([r for _, r in log.recycles])))
    return lines + notes(report)


def recycled_text(records: list[dict]) -> str:
    """'recycled 12 units in 3 recyclings (steps 100–300): act1 8, act2 4' from the run log's recycle records."""
    per_site: dict[str, int] = {}
    for record in records:
        for name, units in record["units"].items():
            per_site[name] = per_site.get(name, 0) + len(units)
    steps = [record["step"] for record in records]
    span = f"step {steps[0]}" if len(set(steps)) == 1 else f"steps {min(steps)}–{max(steps)}"
    total = sum(per_site.values())
    return (f"recycled {total} unit{'s' if total != 1 else ''} in {len(records)} recycling{'s' if len(records) != 1 else ''} "
            f"({span}): " + ", ".join(f"{name} {n}" for name, n in per_site.items()))


def cmd_summary(args: argparse.Namespace, out: Console, err: Console) -> int:
    log = _read(args.run_dir, err)
    report = _select(log.last, args.site)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print_fitted(out, summary_view(log, report, out.width if out.is_terminal else None))
    if args.fail_on in FLAGS:
        failing = [layer.name for layer in report.layers if layer.status != IDLE and args.fail_on in layer.flags]
        if failing:
            err.print(f"deadwatch: {len(failing)} site(s) flagged {args.fail_on}: {', '.join(failing)}",
                      markup=False, highlight=False, soft_wrap=True)
            return 1
    elif args.fail_on:
        failing = [layer.name for layer in report.layers
                   if layer.status != IDLE and LEVELS[layer.status] >= LEVELS[args.fail_on]]
        if failing:
            err.print(f"deadwatch: {len(failing)} site(s) at or above {args.fail_on}: {', '.join(failing)}",
                      markup=False, highlight=False, soft_wrap=True)
            return 1
    return 0


def cmd_compare(args: argparse.Namespace, out: Console, err: Console) -> int:
    a, b = (_read(d, err).last for d in (args.run_a, args.run_b))
    title = title_line(f"A = {args.run_a} (step {a.step})   B = {args.run_b} (step {b.step})")
    table = Table()
    site_column(table)
    for column in ("A dead", "A status", "B dead", "B status", "change"):
        table.add_column(column, justify="right" if "dead" in column else "left")
    by_a = {layer.name: layer for layer in a.layers}
    by_b = {layer.name: layer for layer in b.layers}
    for name in list(by_a) + [n for n in by_b if n not in by_a]:
        la, lb = by_a.get(name), by_b.get(name)
        cells = []
        for layer in (la, lb):
            cells += ["-", Text("absent", style="dim")] if layer is None else \
                [dead_cell(layer), Text(layer.status, style=STYLES[layer.status])]
        if la is None or lb is None:
            change = Text("")
        elif la.dead_fraction is None or lb.dead_fraction is None:
            change = Text("-", style=STYLES[IDLE])
        else:
            delta = lb.dead_fraction - la.dead_fraction
            change = Text(f"{100 * delta:+.1f} pts", style="green" if delta < 0 else "red" if delta > 0 else "")
        table.add_row(Text(name), *cells, change)
    ended = [Text(f"{label} ended in an error after step {r.step}: {r.error}", style="bold red")
             for label, r in (("A", a), ("B", b)) if r.error is not None]
    print_fitted(out, Group(title, table, *ended))
    return 0


def cmd_report(args: argparse.Namespace, out: Console, err: Console) -> int:
    from . import htmlreport

    log = _read(args.run_dir, err)
    try:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(htmlreport.render(log))
    except OSError as e:
        raise UsageError(f"--html {args.html!r} cannot be written: {e.strerror}") from None
    out.print(f"deadwatch: wrote {args.html} (step {log.last.step}, {len(log.records)} reports)", markup=False,
              highlight=False, soft_wrap=True)
    return 0


def cmd_check(args: argparse.Namespace, out: Console, err: Console) -> int:
    from . import check  # imports torch: only this command needs it

    return check.command(args, out, err)


def cmd_demo(args: argparse.Namespace, out: Console, err: Console) -> int:
    from . import demo

    logdir = args.logdir
    demo.run(logdir)
    for name in ("healthy", "dying"):
        log = runlog.read(os.path.join(logdir, name))
        out.print()
        print_fitted(out, summary_view(log, log.last))
    dying, healthy = os.path.join(logdir, "dying"), os.path.join(logdir, "healthy")
    tensorboard, deadwatch = _command("tensorboard"), _command("deadwatch")
    out.print(f"\nOpen the dashboards:  {tensorboard} --logdir {logdir}\n"
              f"Summaries again:      {deadwatch} summary {dying}\n"
              f"Did the fix help?     {deadwatch} compare {dying} {healthy}", markup=False, highlight=False,
              soft_wrap=True)
    return 0


def _command(name: str) -> str:
    """How to call a script of this environment: its bare name when it is on PATH, else its path."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if shutil.which(name) == beside or not os.path.exists(beside):
        return name
    return os.path.relpath(beside) if not os.path.relpath(beside).startswith("..") else beside


def parser() -> Parser:
    p = Parser(prog="deadwatch", description="Dead-neuron monitor for PyTorch: read run logs, run the demo.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    s = sub.add_parser("summary", help="the last report of a run, with trends and flagged sites")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a logdir given to deadwatch.watch() (holds deadwatch.jsonl)")
    s.add_argument("--json", action="store_true", help="print the last report as one JSON object")
    s.add_argument("--fail-on", choices=("warn", "critical", "nonfinite") + FLAGS,
                   help="exit 1 when a site is at or above this level (nonfinite is above critical; idle sites never), "
                        "or, for dormant, saturated or rare, when a site carries that flag")
    s.add_argument("--site", metavar="REGEX", help="only sites whose name matches REGEX (re.search)")
    s.set_defaults(run=cmd_summary)
    c = sub.add_parser("compare", help="two runs side by side, per site")
    c.add_argument("run_a", metavar="RUN_A")
    c.add_argument("run_b", metavar="RUN_B")
    c.set_defaults(run=cmd_compare)
    r = sub.add_parser("report", help="a self-contained HTML page about a run, to attach or send")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a logdir given to deadwatch.watch() (holds deadwatch.jsonl)")
    r.add_argument("--html", metavar="OUT.html", required=True, help="where to write the page")
    r.set_defaults(run=cmd_report)
    k = sub.add_parser("check", help="a saved model: certified dead units, units dead on data, pruning")
    k.add_argument("path", metavar="PATH", help="a state dict or whole model (.pt/.pth/.bin), .safetensors, a Lightning "
                   ".ckpt, or a Hugging Face model folder (config.json; nothing is downloaded)")
    k.add_argument("--model", metavar="MODULE:CALLABLE", help="builds the architecture to load a state dict into "
                   "(certificates need the structure; without it only unproved suspects are reported)")
    k.add_argument("--trust", action="store_true", help="allow a pickled whole model (unpickling runs code)")
    k.add_argument("--input-shape", metavar="N,C,...", help="the dummy input's shape for the structure forward, "
                   "where the first layer does not tell it")
    k.add_argument("--data", metavar="MODULE:CALLABLE", help="an iterable of batches: also report the units dead on it "
                   "(eval mode)")
    k.add_argument("--against", metavar="BASE", help="a base checkpoint: list what died since (newly certified; newly "
                   "dead on --data)")
    k.add_argument("--prune", metavar="OUT.pt", help="remove the certified units and write the pruned state dict "
                   "(a whole model for a whole model)")
    k.add_argument("--json", action="store_true", help="print the result as one JSON object")
    k.add_argument("--fail-on", choices=("certified", "dead", "never"), default="never",
                   help="exit 1 when a site has certified units, or dead units (on --data; certified without it)")
    k.set_defaults(run=cmd_check)
    d = sub.add_parser("demo", help="train a healthy and a dying network on bundled data, watched")
    d.add_argument("--logdir", default=os.path.join("runs", "demo"), help="where the runs go (default: runs/demo)")
    d.set_defaults(run=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    out, err = Console(), Console(stderr=True)
    try:
        args = parser().parse_args(argv)
        return args.run(args, out, err)
    except DeadwatchError as e:
        err.print(f"deadwatch: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
