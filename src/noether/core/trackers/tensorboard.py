"""TensorBoard: event files under `{run_dir}/tensorboard/`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from noether.core.trackers.base import Tracker, TrackerConfig


class TensorBoardTrackerConfig(TrackerConfig):
    pass


class TensorBoardTracker(Tracker):
    """Every value of every metrics row as a scalar at step = update; the config as text at step 0.

    One event per row (not per value): the event file's checksums are computed in pure Python, and
    one per row keeps that cost far below an update's. A resume from the checkpoint at update U is
    exact: a start marker at step U makes TensorBoard drop every event at steps >= U, and the rows
    metrics.jsonl holds for U are written again. So a viewer shows each step once, with the values
    of metrics.jsonl, whatever the stopped run logged after its checkpoint.
    """

    config: TensorBoardTrackerConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writer = None

    @property
    def log_dir(self) -> Path:
        return self.paths.run_dir / "tensorboard"

    def start(self, resumed_update: int | None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from torch.utils.tensorboard.summary import text

        self.writer = EventFileWriter(str(self.log_dir))
        if resumed_update is not None:
            self.writer.add_event(
                Event(wall_time=time.time(), step=resumed_update, session_log=SessionLog(status=SessionLog.START))
            )
        if not resumed_update:  # a fresh start, or a resume at update 0, which dropped the config too
            config_text = yaml.safe_dump(self.run_config, sort_keys=False)
            markdown = "".join(f"    {line}\n" for line in config_text.splitlines())  # a code block
            self.writer.add_event(Event(wall_time=time.time(), step=0, summary=text("config", markdown)))
        if resumed_update is not None:
            for row in _rows_at_update(self.paths.metrics_file, resumed_update):
                self.log(resumed_update, {key: value for key, value in row.items() if key != "update"})

    def log(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        scalars = Summary(value=[Summary.Value(tag=key, simple_value=value) for key, value in values.items()])
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=scalars))

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
