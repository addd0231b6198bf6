"""Early stoppers end training as its limit would (after_training, `last`), their state survives a resume, and a
run they stopped counts as finished: a relaunch changes nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from noether.core.config import ConfigError
from noether.training.run import train
from tests.conftest import tiny_config

SCRIPT = {"kind": "tests.support.scripted_metric.ScriptedMetric", "every_n_epochs": 1, "metric_key": "loss/scripted/total"}
BEST = {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": "loss/scripted/total"}
CHECKPOINT = {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.name not in ("log.txt", ".lock")
    }


def stopper_tree(tmp_path: Path, stopper: dict, values: list[float], **trainer) -> dict:
    callbacks = [{**SCRIPT, "values": values}, BEST, stopper, CHECKPOINT]
    return tiny_config(tmp_path, max_epochs=len(values), callbacks=callbacks, **trainer)


def test_metric_early_stopper_ends_the_run_after_tolerance_evaluations_without_improvement(tmp_path):
    stopper = {
        "kind": "noether.core.callbacks.MetricEarlyStopper",
        "every_n_epochs": 1,
        "metric_key": "loss/scripted/total",
        "tolerance": 2,
    }
    tree = stopper_tree(tmp_path, stopper, [3.0, 2.0, 2.5, 2.1, 1.0, 0.5])
    paths = train(tree)
    logged = rows(paths.run_dir)
    assert [row["epoch"] for row in logged if "loss/scripted/total" in row] == [1, 2, 3, 4]  # epochs 3 and 4 did not improve
    assert logged[-1]["best/loss/scripted/total"] == 2.0  # after_training ran, as at the limit
    assert (paths.checkpoint_dir / "classifier_cp=last_model.th").exists()
    assert not list(paths.checkpoint_dir.glob("*E5_*"))
    assert (
        "stopping early: MetricEarlyStopper: loss/scripted/total has not improved on 2 for 2 evaluations"
        in paths.log_file.read_text()
    )
    before = snapshot(paths.run_dir)
    for resume in ("auto", "run"):
        train(tree, resume=resume)
        assert snapshot(paths.run_dir) == before


def test_metric_early_stopper_state_survives_a_resume(tmp_path):
    """Resumed from epoch 3 (one evaluation without improvement so far), the stopper stops at epoch 4 as the
    uninterrupted run did: its count came back with the checkpoint."""
    stopper = {
        "kind": "noether.core.callbacks.MetricEarlyStopper",
        "every_n_epochs": 1,
        "metric_key": "loss/scripted/total",
        "tolerance": 2,
    }
    tree = stopper_tree(tmp_path / "reference", stopper, [3.0, 2.0, 2.5, 2.1, 1.0, 0.5])
    reference = train(tree)
    branch = tmp_path / "branch"
    shutil.copytree(reference.output_path, branch)
    resumed = train({**tree, "output_path": str(branch)}, resume="run", checkpoint="E3_U27_S3456")
    assert rows(resumed.run_dir) == rows(reference.run_dir)
    assert (resumed.checkpoint_dir / "abandoned_after_E3_U27_S3456" / "classifier_cp=E4_U36_S4608_model.th").exists()


def test_fixed_early_stopper_stops_at_its_epoch(tmp_path):
    stopper = {"kind": "noether.core.callbacks.FixedEarlyStopper", "every_n_epochs": 1, "stop_at_epoch": 2}
    paths = train(stopper_tree(tmp_path, stopper, [3.0, 2.0, 1.0, 0.5]))
    assert max(row["epoch"] for row in rows(paths.run_dir)) == 2
    assert "stop_at_epoch=2 reached at E2_U18_S2304" in paths.log_file.read_text()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "set exactly one of stop_at_epoch, stop_at_update, stop_at_sample (got none)"),
        ({"stop_at_epoch": 1, "stop_at_update": 3}, "(got stop_at_epoch, stop_at_update)"),
    ],
)
def test_fixed_early_stopper_needs_exactly_one_limit(tmp_path, fields, message):
    stopper = {"kind": "noether.core.callbacks.FixedEarlyStopper", "every_n_epochs": 1, **fields}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(stopper_tree(tmp_path, stopper, [1.0]))


def test_metric_early_stopper_needs_its_metric_logged_before_it(tmp_path):
    stopper = {
        "kind": "noether.core.callbacks.MetricEarlyStopper",
        "every_n_epochs": 1,
        "metric_key": "loss/val/total",
        "tolerance": 1,
    }
    with pytest.raises(ConfigError, match="MetricEarlyStopper.metric_key: no callback listed before it logs 'loss/val/total'"):
        train(stopper_tree(tmp_path, stopper, [1.0]))
