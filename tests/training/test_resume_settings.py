"""A resume whose config changes the optimizer: accepted, the config wins (README, "What a resume
guarantees"). `config.yaml` is rewritten to describe what runs, a changed `betas` is applied to the
optimizer, and the learning rate follows the configured schedule (another base rate and decay here).
`weight_decay` is covered in test_resume.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from noether.training.run import train
from tests.conftest import tiny_config
from tests.support.checkpoints import checkpoint_path

RESUMED_TAG = "E1_U9_S1152"
TOTAL_UPDATES = 18
# the quickstart's AdamW (lr 0.002, weight_decay 0.01, default betas, cosine schedule with warm-up) becomes:
NEW_LR = 0.004
NEW_BETAS = [0.8, 0.95]


def settings_tree(output_path: Path) -> dict[str, Any]:
    """18 updates (9 per epoch), a metrics row with the learning rate after every update."""
    checkpoint = {
        "kind": "noether.core.callbacks.CheckpointCallback",
        "every_n_epochs": 1,
        "save_latest_weights": True,
        "save_latest_optim": True,
    }
    return tiny_config(output_path, log_every_n_updates=1, callbacks=[checkpoint])


def changed_optimizer(tree: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(tree)
    changed["model"]["optimizer"].update(lr=NEW_LR, betas=NEW_BETAS, schedule={"decay": "linear"})
    return changed


def rows(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed_with_other_settings(tmp_path_factory):
    """The run resumed from epoch 1 with the changed optimizer, and the metrics rows it had before the resume."""
    tree = settings_tree(tmp_path_factory.mktemp("settings"))
    paths = train(tree)
    before = rows(paths.metrics_file)
    config_before = yaml.safe_load(paths.config_file.read_text())
    assert config_before["model"]["optimizer"]["lr"] == 0.002 and "betas" not in config_before["model"]["optimizer"]

    train(changed_optimizer(tree), resume="run", checkpoint=RESUMED_TAG)

    return paths, before


def test_config_yaml_is_rewritten_with_the_config_that_runs(resumed_with_other_settings):
    paths, _ = resumed_with_other_settings
    optimizer = yaml.safe_load(paths.config_file.read_text())["model"]["optimizer"]
    assert optimizer["lr"] == NEW_LR
    assert optimizer["betas"] == NEW_BETAS
    assert optimizer["schedule"]["decay"] == "linear" and optimizer["schedule"]["warmup_fraction"] == 0.0
    assert optimizer["weight_decay"] == 0.01  # unchanged settings stay


def test_a_changed_betas_is_applied_to_the_optimizer(resumed_with_other_settings):
    paths, _ = resumed_with_other_settings
    for tag in ("last", "E2_U18_S2304"):
        (group,) = torch.load(checkpoint_path(paths, "classifier", tag, "optim"), weights_only=True)["state_dict"]["param_groups"]
        assert list(group["betas"]) == NEW_BETAS, tag
        assert group["weight_decay"] == 0.01
    [line] = [line for line in paths.log_file.read_text().splitlines() if "optimizer of classifier: the config's" in line]
    assert "betas (0.9, 0.999) -> (0.8, 0.95)" in line and line.endswith("replaces the checkpoint's")


def test_the_learning_rate_follows_the_configured_schedule_after_the_resume(resumed_with_other_settings):
    """Before the checkpoint, the old schedule's rows as they were; after it, the new base rate with a linear
    decay over the 18 updates: the update that makes update u runs at NEW_LR * (1 - (u - 1) / 18)."""
    paths, before = resumed_with_other_settings
    after = rows(paths.metrics_file)
    kept = [row for row in before if row["update"] <= 9]
    assert after[: len(kept)] == kept
    resumed = after[len(kept) :]
    assert [row["update"] for row in resumed if "lr/classifier" in row] == list(range(10, TOTAL_UPDATES + 1))
    for row in resumed:
        if "lr/classifier" in row:
            expected = NEW_LR * (1 - (row["update"] - 1) / TOTAL_UPDATES)
            assert row["lr/classifier"] == pytest.approx(expected, rel=1e-12), row["update"]
    (group,) = torch.load(checkpoint_path(paths, "classifier", "last", "optim"), weights_only=True)["state_dict"]["param_groups"]
    assert group["lr"] == pytest.approx(NEW_LR * (1 - 17 / TOTAL_UPDATES), rel=1e-12)
