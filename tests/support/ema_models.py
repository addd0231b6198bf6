"""A test composite model for the EMA tests, named in configs as `kind: tests.support.ema_models.EncoderDecoder`.

Two trained submodels with optimizers of their own: `encoder` (with BatchNorm, so it has buffers the EMA copies
instead of averaging) and `decoder`; the trainer's step runs both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from noether.core.models import CompositeModel, Model, ModelBaseConfig
from noether.training.trainers.classification import ClassificationTrainer, ClassificationTrainerConfig


class EncoderConfig(ModelBaseConfig):
    hidden_dim: PositiveInt = 16


class Encoder(Model):
    """64 pixels to `hidden_dim` features."""

    def __init__(self, model_config: EncoderConfig) -> None:
        super().__init__(model_config)
        self.layers = nn.Sequential(nn.Linear(64, model_config.hidden_dim), nn.BatchNorm1d(model_config.hidden_dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DecoderConfig(ModelBaseConfig):
    hidden_dim: PositiveInt = 16


class Decoder(Model):
    """`hidden_dim` features to 10 class logits."""

    def __init__(self, model_config: DecoderConfig) -> None:
        super().__init__(model_config)
        self.head = nn.Linear(model_config.hidden_dim, 10)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class EncoderDecoderConfig(ModelBaseConfig):
    encoder: EncoderConfig
    decoder: DecoderConfig


class EncoderDecoder(CompositeModel):
    def __init__(self, model_config: EncoderDecoderConfig) -> None:
        super().__init__(model_config)
        self.encoder = Encoder(model_config.encoder)
        self.decoder = Decoder(model_config.decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class EncoderDecoderTrainerConfig(ClassificationTrainerConfig):
    pass


class EncoderDecoderTrainer(ClassificationTrainer):
    """Cross-entropy of the decoder's logits on the encoder's features: both submodels get gradients."""

    def train_step(self, model: EncoderDecoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = model.encoder(batch[self.config.input_key])
        logits = model.decoder(features)
        return {"total": F.cross_entropy(logits, batch[self.config.target_key])}
