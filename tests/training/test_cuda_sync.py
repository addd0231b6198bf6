"""On a GPU, the update loop of the full stack (EMA, training-loss tracking, checkpoint and best callbacks,
bf16 autocast) waits for the device nowhere between the updates that log or save, but for the one read of
the non-finite-loss check before each optimizer step: any other synchronization there would stall the CPU's
kernel launches every update. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from noether.training.run import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_updates_between_logging_steps_never_synchronize(tmp_path):
    tree = tiny_config(
        tmp_path,
        max_epochs=2,
        precision="bfloat16",
        callbacks=[
            {"kind": "tests.support.cuda_sync.ForbidSyncs", "every_n_epochs": 1, "from_update": 2, "until_update": 8},
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
            {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": "loss/val/total"},
            {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9, 0.99]},
            {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_latest_weights": True},
        ],
    )
    tree["device"] = "cuda"
    paths = train(tree)  # a synchronization in updates 3..8 raises and fails the run
    assert (paths.checkpoint_dir / "classifier_cp=last_model.th").exists()
    assert "update 18/18" in paths.log_file.read_text()
