"""The MLflow reporter (`reporters=["mlflow"]`, extra `deadwatch[mlflow]`, which is mlflow-skinny).

It logs into the active MLflow run (mlflow.active_run()); when there is none at the first report, it starts
one through the client, without making it the process's active run (so the training script's own
mlflow.start_run() is not refused), in experiment `mlflow.experiment` (created if missing) named
`mlflow.run_name`, and ends it at close. At every report: the scalars of reporters/scalars.py at the training
step. At close: the last report as a JSON artifact, deadwatch/report.json (Report.to_dict()).

MLflow metric names allow letters, digits, _ - . / and spaces only: every other character of a site name
becomes "_" (`head.relu#0` is logged as deadwatch/dead_fraction/head.relu_0).
"""

from __future__ import annotations

import re
import time
from typing import Any

from ..analysis import Report
from ..config import Config
from ..errors import ConfigError
from .scalars import scalars

ARTIFACT = "deadwatch/report.json"
BATCH = 1000   # metrics per log_batch call: MLflow's limit


def metric_name(name: str) -> str:
    return re.sub(r"[^\w./ -]", "_", name)


class MlflowReporter:
    def __init__(self, config: Config):
        try:
            import mlflow
            from mlflow.entities import Metric
        except ImportError:
            raise ConfigError('reporter "mlflow" needs MLflow: pip install "deadwatch[mlflow]"') from None
        self.mlflow, self.Metric = mlflow, Metric
        self.config = config
        self.client: Any = None
        self.run_id: str | None = None
        self.owned = False   # started here: ended at close
        self.last: Report | None = None

    def _start(self) -> None:
        self.client = self.mlflow.tracking.MlflowClient()
        active = self.mlflow.active_run()
        if active is not None:
            self.run_id = active.info.run_id
            return
        names = dict(self.config.mlflow)
        experiment = self.client.get_experiment_by_name(names["experiment"])
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(names["experiment"])
        self.run_id = self.client.create_run(experiment_id, run_name=names["run_name"]).info.run_id
        self.owned = True

    def emit(self, report: Report) -> None:
        if self.run_id is None:
            self._start()
        now = int(time.time() * 1000)
        metrics = [self.Metric(metric_name(key), value, now, report.step) for key, value in scalars(report).items()]
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH])
        self.last = report

    def close(self) -> None:
        if self.run_id is None:
            return
        try:
            if self.last is not None:
                self.client.log_dict(self.run_id, self.last.to_dict(), ARTIFACT)
        finally:
            if self.owned:
                self.client.set_terminated(self.run_id, "FAILED" if self.last and self.last.error else "FINISHED")
