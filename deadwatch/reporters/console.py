"""Console reporter: a rich table per report; plain text when not writing to a terminal."""

from __future__ import annotations

import sys
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..analysis import IDLE, STYLES, LayerReport, Report

UNBOUNDED = 1 << 16  # columns: measure a renderable's natural width without a console's limit


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def dead_cell(layer: LayerReport) -> str:
    """'3 (1.5%)'; '-' for an idle site, which is not judged."""
    return "-" if layer.dead_fraction is None else f"{len(layer.dead_units)} ({percent(layer.dead_fraction)})"


def headline(report: Report) -> str:
    """'1.8% of 282 units dead': over the sites that ran in the window; idle sites are named apart."""
    idle = sum(1 for layer in report.layers if layer.status == IDLE)
    judged = sum(layer.units for layer in report.layers if layer.status != IDLE)
    text = f"{percent(report.dead_fraction)} of {judged} units dead"
    return text + (f", {idle} idle site{'s' if idle > 1 else ''} not judged" if idle else "")


def title_line(title: str) -> Text:
    """A table's title as a line of its own: a Table title wraps at the table's width, which is often narrower."""
    return Text(title, style="table.title")


def site_column(table: Table) -> None:
    """Site names are never cut: a column too narrow folds them onto more lines."""
    table.add_column("site", overflow="fold")


def notes(report: Report) -> list[Text]:
    """The lines under a report's table that are not per flagged site: idle sites, and the error a run ended in."""
    lines = []
    idle = [layer.name for layer in report.layers if layer.status == IDLE]
    if idle:
        lines.append(Text(f"idle (no counted forward in the window, not judged): {', '.join(idle)}",
                          style=STYLES[IDLE]))
    if report.error is not None:
        lines.append(Text(f"the run ended in an error after step {report.step}: {report.error}", style="bold red"))
    return lines


def render(report: Report, title: str | None = None) -> Group:
    """The report: a title line, a table of sites, one hint line per flagged site, then the notes."""
    table = Table()
    site_column(table)
    table.add_column("kind")
    table.add_column("units", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("zero frac", justify="right")
    table.add_column("status")
    for layer in report.layers:
        table.add_row(Text(layer.name), Text(layer.kind), str(layer.units), dead_cell(layer),
                      percent(layer.zero_fraction), Text(layer.status, style=STYLES[layer.status]))
    hints = [Text.assemble((f"{layer.name}: ", STYLES[layer.status]), layer.hint or "")
             for layer in report.flagged]
    title = title or f"deadwatch: step {report.step}, window {report.window} steps, {headline(report)}"
    return Group(title_line(title), table, *hints, *notes(report))


def print_fitted(console: Console, renderable: RenderableType) -> None:
    """Print; when not writing to a terminal, at least as wide as the renderable's natural width. Off a
    terminal rich takes 80 columns (or $COLUMNS), which would fold long site names and wrap hint lines."""
    if console.is_terminal or console.is_jupyter:
        console.print(renderable)
        return
    width = console.width
    natural = Measurement.get(console, console.options.update_width(UNBOUNDED), renderable).maximum
    console.width = max(width, natural)
    try:
        console.print(renderable)
    finally:
        console.width = width


class ConsoleReporter:
    def __init__(self, file: IO[str] | None = None):
        self.console = Console(file=file or sys.stdout)

    def emit(self, report: Report) -> None:
        print_fitted(self.console, render(report))

    def close(self) -> None:
        pass
