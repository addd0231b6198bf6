"""Test-only callbacks, named in configs as `kind: tests.support.callbacks.<Class>` like a user's own."""

from __future__ import annotations

from typing import Any

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.context import CallbackContext
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.config import build, by_kind
from noether.core.utils.training.counter import UpdateCounter


class FiringRecorderConfig(CallBackBaseConfig):
    metric: str = "fired"
    """Key prefix of what it logs, so several recorders in one run stay apart."""


class FiringRecorder(PeriodicCallback):
    """Logs `{metric}/{interval_type}` = 1 whenever it runs: metrics.jsonl then shows where it fired."""

    config: FiringRecorderConfig

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self.context.log_writer.add_scalar(f"{self.config.metric}/{interval_type}", 1)


class ForwardingCallbackConfig(CallBackBaseConfig):
    eval_callbacks: list[by_kind(CallBackBaseConfig)] = []
    """Nested callbacks, typed like BestCheckpointCallback's `eval_callbacks`."""


class ForwardingCallback(PeriodicCallback):
    """Runs every child's `at_eval` whenever it fires, the children's keys prefixed with `forwarded/`."""

    config: ForwardingCallbackConfig

    def __init__(self, callback_config: ForwardingCallbackConfig, context: CallbackContext) -> None:
        super().__init__(callback_config, context)
        child_context = context.with_log_prefix("forwarded/")
        self.children = [build(child_config, child_context) for child_config in callback_config.eval_callbacks]

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        for child in self.children:
            child.at_eval(update_counter=update_counter)
