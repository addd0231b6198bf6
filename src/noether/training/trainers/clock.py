"""Seconds of training: the clock that `every_n_seconds` schedules count."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from noether.core import distributed
from noether.core.callbacks.periodic import PeriodicCallback


class TrainingClock:
    """Wall-clock time of a run's update loops, over all its launches (a resume continues from the trainer
    state). Under torchrun every rank reads rank 0's clock (one small CPU broadcast per update, only when
    some callback counts seconds), so a timed callback fires at the same update on every rank."""

    def __init__(self, timed_callbacks: Sequence[PeriodicCallback]) -> None:
        self.timed_callbacks = list(timed_callbacks)
        self.seconds = 0.0
        """The value of the last `start` or `read`."""
        self._before = 0.0  # trained by earlier launches
        self._started = time.monotonic()

    def start(self) -> float:
        """The update loop begins: the clock runs from the seconds the run had trained before."""
        self._started = time.monotonic()
        self.seconds = self._before
        return self.seconds

    def read(self) -> float:
        local = self._before + time.monotonic() - self._started
        self.seconds = distributed.value_of_main(local) if self.timed_callbacks else local
        return self.seconds

    def state_dict(self) -> dict[str, Any]:
        last_fired = {callback.state_key: callback.last_fired_seconds for callback in self.timed_callbacks}
        return {"seconds": self.seconds, "last_fired": last_fired}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """A checkpoint written before the clock existed starts it at zero."""
        if saved is None:
            return
        self._before = float(saved["seconds"])
        for callback in self.timed_callbacks:
            callback.last_fired_seconds = float(saved["last_fired"].get(callback.state_key, 0.0))
