"""A point in training, counted in epochs, optimizer updates and samples."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, order=True)
class TrainingIteration:
    epoch: int = 0
    update: int = 0
    sample: int = 0

    def __str__(self) -> str:
        return f"E{self.epoch}_U{self.update}_S{self.sample}"

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> TrainingIteration:
        return cls(epoch=int(values["epoch"]), update=int(values["update"]), sample=int(values["sample"]))
