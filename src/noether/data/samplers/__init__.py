from noether.data.samplers.interleaved import (
    InterleavedDataset,
    InterleavedSampler,
    TrainingBatching,
    collate_tagged,
    evaluation_batches,
)

__all__ = ["InterleavedDataset", "InterleavedSampler", "TrainingBatching", "collate_tagged", "evaluation_batches"]
