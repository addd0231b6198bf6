"""`trainer.stop_before`: a run that knows when its job ends stops on its own, with an interrupt
checkpoint written in time, so a job whose scheduler sends no signal still leaves a resumable run."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Literal

from noether.core.config import ConfigError

StopBefore = float | Literal["slurm"]
MARGIN_SECONDS = 30.0
"""Slack on top of the last save and the longest step: start-up of the save, a slow disk, clock skew."""


class Deadline:
    """Tells, between updates, when the time left is less than the last save took, plus the longest step
    so far (the check waits one step), plus a margin."""

    def __init__(self, end_time: float, clock: Callable[[], float] = time.time) -> None:
        self.end_time = end_time
        self._clock = clock
        self._longest_step = 0.0
        self._step_started: float | None = None

    @classmethod
    def from_config(cls, stop_before: StopBefore | None) -> Deadline | None:
        if stop_before is None:
            return None
        if stop_before == "slurm":
            value = os.environ.get("SLURM_JOB_END_TIME")
            if value is None:
                raise ConfigError("trainer.stop_before: 'slurm' needs SLURM_JOB_END_TIME, which is set only inside a Slurm job")
            try:
                stop_before = float(value)
            except ValueError:
                raise ConfigError(f"trainer.stop_before: SLURM_JOB_END_TIME is '{value}', not a Unix time") from None
        deadline = cls(float(stop_before))
        if deadline.end_time <= deadline._clock():
            raise ConfigError(f"trainer.stop_before: {_format(deadline.end_time)} has passed")
        return deadline

    def step_started(self) -> None:
        self._step_started = self._clock()

    def reason_to_stop(self, last_save_seconds: float | None) -> str | None:
        """At the end of a step: why to stop now, or None while there is time for another step and a save."""
        now = self._clock()
        if self._step_started is not None:
            self._longest_step = max(self._longest_step, now - self._step_started)
        needed = (last_save_seconds or 0.0) + self._longest_step + MARGIN_SECONDS
        if self.end_time - now >= needed:
            return None
        return f"the deadline {_format(self.end_time)} (trainer.stop_before: {self.end_time - now:.0f} s left, a save and a step need ~{needed:.0f} s)"


def _format(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
