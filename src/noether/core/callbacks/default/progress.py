"""Prints progress and the estimated time to the end of training."""

from __future__ import annotations

import time
from typing import Any

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter


class ProgressCallbackConfig(CallBackBaseConfig):
    pass


class ProgressCallback(PeriodicCallback):
    def logged_metric_prefixes(self) -> list[str]:
        return []

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self.start_time = time.perf_counter()
        self.start_update = update_counter.update

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return
        done = update_counter.update - self.start_update
        if done <= 0:
            return
        elapsed = time.perf_counter() - self.start_time
        remaining = elapsed / done * update_counter.remaining_updates
        self.logger.info(
            f"{update_counter.cur_iteration} update {update_counter.update}/{update_counter.end_update} "
            f"elapsed {_duration(elapsed)} ETA {_duration(remaining)}"
        )


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
