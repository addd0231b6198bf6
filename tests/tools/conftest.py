"""One real run shared by the run-tool tests: periodic, latest, last, best, tolerance, EMA and interrupt checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from noether.core.providers.path import PathProvider
from noether.training.run import train
from tests.conftest import tiny_config

INTERRUPT_TAG = "E1_U11_S1408.signal_interrupt"
BEST_TAG = "best_model.loss.val.total"
TEST_LOSS = {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "test"}


def full_run_tree(output_path: Path) -> dict:
    """18 updates planned, stopped by SIGINT after update 11; validation and best tracking every 2 updates,
    the best and EMA models evaluated on the test set."""
    callbacks = [
        {
            "kind": "noether.core.callbacks.CheckpointCallback",
            "every_n_epochs": 1,
            "save_latest_weights": True,
            "save_latest_optim": True,
        },
        {
            "kind": "noether.core.callbacks.EmaCallback",
            "every_n_epochs": 1,
            "target_factors": [0.9],
            "eval_callbacks": [TEST_LOSS],
        },
        {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_updates": 2, "dataset_key": "val"},
        {
            "kind": "noether.core.callbacks.BestCheckpointCallback",
            "every_n_updates": 2,
            "metric_key": "loss/val/total",
            "tolerances": [0, 3],
            "eval_callbacks": [TEST_LOSS],
        },
        {"kind": "tests.support.interrupting.SignalSelfCallback", "at_update": 11, "signal_name": "SIGINT"},
    ]
    return tiny_config(output_path, log_every_n_updates=3, callbacks=callbacks)


@pytest.fixture(scope="package")
def full_run(tmp_path_factory) -> PathProvider:
    return train(full_run_tree(tmp_path_factory.mktemp("full_run")))
