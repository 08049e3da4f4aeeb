"""Console reporter: the rendered table and hint lines, as plain text."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console
from torch import nn

import deadwatch
from deadwatch.analysis import HINTS, LayerReport, Report
from deadwatch.reporters.console import ConsoleReporter, render

ANSI = re.compile(r"\x1b\[")


def layer(name, kind, units, dead, zero_fraction, status, observations=64):
    return LayerReport(name=name, kind=kind, units=units, dead_units=list(dead),
                       dead_fraction=len(dead) / units, zero_fraction=zero_fraction,
                       observations=observations, status=status)


def sample_report() -> Report:
    return Report(step=300, window=100, layers=[
        layer("features.2", "ReLU", 64, [], 0.25, "ok"),
        layer("features.5", "ReLU", 200, [3, 7], 0.5, "warn"),
        layer("encoder.gelu#0", "gelu", 10, [0, 1, 2], 0.875, "critical"),
        layer("head.act", "LeakyReLU", 8, [], None, "nonfinite", observations=0),
    ])


@pytest.fixture(autouse=True)
def no_forced_terminal(monkeypatch):
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "JUPYTER_COLUMNS"):
        monkeypatch.delenv(var, raising=False)


def plain(renderable, **console_kwargs) -> str:
    kwargs = dict(file=io.StringIO(), width=120, color_system=None)
    kwargs.update(console_kwargs)
    console = Console(**kwargs)
    console.print(renderable)
    return console.file.getvalue()


def rows(text: str) -> dict[str, list[str]]:
    """Table rows by site name: the cells between the vertical bars."""
    out = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            out[cells[0]] = cells
    return out


def flat(text: str) -> str:
    return " ".join(text.split())


def test_table_has_sites_kinds_units_dead_and_status():
    text = plain(render(sample_report()))
    r = rows(text)
    assert list(r) == ["features.2", "features.5", "encoder.gelu#0", "head.act"]
    assert r["features.2"] == ["features.2", "ReLU", "64", "0 (0.0%)", "25.0%", "ok"]
    assert r["features.5"] == ["features.5", "ReLU", "200", "2 (1.0%)", "50.0%", "warn"]
    assert r["encoder.gelu#0"] == ["encoder.gelu#0", "gelu", "10", "3 (30.0%)", "87.5%", "critical"]
    assert r["head.act"] == ["head.act", "LeakyReLU", "8", "0 (0.0%)", "-", "nonfinite"]


def test_header_and_title():
    text = plain(render(sample_report()))
    header = next(line for line in text.splitlines() if "site" in line and "kind" in line)
    for column in ("site", "kind", "units", "dead", "zero frac", "status"):
        assert column in header
    # 5 dead of 282 units
    assert "deadwatch: step 300, window 100 steps, 1.8% of 282 units dead" in flat(text)
    assert "my title" in plain(render(sample_report(), title="my title"))


def test_hint_lines_for_flagged_layers_only():
    report = sample_report()
    text = flat(plain(render(report)))
    for lr in report.layers:
        line = f"{lr.name}: {HINTS[lr.status]}" if lr.status != "ok" else None
        if line:
            assert flat(line) in text, lr.name
            assert text.count(flat(HINTS[lr.status])) == 1
    lines = plain(render(report)).rstrip().splitlines()
    bottom = max(i for i, line in enumerate(lines) if line.startswith("└"))
    after_table = [line for line in lines[bottom + 1:] if line.strip()]
    assert not any(line.startswith("features.2:") for line in after_table)
    starts = [line.split(":")[0] for line in after_table if re.match(r"^[\w.#]+: ", line)]
    assert starts == ["features.5", "encoder.gelu#0", "head.act"]


def test_all_ok_report_has_no_hint_lines():
    report = Report(step=10, window=5, layers=[layer("a", "ReLU", 4, [], 0.1, "ok"), layer("b", "ReLU", 4, [], 0.2, "ok")])
    text = plain(render(report))
    assert set(rows(text)) == {"a", "b"}
    assert not any(h and flat(h)[:30] in flat(text) for h in HINTS.values())
    assert text.rstrip().splitlines()[-1].startswith("└")


def test_empty_report_renders():
    text = plain(render(Report(step=0, window=100, layers=[])))
    assert "0.0% of 0 units dead" in flat(text) and rows(text) == {}


def test_no_ansi_codes_when_not_a_terminal():
    text = plain(render(sample_report()))
    assert not ANSI.search(text)
    # default console on a non-terminal file: no colour either
    buf = io.StringIO()
    ConsoleReporter(file=buf).emit(sample_report())
    assert not ANSI.search(buf.getvalue())
    assert "encoder.gelu#0" in buf.getvalue()


def test_ansi_check_can_fail_on_a_terminal():
    text = plain(render(sample_report()), force_terminal=True, color_system="truecolor")
    assert ANSI.search(text)


def test_reporter_default_file_is_stdout(capsys):
    reporter = ConsoleReporter()
    reporter.emit(sample_report())
    reporter.close()
    out = capsys.readouterr().out
    assert "features.5" in out and "critical" in out
    assert not ANSI.search(out)


def test_report_is_a_rich_renderable():
    assert plain(sample_report()) == plain(render(sample_report()))


def test_console_reporter_on_a_real_monitor():
    """End to end: planted dead units are printed with their counts and a hint: the top cause, here the
    planted negative biases."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    with torch.no_grad():
        model[0].bias[:5] = -100.0  # units 0..4 never fire
    buf = io.StringIO()
    with deadwatch.watch(model, reporters=[ConsoleReporter(file=buf)], report_every=3, window=3) as monitor:
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            monitor.step()
    text = buf.getvalue()
    assert not ANSI.search(text)
    r = rows(text)
    assert r["1"][:4] == ["1", "ReLU", "10", "5 (50.0%)"]
    assert r["1"][-1] == "critical"
    assert flat("1: negative_bias (score 1.00, 5 of 5 dead units): 0.bias: median -100 for the dead units") in flat(text)
    assert text.count("deadwatch: step 3") == 1  # close() does not report the same step again


@pytest.mark.parametrize("name", ["act[relu]", "gates[bold]", "mix[/]"])
def test_site_names_are_printed_verbatim_not_as_markup(name):
    """Module names may hold any character but '.', e.g. nn.ModuleDict keys; rich markup must not eat them."""
    report = Report(step=1, window=1, layers=[layer(name, "ReLU", 2, [0], 0.5, "critical")])
    text = plain(render(report))
    assert name in rows(text), text
    assert flat(f"{name}: {HINTS['critical']}") in flat(text)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.acts = nn.ModuleDict({"act[relu]": nn.ReLU()})

    def forward(self, x):
        return self.acts["act[relu]"](self.fc(x))


def test_bracketed_module_name_from_a_real_monitor():
    model = Gated()
    buf = io.StringIO()
    with deadwatch.watch(model, reporters=[ConsoleReporter(file=buf)], report_every=1) as monitor:
        model(torch.randn(3, 4))
        monitor.step()
        assert [lr.name for lr in monitor.report().layers] == ["acts.act[relu]"]
    assert "acts.act[relu]" in rows(buf.getvalue()), buf.getvalue()
