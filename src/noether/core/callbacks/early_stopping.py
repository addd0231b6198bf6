"""Early stoppers: end training before its limit, as the limit would (after_training runs, `last` is written).

A stopper asks the trainer to stop through its context (`trainer.stop_early`); the trainer leaves the
loop after the step, on every rank (stoppers decide on values every rank has), and a run they stopped
counts as finished: a relaunch or `--resume` of it does nothing more.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveInt, model_validator

from noether.core.callbacks.base import CallBackBaseConfig, check_metric_logged_before, logged_value
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.config import ConfigError
from noether.core.utils.training.counter import UpdateCounter


class MetricEarlyStopperConfig(CallBackBaseConfig):
    name: Literal["MetricEarlyStopper"] | None = None
    metric_key: str
    """Metric to watch, logged by a callback listed earlier that runs at least as often."""
    tolerance: PositiveInt
    """Stop after this many invocations in a row without an improvement of the metric."""


class MetricEarlyStopper(PeriodicCallback):
    """Stops training once `metric_key` has not improved for `tolerance` invocations."""

    config: MetricEarlyStopperConfig

    def __init__(self, callback_config: MetricEarlyStopperConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        try:
            self.higher_is_better = context.metric_properties.higher_is_better(callback_config.metric_key)
        except ValueError as error:
            raise ConfigError(f"{self.state_key}: {error}") from None
        self.best_value = -math.inf if self.higher_is_better else math.inf
        self.invocations_without_improvement = 0

    def logged_metric_prefixes(self) -> list[str]:
        return []

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        check_metric_logged_before(self, self.config.metric_key)

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return
        key = self.config.metric_key
        value = logged_value(self, key)
        improved = value > self.best_value if self.higher_is_better else value < self.best_value
        if improved:
            self.best_value, self.invocations_without_improvement = value, 0
            return
        self.invocations_without_improvement += 1
        if self.invocations_without_improvement >= self.config.tolerance:
            self.context.trainer.stop_early(
                f"{self.state_key}: {key} has not improved on {self.best_value:.6g} for {self.config.tolerance} evaluations"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "invocations_without_improvement": self.invocations_without_improvement}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_value = state_dict["best_value"]
        self.invocations_without_improvement = state_dict["invocations_without_improvement"]


class FixedEarlyStopperConfig(CallBackBaseConfig):
    name: Literal["FixedEarlyStopper"] | None = None
    stop_at_epoch: NonNegativeInt | None = None
    stop_at_update: NonNegativeInt | None = None
    stop_at_sample: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> FixedEarlyStopperConfig:
        given = [name for name in ("stop_at_epoch", "stop_at_update", "stop_at_sample") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one of stop_at_epoch, stop_at_update, stop_at_sample (got {', '.join(given) or 'none'})"
            )
        return self


class FixedEarlyStopper(PeriodicCallback):
    """Stops training at the first invocation at or past a fixed epoch, update or sample."""

    config: FixedEarlyStopperConfig

    def logged_metric_prefixes(self) -> list[str]:
        return []

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return
        config = self.config
        for limit, reached in (
            ("stop_at_epoch", config.stop_at_epoch is not None and update_counter.epoch >= config.stop_at_epoch),
            ("stop_at_update", config.stop_at_update is not None and update_counter.update >= config.stop_at_update),
            ("stop_at_sample", config.stop_at_sample is not None and update_counter.sample >= config.stop_at_sample),
        ):
            if reached:
                self.context.trainer.stop_early(
                    f"{self.state_key}: {limit}={getattr(config, limit)} reached at {update_counter.cur_iteration}"
                )
