"""A test-only leaf model whose linear layers sit one level down (`body.0`, `body.2`, ...), so that sharding
by `trainer.shard_module_classes: [Linear]` and the default (each direct child: `body`) give different units.

Configs name it as `kind: tests.support.t3_models.LinearStack`, e.g. as a submodel of
`tests.support.models.DigitsComposite`.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from noether.core.models import Model, ModelBaseConfig


class LinearStackConfig(ModelBaseConfig):
    in_dim: PositiveInt
    out_dim: PositiveInt
    depth: PositiveInt = 2


class LinearStack(Model):
    """`depth` linear layers with GELU between them, inside one Sequential `body`."""

    def __init__(self, model_config: LinearStackConfig) -> None:
        super().__init__(model_config)
        layers: list[nn.Module] = []
        for index in range(model_config.depth):
            in_dim = model_config.in_dim if index == 0 else model_config.out_dim
            if index > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(in_dim, model_config.out_dim))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
