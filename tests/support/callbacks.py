"""Test-only callbacks, named in configs as `kind: tests.support.callbacks.<Class>` like a user's own."""

from __future__ import annotations

import time
from typing import Any

import torch

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


class SlowUpdatesConfig(CallBackBaseConfig):
    every_n_updates: int | None = 1
    seconds: float = 0.05


class SlowUpdates(PeriodicCallback):
    """Sleeps after every update: training as slow as a real model's, so that a test can kill it at any
    moment of a run; changes nothing in what is trained or logged."""

    config: SlowUpdatesConfig

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        time.sleep(self.config.seconds)


class StartingWeightsRecorderConfig(CallBackBaseConfig):
    every_n_epochs: int | None = 1


class StartingWeightsRecorder(PeriodicCallback):
    """Saves the model's weights as training (or a resume) starts, to `{run_dir}/starting_weights.{n}.pt`
    for the n-th start, so a test can see what initializers or a resume left in the model."""

    config: StartingWeightsRecorderConfig

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        run_dir = self.context.paths.run_dir
        starts = len(list(run_dir.glob("starting_weights.*.pt")))
        torch.save(self.context.model.state_dict(), run_dir / f"starting_weights.{starts}.pt")
