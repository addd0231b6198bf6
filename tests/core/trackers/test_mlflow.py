"""MLflow with a real local store: values read back with MlflowClient; a resume continues the same MLflow run."""

from __future__ import annotations

from collections import Counter
from typing import Any

from mlflow import MlflowClient

from noether.core.trackers.mlflow import metric_name
from tests.support.trackers import EARLIER_TAG, metrics_rows, train_stopped_and_resumed

MLFLOW = [{"kind": "noether.core.trackers.MlflowTracker", "experiment_name": "trackers-test"}]


def logged_points(rows: list[dict[str, Any]]) -> Counter:
    """(metric name, step, value) of every value in these rows, as MLflow names them."""
    return Counter((metric_name(key), row["update"], value) for row in rows for key, value in row.items() if key != "update")


def stored_points(client: MlflowClient, run_id: str) -> Counter:
    points = Counter()
    for key in client.get_run(run_id).data.metrics:
        points.update((key, metric.step, metric.value) for metric in client.get_metric_history(run_id, key))
    return points


def test_a_stopped_and_resumed_run_is_one_mlflow_run_holding_every_logged_row(tmp_path):
    """The default store is a SQLite file inside output_path; one test covers the plain and the resumed
    part, because creating a fresh MLflow store takes seconds."""
    paths, stopped_rows = train_stopped_and_resumed(tmp_path, MLFLOW, EARLIER_TAG)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("trackers-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == (paths.run_dir / "mlflow_run_id").read_text().strip()
    assert run.info.run_name == "run"
    assert run.info.status == "FINISHED"
    assert run.data.params["run_id"] == "run"
    assert run.data.params["trainer.max_epochs"] == "2"
    assert run.data.params["trainer.callbacks.1.metric_key"] == "loss/online/total"

    rows = metrics_rows(paths)
    assert "ema_0.9/loss/val/total" in run.data.metrics  # `ema=0.9/...`: MLflow allows no `=`
    resumed_rows = rows[len([row for row in stopped_rows if row["update"] <= 8]) :]
    assert resumed_rows[0]["update"] == 9
    # every row that either start logged; updates 9-11 hold a value from each start
    assert stored_points(client, run.info.run_id) == logged_points(stopped_rows) + logged_points(resumed_rows)
    last_losses = [row["loss/online/total"] for row in rows if "loss/online/total" in row]
    assert run.data.metrics["loss/online/total"] == last_losses[-1]  # MLflow's latest value: the resumed start's
