"""The run log: <logdir>/deadwatch.jsonl, one JSON object per line, the CLI's source of truth.

The first record of a run is a header, written with the run's first report:
    {"type": "header", "started": ISO time, "deadwatch": version, "torch": version,
     "config": {...}, "resumed": bool}
`resumed` is true when the monitor continued a checkpoint (load_state_dict) and false for a new
run. A new run may write into a logdir that holds earlier ones: readers take the latest run to be
the records since the last header that is not `resumed`.
then one record per report:
    {"type": "report", "time": ISO time, **Report.to_dict(), "firing_rate": {site: [per-unit rate]}}
and one per recycling (Monitor.recycle, or the automatic `recycle` of the config):
    {"type": "recycle", "time": ISO time, "step": int, "units": {site: [recycled unit indices]}}
Per-unit firing rates, and each layer's per-unit `last_fired`, are written for sites of at most
FIRING_RATE_CAP units (wider sites keep their dead unit indices only; their last_fired is null). Every record is flushed as it is written, so a run
killed with SIGKILL keeps every report up to its last; a torn last line is skipped by readers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import warnings
from typing import Any, Callable, Iterator

from ..analysis import Report
from ..config import Config
from ..errors import RunLogError

FILENAME = "deadwatch.jsonl"
FIRING_RATE_CAP = 4096  # units per site above which per-unit firing rates are left out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunLogReporter:
    def __init__(self, logdir: str, config: Config, resumed: Callable[[], bool] = lambda: False):
        self.path = os.path.join(logdir, FILENAME)
        self.config = config
        self.resumed = resumed  # asked at the first report: load_state_dict() comes after watch()
        self.started = _now()
        self.header_written = False
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0 and not _ends_with_newline(self.path):
            self._append("\n")  # a killed run left half a line: end it, so the new header starts a line of its own
        else:
            self._append("")  # fail now, in watch(), if the file cannot be written

    def _header(self) -> dict[str, Any]:
        import torch

        from .. import __version__

        return {"type": "header", "started": self.started, "deadwatch": __version__, "torch": torch.__version__,
                "config": self.config.to_dict(), "resumed": bool(self.resumed())}

    def _append(self, text: str) -> None:
        # Opened for each record: a vanished or read-only logdir shows up as an error here, not as lost data.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)

    def _write(self, record: dict[str, Any]) -> None:
        self._append(json.dumps(record, allow_nan=False) + "\n")

    def emit(self, report: Report) -> None:
        rates = {layer.name: [round(float(r), 6) for r in layer.firing_rate]
                 for layer in report.layers
                 if layer.firing_rate is not None and layer.units <= FIRING_RATE_CAP}
        if not self.header_written:
            self._write(self._header())
            self.header_written = True
        record = report.to_dict()
        for layer in record["layers"]:
            if layer["units"] > FIRING_RATE_CAP:
                layer["last_fired"] = None
        self._write({"type": "report", "time": _now(), **record, "firing_rate": rates})

    def recycled(self, step: int, units: dict[str, list[int]]) -> None:
        if not self.header_written:
            self._write(self._header())
            self.header_written = True
        self._write({"type": "recycle", "time": _now(), "step": step, "units": units})

    def close(self) -> None:
        pass


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class RunLog:
    """What a run log holds: the headers and the reports, in file order."""

    def __init__(self, path: str, headers: list[dict], records: list[dict], skipped: int, starts: list[int],
                 recycles: list[tuple[int, dict]] | None = None):
        self.path = path
        self.headers = headers
        self.records = records
        self.skipped = skipped
        self.starts = starts  # index in records where each new (not resumed) run begins
        # the recycle records, each with the number of report records before it
        self.recycles: list[tuple[int, dict]] = recycles or []

    def latest(self) -> RunLog:
        """The latest run: the reports since the last header that is not `resumed`."""
        start = max([s for s in self.starts if s < len(self.records)], default=0)
        recycles = [(at - start, r) for at, r in self.recycles if at >= start]
        return RunLog(self.path, self.headers, self.records[start:], self.skipped, [0], recycles)

    @property
    def earlier_runs(self) -> int:
        """Runs in this log before the latest one."""
        return sum(1 for s in self.starts if 0 < s < len(self.records))

    @property
    def reports(self) -> list[Report]:
        return [Report.from_dict(r) for r in self.records]

    @property
    def last(self) -> Report:
        return Report.from_dict(self.records[-1])


def find(run_dir: str) -> str:
    """The run log of RUN_DIR, or a RunLogError saying what is there instead."""
    if not os.path.exists(run_dir):
        raise RunLogError(f"{run_dir}: no such directory")
    if os.path.isfile(run_dir):
        return run_dir
    path = os.path.join(run_dir, FILENAME)
    if os.path.isfile(path):
        return path
    nested = sorted(os.path.relpath(os.path.join(root, FILENAME), run_dir)
                    for root, _, files in os.walk(run_dir) if FILENAME in files)
    hint = f"; run logs below it: {', '.join(os.path.join(run_dir, os.path.dirname(n)) for n in nested)}" if nested else ""
    raise RunLogError(f"{run_dir}: no {FILENAME} here (is it a deadwatch logdir?){hint}")


def read(run_dir: str, progress: Callable[[Iterator[str], int], Iterator[str]] | None = None) -> RunLog:
    """Read a run log; torn or corrupt lines are skipped with a warning."""
    path = find(run_dir)
    headers, records, skipped, starts, recycles = [], [], 0, [], []
    try:
        size = os.path.getsize(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            lines: Iterator[str] = iter(f)
            if progress is not None:
                lines = progress(lines, size)
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    kind = record["type"]
                    if kind not in ("header", "report", "recycle"):
                        raise ValueError(f"unknown record type {kind!r}")
                    if kind == "report":
                        Report.from_dict(record)  # checks the fields a reader needs
                    if kind == "recycle" and not (isinstance(record["step"], int) and isinstance(record["units"], dict)):
                        raise ValueError("a recycle record needs step and units")
                except (ValueError, KeyError, TypeError, AttributeError):
                    skipped += 1
                    warnings.warn(f"{path}:{number}: skipped a torn or corrupt record", RuntimeWarning, stacklevel=2)
                    continue
                if kind == "recycle":
                    recycles.append((len(records), record))
                elif kind == "header":
                    headers.append(record)
                    if not record.get("resumed") and (not starts or starts[-1] != len(records)):
                        starts.append(len(records))
                else:
                    records.append(record)
    except OSError as e:
        raise RunLogError(f"{path}: cannot be read: {e.strerror}") from None
    if not records:
        raise RunLogError(f"{path}: holds no report yet (the monitor writes one every report_every steps and at close)")
    return RunLog(path, headers, records, skipped, starts, recycles)

