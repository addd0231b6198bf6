"""W&B, offline: the logged rows read back from the run's files; a resume continues the same W&B run."""

from __future__ import annotations

import json

import pytest
import wandb

from noether.training.run import train
from tests.support.trackers import EARLIER_TAG, metrics_rows, tracked_tree, train_stopped_and_resumed
from tests.support.wandb_records import offline_runs

WANDB_OFFLINE = [{"kind": "noether.core.trackers.WandbTracker", "project": "trackers-test", "mode": "offline"}]


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """No network, no prompts, and nothing written outside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))


def test_an_offline_run_holds_every_metrics_row_with_update_as_the_step_and_the_config(tmp_path):
    paths = train(tracked_tree(tmp_path, WANDB_OFFLINE))
    wandb.teardown()  # waits until W&B's service has written everything, as it does when a process exits

    (offline_run,) = offline_runs(paths.run_dir)
    assert offline_run.run.run_id == (paths.run_dir / "wandb_run_id").read_text().strip()
    assert offline_run.run.display_name == "run"
    assert offline_run.run.project == "trackers-test"
    config = {item.key: json.loads(item.value_json) for item in offline_run.run.config.update}
    assert config["run_id"] == "run" and config["trainer"]["max_epochs"] == 2
    assert offline_run.step_metrics == {"*": "update"}
    assert offline_run.history == metrics_rows(paths)


def test_a_resumed_run_continues_the_same_wandb_run_and_logs_again_what_followed_the_checkpoint(tmp_path):
    paths, stopped_rows = train_stopped_and_resumed(tmp_path, WANDB_OFFLINE, EARLIER_TAG)
    wandb.teardown()

    stopped, resumed = offline_runs(paths.run_dir)
    assert resumed.run.run_id == stopped.run.run_id
    assert [item.key for item in resumed.run.config.update] == ["_wandb"]  # the config was recorded by the first start
    assert stopped.history == stopped_rows
    rows = metrics_rows(paths)
    # the resumed start logged every row after the checkpoint at update 8, updates 9-11 a second time
    assert resumed.history == [row for row in rows if row["update"] > 8]
    assert [row["update"] for row in resumed.history][:3] == [9, 10, 11]
    assert rows == [row for row in stopped_rows if row["update"] <= 8] + resumed.history
