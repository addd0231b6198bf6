"""Test-only datasets that augment in `__getitem__` with random noise, as image augmentations do.

Configs name them as `kind: tests.support.augmenting.<Class>`.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from noether.examples.digits import DigitsDataset, DigitsDatasetConfig


class NoisyDigitsDatasetConfig(DigitsDatasetConfig):
    pass


class NoisyDigitsDataset(DigitsDataset):
    """The digits with Gaussian pixel noise drawn from the global torch generator at every access."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        return {**sample, "x": sample["x"] + 0.1 * torch.randn_like(sample["x"])}


class NumpyNoisyDigitsDatasetConfig(DigitsDatasetConfig):
    pass


class NumpyNoisyDigitsDataset(DigitsDataset):
    """The digits with noise drawn from NumPy's and Python's global generators, as NumPy-based augmentations do."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        noise = torch.from_numpy(np.random.normal(0.0, 0.1, size=sample["x"].shape).astype(np.float32))
        return {**sample, "x": sample["x"] * random.uniform(0.9, 1.1) + noise}
