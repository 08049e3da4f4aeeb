"""Reporters: where reports go. Built in: console, jsonl (the run log), tensorboard, wandb, mlflow; or any object
with emit(report) and close(), passed in `reporters=[...]`. A reporter that also has
recycled(step, units) is told of each recycling (Monitor.recycle); one without it is not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..analysis import Report


@runtime_checkable
class Reporter(Protocol):
    def emit(self, report: Report) -> None:
        """Take one report (rank 0 only). An exception turns this reporter off, with one warning."""

    # Optional, not part of the protocol's check: recycled(step: int, units: dict[str, list[int]]) -> None,
    # the units recycled at `step` per site (rank 0 only).

    def close(self) -> None:
        """Release files and threads; called once, when the monitor closes."""
