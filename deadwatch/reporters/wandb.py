"""The W&B reporter (`reporters=["wandb"]`, extra `deadwatch[wandb]`).

It logs into the active `wandb.run`; when there is none at the first report, it starts one (config
`wandb.project`, `wandb.name`; files under the monitor's logdir when it has one) and finishes it at close.
At every report: the scalars of reporters/scalars.py against their own x axis `deadwatch/step` (the training
step; a run's own step counter may count something else, and W&B drops points logged at a step below its
current one), and a table of the flagged sites with their causes (`deadwatch/flagged`). Every image_every
reports, and at close: the dead-fraction heatmap as an image (`deadwatch/heatmap`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..analysis import Report
from ..config import Config
from ..errors import ConfigError
from .console import dead_cell
from .heatmap import HEATMAP_COLUMNS, bands, cells, figure, heat, plotting_available
from .scalars import scalars

STEP = "deadwatch/step"
FLAGGED_COLUMNS = ["step", "site", "status", "dead", "dead fraction", "cause", "score", "evidence"]


class WandbReporter:
    def __init__(self, config: Config, logdir: str | None = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError('reporter "wandb" needs wandb: pip install "deadwatch[wandb]"') from None
        self.wandb = wandb
        self.config = config
        self.logdir = logdir
        self.run: Any = None
        self.owned = False   # started here: finished at close
        self.history: list[dict[str, float]] = []
        self.steps: list[int] = []
        self.sites: list[str] = []
        self.reports = 0
        self.drawn: int | None = None

    def _start(self) -> None:
        self.run = self.wandb.run
        if self.run is None:
            names = dict(self.config.wandb)
            self.run = self.wandb.init(project=names["project"], name=names["name"], dir=self.logdir)
            self.owned = True
        self.run.define_metric(STEP)
        self.run.define_metric("deadwatch/*", step_metric=STEP)

    def emit(self, report: Report) -> None:
        if self.run is None:
            self._start()
        rows = [[report.step, layer.name, layer.status, dead_cell(layer), layer.dead_fraction,
                 cause.code if cause else None, cause.score if cause else None, cause.evidence if cause else None]
                for layer in report.flagged for cause in (layer.causes or [None])]
        self.run.log({STEP: report.step, **scalars(report),
                      "deadwatch/flagged": self.wandb.Table(columns=FLAGGED_COLUMNS, data=rows)})
        self.history = (self.history + [heat(report)])[-HEATMAP_COLUMNS:]
        self.steps = (self.steps + [report.step])[-HEATMAP_COLUMNS:]
        self.sites = [layer.name for layer in report.layers]
        if self.reports % self.config.image_every == 0:
            self._draw()
        self.reports += 1

    def _draw(self) -> None:
        band = bands(self.config)
        if plotting_available():
            fig = figure(self.history, self.sites, self.steps, band=band)
            fig.canvas.draw()
            image = self.wandb.Image(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
        else:
            pixels = cells(self.history, self.sites, 12, 6, band).transpose(1, 2, 0)
            image = self.wandb.Image((255 * pixels).round().astype(np.uint8))
        self.run.log({STEP: self.steps[-1], "deadwatch/heatmap": image})
        self.drawn = self.steps[-1]

    def close(self) -> None:
        try:
            if self.run is not None and self.steps and self.drawn != self.steps[-1]:
                self._draw()
        finally:
            if self.owned:
                self.run.finish()
