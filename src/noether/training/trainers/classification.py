"""A trainer for classifiers: cross-entropy between `model(batch[input_key])` and `batch[target_key]`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from noether.training.trainers.base import BaseTrainer, BaseTrainerConfig


class ClassificationTrainerConfig(BaseTrainerConfig):
    input_key: str = "x"
    target_key: str = "y"


class ClassificationTrainer(BaseTrainer):
    config: ClassificationTrainerConfig

    def train_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch[self.config.input_key])
        return {"total": F.cross_entropy(logits.float(), batch[self.config.target_key])}

    def evaluation_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"total": self.cross_entropy_per_sample(model, batch)}

    def cross_entropy_per_sample(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch[self.config.input_key])
        return F.cross_entropy(logits.float(), batch[self.config.target_key], reduction="none")
