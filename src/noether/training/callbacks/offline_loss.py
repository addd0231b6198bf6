"""Loss of the current model over a whole dataset: `loss/{dataset_key}/{term}`."""

from __future__ import annotations

import re
from typing import Any

import torch

from noether.core.callbacks.periodic import (
    IntervalType,
    PeriodicDataIteratorCallback,
    PeriodicDataIteratorCallbackConfig,
)
from noether.core.utils.training.counter import UpdateCounter


class OfflineLossCallbackConfig(PeriodicDataIteratorCallbackConfig):
    output_patterns_to_log: list[str] | None = None
    """Regular expressions; when set, of the loss terms besides `total` only those matching one of them are logged."""


class OfflineLossCallback(PeriodicDataIteratorCallback):
    config: OfflineLossCallbackConfig

    def logged_metric_prefixes(self) -> list[str]:
        return [f"loss/{self.dataset_key}/"]

    def process_data(self, batch: Any, *, trainer_model: Any) -> dict[str, torch.Tensor]:
        trainer = self.context.trainer
        batch = trainer.move_to_device(batch)
        with trainer.autocast():
            losses = trainer.evaluation_step(trainer_model, batch)
        size = _batch_size(batch)
        # one entry per sample, so that the mean over the dataset weights every sample equally; a batch
        # mean stands for each of its samples, which is exact unless distributed padding is in the batch
        return {term: value.detach().float().expand(size) for term, value in losses.items()}

    def process_results(
        self, results: dict[str, torch.Tensor], *, interval_type: IntervalType, update_counter: UpdateCounter
    ) -> None:
        patterns = self.config.output_patterns_to_log
        for term, per_sample in results.items():
            # `total` is what best-checkpoint and early-stopping callbacks read, so it is always logged
            if term == "total" or patterns is None or any(re.search(pattern, term) for pattern in patterns):
                self.context.log_writer.add_scalar(f"loss/{self.dataset_key}/{term}", per_sample.mean())


def _batch_size(batch: Any) -> int:
    """Samples in a batch: a tensor, or a dict/list/tuple of tensors that share the batch dimension."""
    while not isinstance(batch, torch.Tensor):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(batch)
