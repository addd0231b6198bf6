"""W&B (offline) and MLflow (file store) after a resume from a `signal_interrupt` checkpoint, with the
resume under torchrun: one run stopped by SIGTERM in one process, continued by two processes.

The README promises, checked on that one run (a torchrun start costs seconds):

- resumed from its interrupt checkpoint at update U, the stopped run logged nothing after it but what
  `after_training` logs at U (`best/...`): W&B and MLflow keep those and otherwise show every step once;
- only rank 0 tracks under torchrun (one W&B start, one TensorBoard event file per launch, one MLflow run);
- a resume with another number of processes is accepted with a warning.
"""

from __future__ import annotations

import copy
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import wandb
import yaml
from mlflow import MlflowClient

from noether.core.providers.path import PathProvider
from noether.core.trackers.mlflow import metric_name
from noether.training.run import train
from tests.support.t3_torchrun import run_torchrun
from tests.support.trackers import (
    INTERRUPT_TAG,
    SIGTERM_AT_UPDATE_11,
    expected_scalars,
    metrics_rows,
    tensorboard_scalars,
    tracked_tree,
)
from tests.support.wandb_records import offline_runs

ITERATION_KEYS = ("epoch", "update", "sample")


def tracker_configs(output_path: Path) -> list[dict[str, Any]]:
    return [
        {"kind": "noether.core.trackers.WandbTracker", "project": "trackers-test", "mode": "offline"},
        {
            "kind": "noether.core.trackers.MlflowTracker",
            "tracking_uri": mlflow_uri(output_path),
            "experiment_name": "trackers-test",
        },
        {"kind": "noether.core.trackers.TensorBoardTracker"},
    ]


def mlflow_uri(output_path: Path) -> str:
    return (output_path / "mlruns").as_uri()


def tracker_environment(directory: Path) -> dict[str, str]:
    """No network, no prompts, nothing written outside `directory`; MLflow 3 refuses a file store unless asked."""
    environment = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        environment[variable] = str(directory / "wandb-home" / variable.lower())
    return environment


@pytest.fixture(scope="module")
def resumed_by_two_processes(tmp_path_factory) -> tuple[PathProvider, list[dict[str, Any]], subprocess.CompletedProcess]:
    """SIGTERM after update 11 of 18 in one process, then `--resume run --checkpoint E1_U11_S1408.signal_interrupt`
    under torchrun with two. Returns the run, the rows the stopped run wrote and the torchrun result."""
    directory = tmp_path_factory.mktemp("tracked")
    environment = tracker_environment(directory)
    tree = tracked_tree(directory, tracker_configs(directory))
    stopping = copy.deepcopy(tree)
    stopping["trainer"]["callbacks"].append(SIGTERM_AT_UPDATE_11)
    with pytest.MonkeyPatch.context() as patch:
        for variable, value in environment.items():
            patch.setenv(variable, value)
        paths = train(stopping)
        wandb.teardown()  # everything of the stopped start written, as when its process exits
    stopped_rows = metrics_rows(paths)
    assert stopped_rows[-1]["update"] == 11
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(tree))

    result = run_torchrun(config, "--resume", "run", "--checkpoint", INTERRUPT_TAG, env=environment)

    assert result.returncode == 0, result.stdout + result.stderr
    return paths, stopped_rows, result


def split_at_interrupt(rows: list[dict[str, Any]], stopped_rows: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """How many rows of metrics.jsonl the interrupt checkpoint kept, and the rows the stopped run logged after
    it: those of after_training at update 11, which hold `best/...` values only."""
    kept = sum(1 for row in rows if row["update"] <= 11)
    assert stopped_rows[:kept] == rows[:kept]
    after_checkpoint = stopped_rows[kept:]
    assert after_checkpoint, "the stopped run logged no after_training row"
    for row in after_checkpoint:
        assert row["update"] == 11
        assert all(key.startswith("best/") for key in row if key not in ITERATION_KEYS), row
    return kept, after_checkpoint


def assert_every_step_once(points: list[tuple[str, int]]) -> None:
    """No (metric, step) twice, the iteration keys aside (after_training's row repeats epoch and sample of U)."""
    counts = Counter(point for point in points if point[0] not in ITERATION_KEYS)
    assert [point for point, count in counts.items() if count > 1] == []


def test_wandb_after_a_resume_from_an_interrupt_checkpoint_shows_every_step_once(resumed_by_two_processes):
    paths, stopped_rows, _ = resumed_by_two_processes
    rows = metrics_rows(paths)
    assert rows[-1]["update"] == 18
    kept, after_training_rows = split_at_interrupt(rows, stopped_rows)

    stopped, resumed = offline_runs(paths.run_dir)  # one start per launch: rank 1 started none
    wandb_id = (paths.run_dir / "wandb_run_id").read_text().strip()
    assert stopped.run.run_id == resumed.run.run_id == wandb_id
    assert_every_step_once([(key, row["update"]) for row in stopped.history + resumed.history for key in row if key != "update"])
    assert stopped.history == rows[:kept] + after_training_rows
    assert resumed.history == rows[kept:]  # from update 12 on: nothing at or before the checkpoint again
    assert resumed.history[0]["update"] == 12


def test_mlflow_after_a_resume_from_an_interrupt_checkpoint_shows_every_step_once(resumed_by_two_processes, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    paths, stopped_rows, _ = resumed_by_two_processes
    rows = metrics_rows(paths)
    kept, after_training_rows = split_at_interrupt(rows, stopped_rows)

    client = MlflowClient(tracking_uri=mlflow_uri(paths.output_path))
    experiment = client.get_experiment_by_name("trackers-test")
    (run,) = client.search_runs([experiment.experiment_id])  # rank 1 made no run of its own
    assert run.info.run_id == (paths.run_dir / "mlflow_run_id").read_text().strip()
    assert run.info.status == "FINISHED"
    stored = Counter()
    for key in run.data.metrics:
        stored.update((key, metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, key))
    assert_every_step_once([(key, step) for key, step, _ in stored.elements()])
    # every value that either start logged, once: the resumed start's rows after the checkpoint, the stopped start's before
    # it and its after_training values at update 11
    logged = [(metric_name(key), row["update"], value) for row in rows + after_training_rows for key, value in row.items()]
    assert stored == Counter(point for point in logged if point[0] != "update")
    assert run.data.metrics["loss/online/total"] == [row for row in rows if "loss/online/total" in row][-1]["loss/online/total"]


def test_only_rank_zero_tracks_under_torchrun(resumed_by_two_processes):
    """One W&B start and one TensorBoard event file per launch (the first launch had one process, the
    resume two), and TensorBoard shows exactly metrics.jsonl: no second writer added its own rows."""
    paths, _, _ = resumed_by_two_processes
    assert len(offline_runs(paths.run_dir)) == 2
    assert len(list((paths.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert tensorboard_scalars(paths.run_dir / "tensorboard") == expected_scalars(metrics_rows(paths))


def test_a_resume_with_another_number_of_processes_warns_once(resumed_by_two_processes):
    paths, _, result = resumed_by_two_processes
    warning = (
        f"checkpoint '{INTERRUPT_TAG}' was written by 1 process(es), this run has 2: "
        "random and callback states are taken from rank 0, so the run will not continue exactly"
    )
    assert paths.log_file.read_text().count(warning) == 1
    assert warning in result.stdout
