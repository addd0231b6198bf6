"""A test-only stateful callback, named in configs as `kind: tests.support.stateful.CountingCallback`."""

from __future__ import annotations

from typing import Any

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter


class CountingCallbackConfig(CallBackBaseConfig):
    pass


class CountingCallback(PeriodicCallback):
    """Counts its invocations and logs the count as `count/{state_key}`: a resumed run logs the
    numbers an uninterrupted run logs only if the count came back from the checkpoint."""

    def __init__(self, callback_config: CountingCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.count = 0

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return
        self.count += 1
        self.context.log_writer.add_scalar(f"count/{self.state_key}", self.count)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = state_dict["count"]
