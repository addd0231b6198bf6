"""Datasets built from config."""

from __future__ import annotations

from torch.utils.data import Dataset

from noether.core.config import RegistryConfig


class DatasetBaseConfig(RegistryConfig):
    """Config of a dataset; subclasses add what their dataset needs (`DigitsDatasetConfig`, ...)."""


class DatasetBase(Dataset):
    """A map-style dataset whose items are dicts of tensors (collated by key)."""

    def __init__(self, dataset_config: DatasetBaseConfig) -> None:
        self.config = dataset_config

    def __len__(self) -> int:
        raise NotImplementedError
