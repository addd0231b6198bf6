"""Test-only callbacks that stop training by a real signal at a chosen update.

Configs name them as `kind: tests.support.interrupting.<Class>`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import PositiveInt

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter
from noether.training.callbacks.offline_loss import OfflineLossCallback, OfflineLossCallbackConfig

WAIT_LIMIT_SECONDS = 120


class SignalSelfCallbackConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    at_update: PositiveInt
    signal_name: Literal["SIGINT", "SIGTERM"]


class SignalSelfCallback(PeriodicCallback):
    """Sends `signal_name` to its own process after update `at_update`, as Ctrl-C or a scheduler would."""

    config: SignalSelfCallbackConfig

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update == self.config.at_update:
            os.kill(os.getpid(), getattr(signal, self.config.signal_name))


class WaitForStopCallbackConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    at_update: PositiveInt
    ready_file: str
    """Created once update `at_update` is done: the moment for a test to send its signal."""


class WaitForStopCallback(PeriodicCallback):
    """After update `at_update`, creates `ready_file` and waits until a signal asks the trainer to
    stop, so that a signal sent from outside lands at a known update."""

    config: WaitForStopCallbackConfig

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update != self.config.at_update:
            return
        Path(self.config.ready_file).touch()
        deadline = time.monotonic() + WAIT_LIMIT_SECONDS
        while self.context.trainer.stop_requested is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no signal arrived within {WAIT_LIMIT_SECONDS} s")
            time.sleep(0.01)


class SlowAfterTrainingCallbackConfig(CallBackBaseConfig):
    every_n_epochs: PositiveInt | None = 1
    ready_file: str
    """Created when `after_training` starts: the moment for a test to send its signals."""
    seconds: float


class SlowAfterTrainingCallback(PeriodicCallback):
    """Takes `seconds` in `after_training`, as a final evaluation would, with the final checkpoints still to write."""

    config: SlowAfterTrainingCallbackConfig

    def after_training(self, **kwargs: Any) -> None:
        Path(self.config.ready_file).touch()
        time.sleep(self.config.seconds)


class SlowValidationLossConfig(OfflineLossCallbackConfig):
    seconds_per_batch: float
    signal_after: tuple[PositiveInt | Literal["final"], PositiveInt] | None = None
    """(update, batch): SIGTERM to this process after that batch of the pass after that update (`final`: of the
    `final_pass`), once per `signalled_file` (a resumed run does not signal again)."""
    final_pass: bool = False
    """Evaluate once more in `after_training`, as a final test-set pass would."""
    signalled_file: str | None = None
    """Written with the number of batches the pass had done when the signal was sent."""
    fail: bool = False
    """Raise RuntimeError at `signal_after` instead of sending the signal."""


class SlowValidationLoss(OfflineLossCallback):
    """An evaluation long enough for a scheduler's SIGTERM to land inside it (or one that fails midway)."""

    config: SlowValidationLossConfig

    def process_data(self, batch: Any, *, trainer_model: Any) -> Any:
        time.sleep(self.config.seconds_per_batch)
        self._batches_done += 1
        config = self.config
        if config.signal_after and not Path(config.signalled_file).exists():
            update, after_batch = config.signal_after
            if self._update == update and self._batches_done == after_batch:
                Path(config.signalled_file).write_text(str(self._batches_done))
                if config.fail:
                    raise RuntimeError(f"validation failed after batch {self._batches_done}")
                os.kill(os.getpid(), signal.SIGTERM)
        return super().process_data(batch, trainer_model=trainer_model)

    def periodic_callback(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self._update, self._batches_done = kwargs.pop("pass_name", update_counter.update), 0
        super().periodic_callback(update_counter=update_counter, **kwargs)

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if self.config.final_pass:
            self.periodic_callback(interval_type="update", update_counter=update_counter, pass_name="final")


def slow_validation(**extra: Any) -> dict[str, Any]:
    """Validation in batches of 16 (23 of them), 20 ms each, after every epoch."""
    return {
        "kind": "tests.support.interrupting.SlowValidationLoss",
        "every_n_epochs": 1,
        "dataset_key": "val",
        "batch_size": 16,
        "seconds_per_batch": 0.02,
        **extra,
    }
