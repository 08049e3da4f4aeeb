"""Console reporter: a rich table per report; plain text when not writing to a terminal."""

from __future__ import annotations

import sys
from typing import IO

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..analysis import CRITICAL, NONFINITE, OK, WARN, Report

STYLES = {OK: "green", WARN: "yellow", CRITICAL: "bold red", NONFINITE: "bold magenta"}


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def render(report: Report, title: str | None = None) -> Group:
    """The report as a table of sites, followed by one hint line per flagged site."""
    table = Table(title=title or f"deadwatch: step {report.step}, window {report.window} steps, "
                                 f"{percent(report.dead_fraction)} of {report.units} units dead",
                  title_justify="left")
    table.add_column("site")
    table.add_column("kind")
    table.add_column("units", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("zero frac", justify="right")
    table.add_column("status")
    for layer in report.layers:
        table.add_row(Text(layer.name), Text(layer.kind), str(layer.units),
                      f"{len(layer.dead_units)} ({percent(layer.dead_fraction)})",
                      percent(layer.zero_fraction), Text(layer.status, style=STYLES[layer.status]))
    hints = [Text.assemble((f"{layer.name}: ", STYLES[layer.status]), layer.hint or "")
             for layer in report.flagged]
    return Group(table, *hints)


class ConsoleReporter:
    def __init__(self, file: IO[str] | None = None):
        self.console = Console(file=file or sys.stdout)

    def emit(self, report: Report) -> None:
        self.console.print(render(report))

    def close(self) -> None:
        pass
