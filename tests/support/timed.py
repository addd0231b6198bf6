"""Test-only callbacks for `every_n_seconds`: updates made slow by a known amount per rank, and a record
of the training clock after every update and of the updates a timed callback fired at.

Configs name them as `kind: tests.support.timed.<Class>`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import NonNegativeFloat, PositiveInt

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter


class SlowUpdatesConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    seconds_by_rank: list[NonNegativeFloat]
    """How long each rank sleeps after every update."""


class SlowUpdates(PeriodicCallback):
    config: SlowUpdatesConfig

    def logged_metric_prefixes(self) -> list[str]:
        return []

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type != "eval":
            time.sleep(self.config.seconds_by_rank[self.context.rank])


class ClockRecordConfig(CallBackBaseConfig):
    file: str
    """Lines {"update", "seconds"} are appended to `{file}.{rank}`."""


class ClockRecord(PeriodicCallback):
    """Every update (`every_n_updates: 1`) or, with `every_n_seconds`, the updates at which it fires."""

    config: ClockRecordConfig

    def logged_metric_prefixes(self) -> list[str]:
        return []

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return
        line = {"update": update_counter.update, "seconds": update_counter.training_seconds}
        with Path(f"{self.config.file}.{self.context.rank}").open("a") as file:
            file.write(json.dumps(line) + "\n")


def read_record(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
