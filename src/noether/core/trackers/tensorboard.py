"""TensorBoard: event files under `{run_dir}/tensorboard/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from noether.core.trackers.base import Tracker, TrackerConfig


class TensorBoardTrackerConfig(TrackerConfig):
    pass


class TensorBoardTracker(Tracker):
    """Every value of every metrics row as a scalar at step = update; the config as text at step 0.

    A resume from the checkpoint at update U is exact: the writer purges everything logged at
    steps >= U, then logs again the rows metrics.jsonl holds for U. So a viewer shows each step
    once, with the values of metrics.jsonl, whatever the stopped run logged after its checkpoint.
    """

    config: TensorBoardTrackerConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writer = None

    @property
    def log_dir(self) -> Path:
        return self.paths.run_dir / "tensorboard"

    def start(self, resumed_update: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resumed_update)
        if not resumed_update:  # a fresh start, or a resume at update 0, whose purge also dropped the config
            config_text = yaml.safe_dump(self.run_config, sort_keys=False)
            self.writer.add_text("config", "".join(f"    {line}\n" for line in config_text.splitlines()), global_step=0)
        if resumed_update is not None:
            for row in _rows_at_update(self.paths.metrics_file, resumed_update):
                self.log(resumed_update, {key: value for key, value in row.items() if key != "update"})

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _rows_at_update(metrics_file: Path, update: int) -> list[dict[str, Any]]:
    """The rows of `update` in metrics.jsonl, in the order they were written.

    A resume cut the file back to its checkpoint at `update`, so they are the last rows but the
    ones the resumed run has written since."""
    rows = []
    for line in reversed(metrics_file.read_text().splitlines()):
        row = json.loads(line)
        if row["update"] < update:
            break
        if row["update"] == update:
            rows.append(row)
    return rows[::-1]
