"""Console reporter: a rich table per report; plain text when not writing to a terminal."""

from __future__ import annotations

import sys
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..analysis import IDLE, OK, STYLES, LayerReport, Report

UNBOUNDED = 1 << 16  # columns: measure a renderable's natural width without a console's limit


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def dead_cell(layer: LayerReport) -> str:
    """'3 (1.5%)'; '-' for an idle site, which is not judged."""
    return "-" if layer.dead_fraction is None else f"{len(layer.dead_units)} ({percent(layer.dead_fraction)})"


def count_cell(units: list[int], fraction: float | None) -> str:
    """'2 (25.0%)' for a verdict's units; '-' when the site ran no counted forward in the interval."""
    return "-" if fraction is None else f"{len(units)} ({percent(fraction)})"


def has_verdicts(report: Report) -> bool:
    """The report carries the verdicts besides dead (reports from run logs written before them do not)."""
    return any(layer.dormant_fraction is not None or layer.flags for layer in report.layers)


def flags_cell(layer: LayerReport) -> Text:
    return Text(", ".join(layer.flags), style="yellow")


def died_text(layer: LayerReport) -> str:
    """When the dead units last fired: '3 died at steps 41–43' (a unit dies after the step it last fired in),
    '2 never fired'; '' when last_fired is not known."""
    if layer.last_fired is None or not layer.dead_units:
        return ""
    steps = [layer.last_fired[u] for u in layer.dead_units]
    fired = [s for s in steps if s >= 0]
    parts = []
    if fired:
        lo, hi = min(fired), max(fired)
        parts.append(f"{len(fired)} died at step{'s' if hi > lo else ''} {lo}{'–' + str(hi) if hi > lo else ''}")
    if len(fired) < len(steps):
        parts.append(f"{len(steps) - len(fired)} never fired")
    return ", ".join(parts)


def flag_lines(report: Report) -> list[Text]:
    """One line per site whose status is ok but that has flags (dormant, saturated, rare); flagged sites
    show their flags in the table."""
    lines = []
    for layer in report.layers:
        if layer.flags and layer.status == OK:
            counts = {"dormant": f"{len(layer.dormant_units)} dormant",
                      "saturated": f"{len(layer.saturated_units)} saturated",
                      "rare": f"{len(layer.rare_units)} rarely firing"}
            lines.append(Text.assemble((f"{layer.name}: ", "yellow"),
                                       f"{', '.join(counts[f] for f in layer.flags)} of {layer.units} units"))
    return lines


def certified_lines(report: Report) -> list[Text]:
    """One line per site with certified units (dead for every input, provably), and one per site whose units
    proved dead now were not certified, with why."""
    from ..cli import units_text

    lines = []
    for layer in report.layers:
        if layer.certified_units:
            lines.append(Text.assemble((f"{layer.name}: ", "bold"),
                                       f"{len(layer.certified_units)} certified (dead for every input, cannot "
                                       f"recover): {units_text(layer.certified_units)}"))
        if layer.certify_note:
            lines.append(Text.assemble((f"{layer.name}: ", "yellow"), layer.certify_note))
    return lines


def recycled_line(step: int, units: dict[str, list[int]]) -> str:
    """'deadwatch: step 200: recycled 5 units: act1 3, act2 2'."""
    total = sum(len(u) for u in units.values())
    per_site = ", ".join(f"{name} {len(u)}" for name, u in units.items())
    return f"deadwatch: step {step}: recycled {total} unit{'s' if total != 1 else ''}: {per_site}"


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
    verdicts = has_verdicts(report)
    if verdicts:  # before status: status stays the last column, as in reports without these verdicts
        table.add_column("dormant", justify="right")
        table.add_column("flags")
    table.add_column("status")
    for layer in report.layers:
        cells = [Text(layer.name), Text(layer.kind), str(layer.units), dead_cell(layer), percent(layer.zero_fraction)]
        if verdicts:
            cells += [count_cell(layer.dormant_units, layer.dormant_fraction), flags_cell(layer)]
        cells.append(Text(layer.status, style=STYLES[layer.status]))
        table.add_row(*cells)
    hints = []
    for layer in report.flagged:
        died = died_text(layer)
        hints.append(Text.assemble((f"{layer.name}: ", STYLES[layer.status]), layer.hint or "",
                                   f" ({died})" if died else ""))
    title = title or f"deadwatch: step {report.step}, window {report.window} steps, {headline(report)}"
    return Group(title_line(title), table, *flag_lines(report), *hints, *certified_lines(report), *notes(report))


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

    def recycled(self, step: int, units: dict[str, list[int]]) -> None:
        self.console.print(recycled_line(step, units), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        pass
