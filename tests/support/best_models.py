"""A composite model for the best-checkpoint tests: `kind: tests.support.best_models.EncoderWithFrozenHead`."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from noether.core.models import CompositeModel, Model, ModelBaseConfig


class LinearModelConfig(ModelBaseConfig):
    in_dim: PositiveInt
    out_dim: PositiveInt


class LinearModel(Model):
    def __init__(self, model_config: LinearModelConfig) -> None:
        super().__init__(model_config)
        self.linear = nn.Linear(model_config.in_dim, model_config.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class EncoderWithFrozenHeadConfig(ModelBaseConfig):
    hidden_dim: PositiveInt = 16


class EncoderWithFrozenHead(CompositeModel):
    """Digits classifier of a trained `encoder` (the composite's optimizer) and a frozen `head`."""

    def __init__(self, model_config: EncoderWithFrozenHeadConfig) -> None:
        super().__init__(model_config)
        hidden_dim = model_config.hidden_dim
        self.encoder = LinearModel(
            LinearModelConfig(name="encoder", in_dim=64, out_dim=hidden_dim, optimizer=model_config.optimizer)
        )
        self.head = LinearModel(LinearModelConfig(name="head", in_dim=hidden_dim, out_dim=10, is_frozen=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))
