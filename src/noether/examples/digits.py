"""The bundled example: classify scikit-learn's 8x8 digit images (shipped with scikit-learn, no download)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from sklearn.datasets import load_digits
from torch import nn

from noether.core.config import Seed
from noether.core.models import Model, ModelBaseConfig
from noether.data import DatasetBase, DatasetBaseConfig


class DigitsDatasetConfig(DatasetBaseConfig):
    split: Literal["train", "val", "test"]
    split_seed: Seed = 0
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)


class DigitsDataset(DatasetBase):
    """1797 images split into train/val/test by a fixed seed; pixels scaled to [0, 1]."""

    def __init__(self, dataset_config: DigitsDatasetConfig) -> None:
        super().__init__(dataset_config)
        images, labels = load_digits(return_X_y=True)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(dataset_config.split_seed))
        test_size = int(len(labels) * dataset_config.test_fraction)
        val_size = int(len(labels) * dataset_config.val_fraction)
        bounds = {"test": (0, test_size), "val": (test_size, test_size + val_size), "train": (test_size + val_size, len(labels))}
        start, end = bounds[dataset_config.split]
        chosen = order[start:end]
        self.x = torch.as_tensor(images, dtype=torch.float32)[chosen] / 16.0
        self.y = torch.as_tensor(labels, dtype=torch.long)[chosen]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class DigitsClassifierConfig(ModelBaseConfig):
    hidden_dim: PositiveInt = 128
    depth: PositiveInt = 2
    dropout: float = Field(0.1, ge=0, lt=1)


class DigitsClassifier(Model):
    """An MLP from 64 pixels to 10 classes."""

    def __init__(self, model_config: DigitsClassifierConfig) -> None:
        super().__init__(model_config)
        layers: list[nn.Module] = []
        width = 64
        for _ in range(model_config.depth):
            layers += [nn.Linear(width, model_config.hidden_dim), nn.GELU(), nn.Dropout(model_config.dropout)]
            width = model_config.hidden_dim
        layers.append(nn.Linear(width, 10))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
