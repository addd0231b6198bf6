"""One data loader for training batches and the evaluation passes callbacks need, in step order."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from noether.core.config import ConfigError
from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration

TRAIN_KEY = "train"


class ScheduledConsumer(Protocol):
    """A callback that consumes a full pass over a dataset whenever it is due."""

    dataset_key: str
    eval_batch_size: int

    def is_due_after_update(self, update_counter: UpdateCounter) -> bool: ...

    def is_due_after_epoch(self, update_counter: UpdateCounter) -> bool: ...


def evaluation_indices(dataset_size: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of a sequential pass, padded like DistributedSampler so ranks get equal counts."""
    per_rank = math.ceil(dataset_size / world_size)
    indices = list(range(dataset_size))
    indices += indices[: per_rank * world_size - dataset_size]
    return indices[rank::world_size]


def evaluation_batches(dataset_size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    indices = evaluation_indices(dataset_size, rank, world_size)
    return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]


@dataclass
class TrainingBatching:
    """How one update's samples are split: the global batch over ranks, each rank's share over micro-batches."""

    dataset_size: int
    effective_batch_size: int
    micro_batch_size: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.effective_batch_size % self.world_size:
            raise ConfigError(
                f"trainer.effective_batch_size: {self.effective_batch_size} does not divide over {self.world_size} processes"
            )

    @property
    def updates_per_epoch(self) -> int:
        return self.dataset_size // self.effective_batch_size

    @property
    def local_batch_size(self) -> int:
        return self.effective_batch_size // self.world_size

    @property
    def accumulation_steps(self) -> int:
        return math.ceil(self.local_batch_size / self.micro_batch_size)


class SeededBatch(list):
    """The indices of one batch into source `source` (0 is the training set, then one per consumer), and the
    seed of the random draws made while using it, derived from the run's seed and the batch's place in
    training: the batch draws the same numbers whether the run started at the beginning or resumed just
    before it."""

    def __init__(self, source: int, indices: list[int], seed: int) -> None:
        super().__init__(indices)
        self.source = source
        self.seed = seed


def draw_seed(*position: int) -> int:
    digest = hashlib.blake2b("/".join(map(str, position)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class InterleavedSampler:
    """Batch sampler yielding `SeededBatch`es: training micro-batches and, right after each
    update at which a consumer is due, that consumer's whole evaluation pass.

    The training order depends only on (seed, epoch), so it is the same with or without
    consumers and can restart at any update (resume). Consumers are listed in the order the
    trainer dispatches them; after an update, update-scheduled passes come before epoch ones.
    """

    def __init__(
        self,
        *,
        batching: TrainingBatching,
        start_iteration: TrainingIteration,
        end_iteration: TrainingIteration,
        consumers: Sequence[ScheduledConsumer] = (),
        consumer_dataset_sizes: Sequence[int] = (),
        seed: int = 0,
    ) -> None:
        self.batching = batching
        self.start_iteration = start_iteration
        self.end_iteration = end_iteration
        self.consumers = list(consumers)
        self.consumer_dataset_sizes = list(consumer_dataset_sizes)
        self.seed = seed

    def epoch_permutation(self, epoch: int) -> list[int]:
        """The epoch's order of the training samples, as a list: read into Python once, not per batch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.batching.dataset_size, generator=generator).tolist()

    def __iter__(self) -> Iterator[SeededBatch]:
        batching = self.batching
        counter = UpdateCounter(
            start_iteration=self.start_iteration,
            end_iteration=self.end_iteration,
            updates_per_epoch=batching.updates_per_epoch,
            effective_batch_size=batching.effective_batch_size,
        )
        permutation_epoch, permutation = -1, None
        while not counter.is_finished:
            epoch, update_in_epoch = divmod(counter.update, batching.updates_per_epoch)
            if epoch != permutation_epoch:
                permutation_epoch, permutation = epoch, self.epoch_permutation(epoch)
            start = update_in_epoch * batching.effective_batch_size + batching.rank * batching.local_batch_size
            local_indices = permutation[start : start + batching.local_batch_size]
            for micro_start in range(0, len(local_indices), batching.micro_batch_size):
                micro_batch = local_indices[micro_start : micro_start + batching.micro_batch_size]
                yield SeededBatch(0, micro_batch, draw_seed(self.seed, batching.rank, counter.update, 0, micro_start))
            counter.add_update()
            yield from self._evaluation_passes(counter, "is_due_after_update")
            if counter.is_full_epoch:
                yield from self._evaluation_passes(counter, "is_due_after_epoch")

    def _evaluation_passes(self, counter: UpdateCounter, due_check: str) -> Iterator[SeededBatch]:
        for source, (consumer, size) in enumerate(zip(self.consumers, self.consumer_dataset_sizes), start=1):
            if getattr(consumer, due_check)(counter):
                batches = evaluation_batches(size, consumer.eval_batch_size, self.batching.rank, self.batching.world_size)
                for number, batch in enumerate(batches):
                    seed = draw_seed(self.seed, self.batching.rank, counter.update, source, number)
                    yield SeededBatch(source, batch, seed)


class InterleavedDataset(Dataset):
    """Serves a `SeededBatch` from its source: the training set (source 0) or a consumer's dataset."""

    def __init__(self, sources: Sequence[tuple[str, Dataset]]) -> None:
        self.sources = list(sources)

    def __getitems__(self, batch: SeededBatch) -> tuple[str, list[Any]]:
        """The batch's samples as `(dataset_key, samples)`.

        Python's `random` and NumPy's global generator restart from the batch's seed in every process, so
        what the batch draws from them needs no checkpointed state; torch's generator does the same in a
        worker process and continues the global state (which checkpoints restore) in the main process.
        """
        random.seed(batch.seed)
        np.random.seed(batch.seed % 2**32)
        if get_worker_info() is not None:
            torch.manual_seed(batch.seed)
        key, dataset = self.sources[batch.source]
        if hasattr(dataset, "__getitems__"):
            return key, dataset.__getitems__(batch)
        return key, [dataset[index] for index in batch]

    def __len__(self) -> int:
        return sum(len(dataset) for _, dataset in self.sources)


def collate_tagged(batch: tuple[str, list[Any]]) -> tuple[str, Any]:
    """Collate the samples of one batch (from `InterleavedDataset.__getitems__`) into `(dataset_key, batch)`."""
    key, samples = batch
    return key, default_collate(samples)
