"""The W&B and MLflow reporters on a real tiny training run: W&B in offline mode (its .wandb log read back
with wandb's own reader, `wandb leet inspect --json`), MLflow on a local file store (read back with its
client). The values logged must be the run log's, report by report, at the training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.reporters import runlog

STEPS, REPORT_EVERY = 7, 2   # reports at 2, 4, 6 and at close (7)


class Net(nn.Module):
    """Units 2 and 5 of `act` dead (bias -1e4); `relu#0` is F.relu in forward: a site name with '#'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8)
        with torch.no_grad():
            self.fc1.bias[[2, 5]] = -1e4

    def forward(self, x):
        return F.relu(self.fc2(self.act(self.fc1(x))))


def train(logdir, reporters, **overrides):
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with deadwatch.watch(net, logdir=logdir, reporters=["jsonl", *reporters], report_every=REPORT_EVERY, window=2,
                         count_subsample=1, optimizer=opt, **overrides) as monitor:
        for _ in range(STEPS):
            net(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    return runlog.read(str(logdir))


def expected(record):
    """The scalars a report record of the run log stands for, from its JSON fields."""
    out = {"deadwatch/dead_fraction/all": record["dead_fraction"], "deadwatch/flagged_sites": len(record["flagged"])}
    for layer in record["layers"]:
        for field in ("dead_fraction", "zero_fraction", "dormant_fraction"):
            if layer[field] is not None:
                out[f"deadwatch/{field}/{layer['name']}"] = layer[field]
    return out


# ---- W&B ----------------------------------------------------------------------------------------------

@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()


def wandb_records(run_dir):
    """The history records and the run's record, read back from the .wandb log by wandb's own reader."""
    (log,) = [os.path.join(root, f) for root, _, files in os.walk(run_dir) for f in files if f.endswith(".wandb")]
    cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    done = subprocess.run([cli, "leet", "inspect", "--json", log], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    return history, os.path.dirname(log)


def test_wandb_offline_logs_the_run_logs_values(offline_wandb, tmp_path):
    log = train(tmp_path / "run", ["wandb"], image_every=2, wandb={"project": "dw-test", "name": "planted"})
    assert [r["step"] for r in log.records] == [2, 4, 6, 7]
    assert offline_wandb.run is None            # the run deadwatch started is finished at close
    history, run_dir = wandb_records(tmp_path / "run")   # under the monitor's logdir
    scalars = [h for h in history if "deadwatch/dead_fraction/all" in h]
    assert [h["deadwatch/step"] for h in scalars] == [2, 4, 6, 7]
    sites = [layer["name"] for layer in log.records[0]["layers"]]
    assert sites == ["act", "relu#0"]
    for got, record in zip(scalars, log.records):
        want = expected(record)
        assert {k: v for k, v in got.items() if k in want or k.startswith(("deadwatch/dead", "deadwatch/zero",
                                                                            "deadwatch/dormant"))} == want
    # the table of flagged sites with their causes, the latest one
    table = scalars[-1]["deadwatch/flagged.path"]
    with open(os.path.join(run_dir, "files", table)) as f:
        rows = json.load(f)
    layers = {layer["name"]: layer for layer in log.records[-1]["layers"]}
    assert "act" in log.records[-1]["flagged"] and layers["act"]["causes"], "a planted -1e4 bias leaves a cause"
    assert rows["columns"] == ["step", "site", "status", "dead", "dead fraction", "cause", "score", "evidence"]
    assert [(r[0], r[1], r[2], r[5], r[7]) for r in rows["data"]] == [
        (7, name, layers[name]["status"], c["code"] if c else None, c["evidence"] if c else None)
        for name in log.records[-1]["flagged"] for c in (layers[name]["causes"] or [None])]
    # the heatmap: every image_every=2 reports (steps 2, 6) and the last at close (7)
    images = [h for h in history if "deadwatch/heatmap.path" in h]
    assert [h["deadwatch/step"] for h in images] == [2, 6, 7]
    assert all(h["deadwatch/heatmap.format"] == "png" for h in images)
    assert os.path.getsize(os.path.join(run_dir, "files", images[-1]["deadwatch/heatmap.path"])) > 1000


def test_wandb_heatmap_without_matplotlib_is_the_raw_image(offline_wandb, tmp_path, monkeypatch):
    import deadwatch.reporters.wandb as reporter

    monkeypatch.setattr(reporter, "plotting_available", lambda: False)
    train(tmp_path / "run", ["wandb"], image_every=100)
    history, _ = wandb_records(tmp_path / "run")
    images = [h for h in history if "deadwatch/heatmap.path" in h]
    assert [h["deadwatch/step"] for h in images] == [2, 7]              # the first report, and the last at close
    # a cell of 12 x 6 pixels per site and report: 2 sites, 4 reports at close
    assert (images[-1]["deadwatch/heatmap.height"], images[-1]["deadwatch/heatmap.width"]) == (2 * 12, 4 * 6)


def test_wandb_logs_into_the_active_run_and_leaves_it_open(offline_wandb, tmp_path):
    run = offline_wandb.init(project="mine", dir=str(tmp_path / "own"))
    run.log({"loss": 1.0})
    log = train(tmp_path / "run", ["wandb"])
    assert offline_wandb.run is run             # not finished by deadwatch
    run.finish()
    history, _ = wandb_records(tmp_path / "own")  # the user's run holds deadwatch's values
    scalars = [h for h in history if "deadwatch/dead_fraction/all" in h]
    assert [h["deadwatch/step"] for h in scalars] == [r["step"] for r in log.records]
    assert not [p for p in (tmp_path / "run").rglob("*.wandb")]   # no run of its own


# ---- MLflow -------------------------------------------------------------------------------------------

@pytest.fixture
def file_store(monkeypatch, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()


def mlflow_values(client, run_id, record_steps):
    run = client.get_run(run_id)
    got = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            got.setdefault(m.step, {})[key] = m.value
    return run, [got.get(step, {}) for step in record_steps]


def test_mlflow_file_store_logs_the_run_logs_values(file_store, tmp_path):
    from deadwatch.reporters.mlflow import ARTIFACT, metric_name

    log = train(tmp_path / "run", ["mlflow"], mlflow={"experiment": "dw-test", "run_name": "planted"})
    client = file_store.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("dw-test").experiment_id])
    assert run.info.run_name == "planted" and run.info.status == "FINISHED"
    assert file_store.active_run() is None       # never made the process's active run
    steps = [r["step"] for r in log.records]
    run, values = mlflow_values(client, run.info.run_id, steps)
    for got, record in zip(values, log.records):
        assert got == {metric_name(k): v for k, v in expected(record).items()}
    assert "deadwatch/dead_fraction/relu_0" in run.data.metrics            # '#' is not allowed in MLflow names
    # the final report as a JSON artifact: the run log's last record
    path = client.download_artifacts(run.info.run_id, ARTIFACT, str(tmp_path / "dl"))
    with open(path) as f:
        report = json.load(f)
    assert report == {k: v for k, v in log.records[-1].items() if k not in ("type", "time", "firing_rate")}


def test_mlflow_logs_into_the_active_run(file_store, tmp_path):
    with file_store.start_run(run_name="mine") as active:
        log = train(tmp_path / "run", ["mlflow"])
        assert file_store.active_run().info.run_id == active.info.run_id
        client = file_store.tracking.MlflowClient()
        assert client.get_run(active.info.run_id).info.status == "RUNNING"    # not ended by deadwatch
    assert client.get_experiment_by_name("deadwatch") is None       # no run of its own
    _, values = mlflow_values(client, active.info.run_id, [r["step"] for r in log.records])
    assert values[-1]["deadwatch/dead_fraction/all"] == log.records[-1]["dead_fraction"]


def test_mlflow_logs_more_than_a_batch_of_metrics(file_store, monkeypatch):
    """A tracking server takes at most 1000 metrics per log_batch (the file store takes more): 300 sites (1,202
    scalars) go in batches of at most 1000."""
    from deadwatch.analysis import LayerReport, Report
    from deadwatch.reporters.mlflow import MlflowReporter

    batches = []
    log_batch = file_store.tracking.MlflowClient.log_batch
    monkeypatch.setattr(file_store.tracking.MlflowClient, "log_batch",
                        lambda self, run_id, metrics=(), **kw: (batches.append(len(metrics)),
                                                                log_batch(self, run_id, metrics=metrics, **kw))[1])

    layers = [LayerReport(name=f"blocks.{i}.act", kind="ReLU", units=4, dead_units=[1], dead_fraction=0.25,
                          zero_fraction=0.5, observations=8, status="critical", dormant_fraction=0.25,
                          saturated_fraction=0.0, bounds=[0.0, 6.0]) for i in range(300)]
    reporter = MlflowReporter(deadwatch.config.load())
    reporter.emit(Report(step=5, window=5, layers=layers))
    reporter.close()
    run = file_store.tracking.MlflowClient().get_run(reporter.run_id)
    assert len(run.data.metrics) == 300 * 4 + 2
    assert batches == [1000, 202]


def test_a_failing_mlflow_reporter_warns_and_training_goes_on(file_store, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("tracking server gone")

    monkeypatch.setattr(file_store.tracking.MlflowClient, "log_batch", fail)
    with pytest.warns(RuntimeWarning, match=r"MlflowReporter failed \(tracking server gone\).*training goes on"):
        log = train(tmp_path / "run", ["mlflow"])
    assert [r["step"] for r in log.records] == [2, 4, 6, 7]      # the other reporters go on


# ---- extras -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, module, extra", [("wandb", "wandb", "wandb"), ("mlflow", "mlflow", "mlflow")])
def test_missing_extra_is_one_clear_message(name, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)     # `import module` raises ImportError
    with pytest.raises(deadwatch.ConfigError, match=rf'reporter "{name}" needs .*pip install "deadwatch\[{extra}\]"'):
        deadwatch.watch(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), reporters=[name])


def test_import_deadwatch_imports_neither():
    code = ("import sys, deadwatch, deadwatch.monitor, deadwatch.reporters, deadwatch.cli; "
            "print(sorted(set(sys.modules) & {'wandb', 'mlflow'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
