"""Classification accuracy of the current model over a whole dataset: `accuracy/{dataset_key}`."""

from __future__ import annotations

from typing import Any

import torch

from noether.core.callbacks.periodic import (
    IntervalType,
    PeriodicDataIteratorCallback,
    PeriodicDataIteratorCallbackConfig,
)
from noether.core.utils.training.counter import UpdateCounter


class AccuracyCallbackConfig(PeriodicDataIteratorCallbackConfig):
    input_key: str = "x"
    target_key: str = "y"


class AccuracyCallback(PeriodicDataIteratorCallback):
    config: AccuracyCallbackConfig

    def logged_metric_prefixes(self) -> list[str]:
        return [f"accuracy/{self.dataset_key}"]

    def process_data(self, batch: dict[str, torch.Tensor], *, trainer_model: Any) -> torch.Tensor:
        trainer = self.context.trainer
        batch = trainer.move_to_device(batch)
        with trainer.autocast():
            logits = trainer_model(batch[self.config.input_key])
        return (logits.argmax(dim=-1) == batch[self.config.target_key]).float()

    def process_results(self, results: torch.Tensor, *, interval_type: IntervalType, update_counter: UpdateCounter) -> None:
        self.context.log_writer.add_scalar(f"accuracy/{self.dataset_key}", results.mean())
