"""Test-only callbacks for the EMA tests, named in configs as `kind: tests.support.ema_callbacks.<Class>`."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from pydantic import PositiveInt

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter

LIVE_WEIGHTS_FILE = "live_weights.th"
CHILD_FAILURE = "test child failed on purpose"


def checksum(state_dict: dict[str, torch.Tensor]) -> float:
    """Float64 sum of the floating-point entries: tells apart the weight sets of one run."""
    return float(sum(tensor.double().sum() for tensor in state_dict.values() if tensor.is_floating_point()))


class LiveWeightsRecorderConfig(CallBackBaseConfig):
    pass


class LiveWeightsRecorder(PeriodicCallback):
    """Writes the live weights before training and after every update to `{run_dir}/live_weights.th`,
    so that a test can compute the EMA by hand."""

    def before_training(self, **kwargs: Any) -> None:
        self.states = [self._live_state()]

    def track_after_update_step(self, **kwargs: Any) -> None:
        self.states.append(self._live_state())

    def after_training(self, **kwargs: Any) -> None:
        torch.save(self.states, self.context.paths.run_dir / LIVE_WEIGHTS_FILE)

    def _live_state(self) -> dict[str, torch.Tensor]:
        return {key: value.clone() for key, value in self.context.model.state_dict().items()}


class WeightsChecksumConfig(CallBackBaseConfig):
    pass


class WeightsChecksum(PeriodicCallback):
    """Logs `weights/checksum` of the model it runs on: shows which weights an EMA child saw."""

    def logged_metric_prefixes(self) -> list[str]:
        return ["weights/"]

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self.context.log_writer.add_scalar("weights/checksum", checksum(self.context.model.state_dict()))


class InvocationCounterConfig(CallBackBaseConfig):
    pass


class InvocationCounter(PeriodicCallback):
    """Logs `invocations`, how often it ran so far, a count kept in the trainer checkpoint."""

    def __init__(self, callback_config: InvocationCounterConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.invocations = 0

    def logged_metric_prefixes(self) -> list[str]:
        return ["invocations"]

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self.invocations += 1
        self.context.log_writer.add_scalar("invocations", self.invocations)

    def state_dict(self) -> dict[str, Any]:
        return {"invocations": self.invocations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.invocations = state_dict["invocations"]


class FailingChildConfig(CallBackBaseConfig):
    pass


class FailingChild(PeriodicCallback):
    """Raises whenever it runs, so a test can see what an EMA callback leaves behind when a child fails."""

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        raise RuntimeError(CHILD_FAILURE)


class SigtermAtUpdateConfig(CallBackBaseConfig):
    update: PositiveInt
    """The update after which the process receives SIGTERM."""


class SigtermAtUpdate(PeriodicCallback):
    """Sends SIGTERM to its own process right after update `update`, as a cluster scheduler would,
    so that a run is interrupted at an exact update."""

    config: SigtermAtUpdateConfig

    def track_after_update_step(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update == self.config.update:
            os.kill(os.getpid(), signal.SIGTERM)
