"""Test-only failures during training: a callback and a trainer that raise at a chosen point.

Configs name them as `kind: tests.support.failing.<Class>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import PositiveInt

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter
from noether.training.trainers.classification import ClassificationTrainer, ClassificationTrainerConfig


class FailAtUpdateCallbackConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    at_update: PositiveInt
    failed_file: str | None = None
    """Fail only while this file does not exist, and create it: a resume that runs the step again passes."""


class FailAtUpdateCallback(PeriodicCallback):
    """Raises RuntimeError in `after_update` of update `at_update` (a resume past it never fails)."""

    config: FailAtUpdateCallbackConfig

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        failed_file = self.config.failed_file
        if update_counter.update != self.config.at_update or (failed_file and Path(failed_file).exists()):
            return
        if failed_file:
            Path(failed_file).touch()
        raise RuntimeError(f"test failure after update {update_counter.update}")


class FailingClassificationTrainerConfig(ClassificationTrainerConfig):
    fail_on_step: PositiveInt
    """Raise in the n-th call of `train_step` made by this process."""


class FailingClassificationTrainer(ClassificationTrainer):
    config: FailingClassificationTrainerConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0

    def train_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.steps += 1
        if self.steps == self.config.fail_on_step:
            raise RuntimeError(f"test failure in train step {self.steps}")
        return super().train_step(model, batch)
