"""Logs each optimizer's learning rate: `lr/{model}`."""

from __future__ import annotations

from typing import Any

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter


class LearningRateCallbackConfig(CallBackBaseConfig):
    pass


class LearningRateCallback(PeriodicCallback):
    def logged_metric_prefixes(self) -> list[str]:
        return ["lr/"]

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return
        for name, model in self.context.model.named_models().items():
            if model.optimizer is not None:
                self.context.log_writer.add_scalar(f"lr/{name}", model.optimizer.param_groups[0]["lr"])
