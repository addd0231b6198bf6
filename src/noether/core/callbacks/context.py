"""The one object through which callbacks reach the run they belong to."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from noether.core.checkpoint_manager import CheckpointManager
    from noether.core.models import ModelBase
    from noether.core.providers.metric_property import MetricPropertyProvider
    from noether.core.providers.path import PathProvider
    from noether.core.writers.log_writer import LogWriter
    from noether.data.container import DataContainer


class TrainerView(Protocol):
    """What callbacks may use of the trainer that runs them (defined here, so that core does not
    depend on the training package)."""

    device: torch.device
    seed: int
    num_workers: int
    micro_batch_size: int
    callbacks: list[Any]
    """The configured callbacks (CallbackBase) in dispatch order, children not included."""
    stop_requested: str | None
    """Why the run is stopping (a signal's name), once it is."""
    grad_norm: torch.Tensor | None
    """The total gradient norm of the last update (with trainer.max_grad_norm), on the device."""

    def stop_early(self, reason: str) -> None: ...

    def evaluation_interrupted(self) -> bool:
        """Whether a signal asks to abandon the data pass under way; asked after every batch, by every rank
        together (the answer is agreed across ranks)."""
        ...

    def move_to_device(self, batch: Any) -> Any: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def evaluation_step(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...


@dataclass
class CallbackContext:
    trainer: TrainerView
    model: ModelBase
    data: DataContainer
    paths: PathProvider
    log_writer: LogWriter
    metric_properties: MetricPropertyProvider
    checkpoints: CheckpointManager
    """Where callbacks ask for checkpoint saves and read what they keep in checkpoints."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def with_log_prefix(self, prefix: str) -> CallbackContext:
        """A copy whose log writer prefixes every key, for callbacks owned by another callback."""
        copy: Any = CallbackContext(**self.__dict__)
        copy.log_writer = self.log_writer.with_prefix(prefix)
        return copy
