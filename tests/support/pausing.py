"""A test-only callback that holds training at a chosen update until the test lets it go on.

Configs name it as `kind: tests.support.pausing.PauseCallback`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import PositiveInt

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter

WAIT_LIMIT_SECONDS = 120


class PauseCallbackConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    at_update: PositiveInt
    ready_file: str
    """Created once update `at_update` is done."""
    go_file: str
    """Training goes on once this file exists (at once, when it exists already)."""


class PauseCallback(PeriodicCallback):
    config: PauseCallbackConfig

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update != self.config.at_update:
            return
        Path(self.config.ready_file).touch()
        deadline = time.monotonic() + WAIT_LIMIT_SECONDS
        while not Path(self.config.go_file).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.config.go_file} did not appear within {WAIT_LIMIT_SECONDS} s")
            time.sleep(0.01)
