"""A test-only dataset that augments in `__getitem__` with random noise, as image augmentations do.

Configs name it as `kind: tests.support.augmenting.NoisyDigitsDataset`.
"""

from __future__ import annotations

import torch

from noether.examples.digits import DigitsDataset, DigitsDatasetConfig


class NoisyDigitsDatasetConfig(DigitsDatasetConfig):
    pass


class NoisyDigitsDataset(DigitsDataset):
    """The digits with Gaussian pixel noise drawn from the global torch generator at every access."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        return {**sample, "x": sample["x"] + 0.1 * torch.randn_like(sample["x"])}
