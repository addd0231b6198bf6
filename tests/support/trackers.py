"""Test-only trackers, the run every tracker test shares (stopped by SIGTERM mid-epoch, then resumed)
and TensorBoard read back.

Configs name the tracker as `kind: tests.support.trackers.FailingTracker`.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import PositiveInt
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator

from noether.core.providers.path import PathProvider
from noether.core.trackers.base import Tracker, TrackerConfig
from noether.training.run import train
from tests.conftest import tiny_config

CHECKPOINT_EVERY_4_UPDATES = {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_updates": 4}
# logs its best value in after_training, so a stopped run logs a row after its interrupt checkpoint
BEST_TRAINING_LOSS = {
    "kind": "noether.core.callbacks.BestCheckpointCallback",
    "every_n_epochs": 1,
    "metric_key": "loss/online/total",
}
# logs under `ema=0.9/`, a key with a character MLflow does not allow
EMA_WITH_VALIDATION = {
    "kind": "noether.core.callbacks.EmaCallback",
    "every_n_epochs": 1,
    "target_factors": [0.9],
    "eval_callbacks": [{"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"}],
}
SIGTERM_AT_UPDATE_11 = {"kind": "tests.support.interrupting.SignalSelfCallback", "at_update": 11, "signal_name": "SIGTERM"}
INTERRUPT_TAG = "E1_U11_S1408.signal_interrupt"
EARLIER_TAG = "E0_U8_S1024"
"""The periodic checkpoint before the stop: the stopped run logged updates 9-11 after it."""


def tracked_tree(output_path: Path, trackers: list[dict[str, Any]]) -> dict[str, Any]:
    """18 updates (9 per epoch), a metrics row every update, checkpoints every 4 updates."""
    tree = tiny_config(
        output_path, log_every_n_updates=1, callbacks=[CHECKPOINT_EVERY_4_UPDATES, BEST_TRAINING_LOSS, EMA_WITH_VALIDATION]
    )
    tree["trackers"] = trackers
    return tree


def metrics_rows(paths: PathProvider) -> list[dict[str, Any]]:
    return [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]


def train_stopped_and_resumed(
    output_path: Path, trackers: list[dict[str, Any]], resume_tag: str
) -> tuple[PathProvider, list[dict[str, Any]]]:
    """Train until SIGTERM after update 11 (mid-epoch 2), then resume from `resume_tag` to the end.

    Returns the run and the metrics rows the stopped run had written."""
    tree = tracked_tree(output_path, trackers)
    stopping = copy.deepcopy(tree)
    stopping["trainer"]["callbacks"].append(SIGTERM_AT_UPDATE_11)
    paths = train(stopping)
    stopped_rows = metrics_rows(paths)
    assert stopped_rows[-1]["update"] == 11
    train(tree, resume=paths.run_id, checkpoint=resume_tag)
    return paths, stopped_rows


def read_event_files(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, TENSORS: 0})  # 0: keep every event
    events.Reload()
    return events


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = read_event_files(log_dir)
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_scalars(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard must show for these metrics rows: each value at step = update, as float32."""
    scalars = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if key != "update":
                scalars[key].append((row["update"], float(np.float32(value))))
    return dict(scalars)


class FailingTrackerConfig(TrackerConfig):
    fail_in: Literal["start", "log"]
    at_update: PositiveInt = 1


class FailingTracker(Tracker):
    """Raises as a tracker with an unreachable server or a full disk would: in `start`, or in `log`
    from update `at_update` on. Counts its calls to `log` in `{run_dir}/failing_tracker_calls`."""

    config: FailingTrackerConfig

    def start(self, resumed_update: int | None) -> None:
        if self.config.fail_in == "start":
            raise ConnectionError("tracking server unreachable")

    def log(self, step: int, values: dict[str, float]) -> None:
        calls_file = self.paths.run_dir / "failing_tracker_calls"
        calls_file.write_text(str(int(calls_file.read_text()) + 1 if calls_file.exists() else 1))
        if step >= self.config.at_update:
            raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass
