"""Test-only models: a CompositeModel with a frozen submodel, on the digits data of the bundled example."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from noether.core.config import by_kind
from noether.core.models import CompositeModel, Model, ModelBaseConfig
from noether.core.models.base import build_model


class LinearBlockConfig(ModelBaseConfig):
    in_dim: PositiveInt
    out_dim: PositiveInt
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: bool = True


class LinearBlock(Model):
    """Linear layer, then GELU and dropout (dropout draws from the global RNG, which a resume must restore)."""

    def __init__(self, model_config: LinearBlockConfig) -> None:
        super().__init__(model_config)
        self.linear = nn.Linear(model_config.in_dim, model_config.out_dim)
        self.dropout = nn.Dropout(model_config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.dropout(F.gelu(x)) if self.config.activation else x


class DigitsCompositeConfig(ModelBaseConfig):
    embed: by_kind(ModelBaseConfig)
    encoder: by_kind(ModelBaseConfig)
    head: by_kind(ModelBaseConfig)


class DigitsComposite(CompositeModel):
    """embed -> encoder -> head; checkpointed as `{name}.embed`, `{name}.encoder`, `{name}.head`."""

    def __init__(self, model_config: DigitsCompositeConfig) -> None:
        super().__init__(model_config)
        self.embed = build_model(model_config.embed)
        self.encoder = build_model(model_config.encoder)
        self.head = build_model(model_config.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def composite_model_config(name: str = "composite") -> dict[str, Any]:
    """A config tree for `model:`: frozen embed (64 -> 32), trainable encoder with dropout and head."""
    optimizer = {"kind": "torch.optim.AdamW", "lr": 0.002, "schedule": {"warmup_fraction": 0.1, "decay": "cosine"}}
    block = "tests.support.models.LinearBlock"
    return {
        "kind": "tests.support.models.DigitsComposite",
        "name": name,
        "embed": {"kind": block, "in_dim": 64, "out_dim": 32, "is_frozen": True},
        "encoder": {"kind": block, "in_dim": 32, "out_dim": 32, "dropout": 0.1, "optimizer": optimizer},
        "head": {"kind": block, "in_dim": 32, "out_dim": 10, "activation": False, "optimizer": optimizer},
    }
