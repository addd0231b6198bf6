"""A training set with one poisoned sample: its pixels are NaN, so the update that draws it has a NaN loss
(once per epoch). Configs name it as `kind: tests.support.nonfinite.NanDigitsDataset`."""

from __future__ import annotations

from pydantic import NonNegativeInt

from noether.examples.digits import DigitsDataset, DigitsDatasetConfig


class NanDigitsDatasetConfig(DigitsDatasetConfig):
    nan_index: NonNegativeInt = 0


class NanDigitsDataset(DigitsDataset):
    def __init__(self, dataset_config: NanDigitsDatasetConfig) -> None:
        super().__init__(dataset_config)
        self.x[dataset_config.nan_index] = float("nan")
