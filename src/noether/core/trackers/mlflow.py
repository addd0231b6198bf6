"""MLflow (extra `[mlflow]`): one MLflow run per run, continued on resume."""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic import model_validator

from noether.core.trackers.base import Tracker, TrackerConfig, require_extra

PARAMS_PER_REQUEST = 100  # MLflow's limit for one log_batch


class MlflowTrackerConfig(TrackerConfig):
    tracking_uri: str | None = None
    """Default: the SQLite store `{output_path}/mlflow.db`, shared by the runs under `output_path`."""
    experiment_name: str = "noether"

    @model_validator(mode="after")
    def _mlflow_installed(self) -> MlflowTrackerConfig:
        require_extra("mlflow", "mlflow")
        return self


class MlflowTracker(Tracker):
    """Logs each metrics row as metrics at step = update, and the resolved config as params.

    The MLflow run id is kept in `{run_dir}/mlflow_run_id`; a resume sets that run running again and
    logs on into it. MLflow cannot delete logged metric values, so the steps that the stopped run
    logged after its checkpoint hold a second value, logged again by the resumed run. Characters that
    MLflow does not allow in metric names become `_` (`best=loss.val.total/...` -> `best_loss.val.total/...`).
    """

    config: MlflowTrackerConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = None
        self.mlflow_run_id: str | None = None

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking_uri or f"sqlite:///{(self.paths.output_path / 'mlflow.db').resolve()}"

    def start(self, resumed_update: int | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        id_file = self.paths.run_dir / "mlflow_run_id"
        if resumed_update is not None and id_file.exists():
            self.mlflow_run_id = id_file.read_text().strip()
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.config.experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.config.experiment_name)
        self.mlflow_run_id = self.client.create_run(experiment_id, run_name=self.paths.run_id).info.run_id
        id_file.write_text(self.mlflow_run_id + "\n")
        params = [Param(key, value) for key, value in _flatten(self.run_config).items()]
        for first in range(0, len(params), PARAMS_PER_REQUEST):
            self.client.log_batch(self.mlflow_run_id, params=params[first : first + PARAMS_PER_REQUEST])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        metrics = [Metric(metric_name(key), value, timestamp, step) for key, value in values.items()]
        self.client.log_batch(self.mlflow_run_id, metrics=metrics)

    def close(self) -> None:
        if self.mlflow_run_id is not None:
            self.client.set_terminated(self.mlflow_run_id)
            self.mlflow_run_id = None


def metric_name(key: str) -> str:
    """A metric key as MLflow accepts it: letters, digits, `_ - . / :` and spaces."""
    return re.sub(r"[^\w\-./: ]", "_", key)


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """`{"trainer": {"callbacks": [{"kind": ...}]}}` -> `{"trainer.callbacks.0.kind": ...}`."""
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = enumerate(tree)
    else:
        return {prefix: str(tree)}
    flat = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
