"""The bundled example evaluates validation and test loss and accuracy every epoch, and learns the task."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import QUICKSTART, run_cli
from tests.support.trackers import expected_scalars, tensorboard_scalars

EVALUATION_KEYS = {"loss/val/total", "accuracy/val", "loss/test/total", "accuracy/test"}


def test_the_quickstart_logs_evaluation_every_epoch_and_reaches_90_percent_test_accuracy(tmp_path: Path) -> None:
    run_cli("noether-train", str(QUICKSTART), f"output_path={tmp_path}", "run_id=quickstart", cwd=tmp_path)

    records = [json.loads(line) for line in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    evaluations = {record["epoch"]: record for record in records if EVALUATION_KEYS <= record.keys()}
    max_epochs = yaml.safe_load(QUICKSTART.read_text())["trainer"]["max_epochs"]
    assert sorted(evaluations) == list(range(1, max_epochs + 1))
    assert evaluations[max_epochs]["accuracy/test"] >= 0.9
    # the example enables TensorBoard
    assert tensorboard_scalars(tmp_path / "quickstart" / "tensorboard") == expected_scalars(records)
