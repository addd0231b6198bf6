"""The example configs of the documented API run unchanged: each trains in a tiny run."""

from __future__ import annotations

from pathlib import Path

import yaml

from noether.training.run import train
from tests.conftest import tiny_config

# the three callback examples of the documented API, verbatim but for the model name
BEST = """
- kind: noether.core.callbacks.BestCheckpointCallback
  name: BestCheckpointCallback
  every_n_epochs: 1
  metric_key: loss/val/total
  eval_callbacks:
    - kind: noether.training.callbacks.OfflineLossCallback
      every_n_epochs: 1 # ignored; the parent triggers on new-best
      dataset_key: test
"""
CHECKPOINT = """
- kind: noether.core.callbacks.CheckpointCallback
  name: CheckpointCallback
  every_n_epochs: 1
  save_weights: true
  save_optim: true
"""
EMA = """
- kind: noether.core.callbacks.EmaCallback
  every_n_epochs: 10
  save_weights: false
  save_last_weights: false
  save_latest_weights: true
  target_factors:
    - 0.9999
  name: EmaCallback
  eval_callbacks:
    - kind: noether.training.callbacks.OfflineLossCallback
      every_n_epochs: 1
      dataset_key: val
"""
VALIDATION = {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"}


def test_the_documented_example_configs_train(tmp_path: Path) -> None:
    callbacks = [VALIDATION, *yaml.safe_load(BEST), *yaml.safe_load(CHECKPOINT), *yaml.safe_load(EMA)]
    paths = train(tiny_config(tmp_path, callbacks=callbacks))
    files = {path.name for path in paths.checkpoint_dir.iterdir()}
    assert "classifier_cp=best_model.loss.val.total_model.th" in files
    assert {"classifier_cp=E2_U18_S2304_model.th", "classifier_cp=E2_U18_S2304_optim.th"} <= files
    # the EMA's own schedule (10 epochs) never came, but its weights go with every trainer checkpoint
    assert {"classifier_ema=0.9999_cp=E2_U18_S2304_model.th", "classifier_ema=0.9999_cp=last_model.th"} <= files
    logged = paths.metrics_file.read_text()
    assert "best=loss.val.total/loss/test/total" in logged and "ema=0.9999/loss/val/total" in logged
