"""AccuracyCallback: the share of a dataset's samples the current model classifies right."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from noether.examples.digits import DigitsDataset, DigitsDatasetConfig
from noether.training.run import evaluate, train
from tests.conftest import tiny_config
from tests.support.data_callbacks import model_from_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run logging validation accuracy, and that accuracy computed by hand from its last checkpoint."""
    callbacks = [
        # 269 samples: batches of 100, 100 and 69
        {"kind": "noether.training.callbacks.AccuracyCallback", "every_n_epochs": 1, "dataset_key": "val", "batch_size": 100},
        {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 3, "save_optim": False},  # and `last` at the end
    ]
    tree = tiny_config(tmp_path_factory.mktemp("accuracy"), max_epochs=3, callbacks=callbacks)
    paths = train(tree)

    model = model_from_checkpoint(tree, paths, "last")  # the weights of the final evaluation
    dataset = DigitsDataset(DigitsDatasetConfig(split="val"))
    with torch.no_grad():
        expected = (model(dataset.x).argmax(dim=-1) == dataset.y).float().mean().item()
    records = [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]
    return {"tree": tree, "records": records, "expected": expected}


def test_accuracy_is_the_share_of_correct_predictions_over_the_dataset(run: dict[str, Any]) -> None:
    records = run["records"]
    assert [record["epoch"] for record in records if "accuracy/val" in record] == [1, 2, 3]
    assert records[-1]["accuracy/val"] == pytest.approx(run["expected"], abs=1e-6)


def test_accuracy_of_a_checkpoint_matches_what_training_logged(run: dict[str, Any]) -> None:
    summary = evaluate(run["tree"], run="run", checkpoint="last")
    assert summary["accuracy/val"] == pytest.approx(run["expected"], abs=1e-6)
