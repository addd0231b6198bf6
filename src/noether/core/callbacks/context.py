"""The one object through which callbacks reach the run they belong to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from noether.core.checkpoint_store import CheckpointStore
    from noether.core.models import ModelBase
    from noether.core.providers.metric_property import MetricPropertyProvider
    from noether.core.providers.path import PathProvider
    from noether.core.writers.log_writer import LogWriter
    from noether.data.container import DataContainer
    from noether.training.trainers.base import BaseTrainer


@dataclass
class CallbackContext:
    trainer: BaseTrainer
    model: ModelBase
    data: DataContainer
    paths: PathProvider
    log_writer: LogWriter
    metric_properties: MetricPropertyProvider
    checkpoints: CheckpointStore
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
