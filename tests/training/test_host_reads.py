"""The update loop of the full stack reads no tensor value into Python between the updates that log or
save, but for the non-finite-loss check's one read per update: on a GPU each read would stall the CPU's
kernel launches. Runs on the CPU, where the reads are counted (tests/support/host_reads.py); on a GPU
tests/training/test_cuda_sync.py checks the same with torch's sync debug mode."""

from __future__ import annotations

import json

from noether.training.run import train
from tests.conftest import tiny_config

FROM_UPDATE, UNTIL_UPDATE = 2, 8  # the first epoch's updates 3..8: neither logging nor a checkpoint falls there


def test_updates_between_logging_steps_read_nothing_back_but_the_loss_check(tmp_path):
    report = tmp_path / "reads.json"
    tree = tiny_config(
        tmp_path,
        max_epochs=2,
        precision="bfloat16",
        max_grad_norm=1.0,
        callbacks=[
            {
                "kind": "tests.support.host_reads.RecordHostReads",
                "every_n_epochs": 1,
                "from_update": FROM_UPDATE,
                "until_update": UNTIL_UPDATE,
                "report_file": str(report),
            },
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
            {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": "loss/val/total"},
            {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9, 0.99]},
            {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_latest_weights": True},
        ],
    )

    train(tree)

    recorded = json.loads(report.read_text())
    assert recorded["reads"] == []
    assert recorded["guard_reads"] == UNTIL_UPDATE - FROM_UPDATE  # one per update: the loss, before the step
