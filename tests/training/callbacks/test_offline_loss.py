"""OfflineLossCallback: the loss of the current model averaged over every sample of a dataset."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from noether.examples.digits import DigitsDataset, DigitsDatasetConfig
from noether.training.run import evaluate, train
from tests.conftest import tiny_config
from tests.support.data_callbacks import model_from_checkpoint

# the test set's callback filters its terms to `^cross`; `total` (which best-checkpoint callbacks read) is always logged
LOGGED_TERMS = {"loss/val/total", "loss/val/cross_entropy", "loss/val/logit_norm", "loss/test/total", "loss/test/cross_entropy"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run logging offline losses, and those losses computed by hand from its last checkpoint."""
    callbacks = [
        # 269 samples: batches of 100, 100 and 69
        {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val", "batch_size": 100},
        {
            "kind": "noether.training.callbacks.OfflineLossCallback",
            "every_n_epochs": 1,
            "dataset_key": "test",
            "output_patterns_to_log": ["^cross"],
        },
        {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 2, "save_optim": False},  # and `last` at the end
    ]
    trainer = "tests.support.data_callbacks.MultiTermClassificationTrainer"
    tree = tiny_config(tmp_path_factory.mktemp("offline_loss"), kind=trainer, callbacks=callbacks)
    paths = train(tree)

    model = model_from_checkpoint(tree, paths, "last")  # the weights of the final evaluation
    expected = {}
    with torch.no_grad():
        for split in ("val", "test"):
            dataset = DigitsDataset(DigitsDatasetConfig(split=split))
            logits = model(dataset.x)
            cross_entropy = F.cross_entropy(logits, dataset.y).item()
            expected[f"loss/{split}/total"] = expected[f"loss/{split}/cross_entropy"] = cross_entropy
            expected[f"loss/{split}/logit_norm"] = logits.norm(dim=-1).mean().item()
    records = [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]
    return {"tree": tree, "records": records, "expected": expected}


def test_offline_loss_is_the_mean_of_every_loss_term_over_the_dataset(run: dict[str, Any]) -> None:
    records, expected = run["records"], run["expected"]
    assert [record["epoch"] for record in records if "loss/val/total" in record] == [1, 2]

    logged = {key: value for key, value in records[-1].items() if key.startswith(("loss/val/", "loss/test/"))}
    assert logged.keys() == LOGGED_TERMS
    assert logged == {key: pytest.approx(expected[key], rel=1e-5) for key in LOGGED_TERMS}


def test_offline_loss_of_a_checkpoint_matches_what_training_logged(run: dict[str, Any]) -> None:
    # without the shared loader the callback reads a loader of its own
    summary = evaluate(run["tree"], run="run", checkpoint="last")
    expected = {key: pytest.approx(run["expected"][key], rel=1e-5) for key in LOGGED_TERMS}
    assert {key: summary[key] for key in LOGGED_TERMS} == expected
