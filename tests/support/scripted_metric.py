"""Test-only callbacks for the best-checkpoint tests, named in configs as `kind: tests.support.scripted_metric.<Class>`."""

from __future__ import annotations

import os
import signal
from typing import Any, Literal

from pydantic import ConfigDict, model_validator

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter


class ScriptedMetricConfig(CallBackBaseConfig):
    model_config = ConfigDict(allow_inf_nan=True)  # scripts NaN metrics, which configs otherwise refuse

    metric_key: str = "loss/scripted/total"
    values: list[float]
    """The value logged at the first, second, ... invocation."""
    declares_metric: bool = True
    """False: `logged_metric_prefixes` returns None, like a user's callback that does not say what it logs."""

    @model_validator(mode="after")
    def _counted_schedule(self) -> ScriptedMetricConfig:
        if self.every_n_samples is not None:
            raise ValueError("a scripted metric runs every n epochs or every n updates")
        return self


class ScriptedMetric(PeriodicCallback):
    """Logs a value sequence the test controls. The position in it follows from the training
    iteration, so a resumed run continues the script where the interrupted one stopped."""

    config: ScriptedMetricConfig

    def logged_metric_prefixes(self) -> list[str] | None:
        return [self.config.metric_key] if self.config.declares_metric else None

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return  # the script belongs to training steps
        config = self.config
        if config.every_n_epochs is not None:
            invocation = update_counter.epoch // config.every_n_epochs
        else:
            invocation = update_counter.update // config.every_n_updates
        self.context.log_writer.add_scalar(config.metric_key, config.values[invocation - 1])


class HookRecorderConfig(CallBackBaseConfig):
    pass


class HookRecorder(PeriodicCallback):
    """Logs `evaluated/{interval_type}` = 1 when it runs and `lifecycle/{hook}` = 1 on before/after
    training, so metrics.jsonl shows when a parent dispatched it."""

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self.context.log_writer.add_scalar("lifecycle/before_training", 1)

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self.context.log_writer.add_scalar("lifecycle/after_training", 1)

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self.context.log_writer.add_scalar(f"evaluated/{interval_type}", 1)


class InterruptConfig(CallBackBaseConfig):
    how: Literal["sigterm", "crash"]


class Interrupt(PeriodicCallback):
    """Stops training when it runs: `sigterm` sends SIGTERM to this process (the trainer finishes
    the step and saves a `.signal_interrupt` checkpoint), `crash` raises as a failing callback would."""

    config: InterruptConfig

    def logged_metric_prefixes(self) -> list[str]:
        return []

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if self.config.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise RuntimeError(f"scripted crash at {update_counter.cur_iteration}")
