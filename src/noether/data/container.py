"""The run's datasets by key (`train`, `val`, `test`, ...)."""

from __future__ import annotations

from torch.utils.data import Dataset


class UnknownDatasetKeyError(LookupError):
    """A dataset key that the run's config does not define."""


class DataContainer:
    """The datasets of a run; callbacks and the trainer look them up by key."""

    def __init__(self, datasets: dict[str, Dataset]) -> None:
        self.datasets = datasets

    def get(self, key: str) -> Dataset:
        try:
            return self.datasets[key]
        except KeyError:
            raise UnknownDatasetKeyError(f"unknown dataset key '{key}'; known keys: {', '.join(sorted(self.datasets))}") from None
