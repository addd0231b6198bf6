"""The shared loader: training batches with the evaluation passes of periodic callbacks interleaved at the steps they fire."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from noether.core.utils.training.iteration import TrainingIteration
from noether.data.samplers import InterleavedDataset, InterleavedSampler, TrainingBatching, collate_tagged, evaluation_batches
from noether.training.callbacks import OfflineLossCallback, OfflineLossCallbackConfig
from noether.training.run import train
from tests.conftest import tiny_config
from tests.support.data_callbacks import TRAINING_BATCHES_FILE

TRAIN_SOURCE = 0


def consumer(dataset_key: str, batch_size: int, **schedule: int) -> OfflineLossCallback:
    """A real iterating callback; the sampler only reads its dataset key, batch size and schedule."""
    config = OfflineLossCallbackConfig(dataset_key=dataset_key, batch_size=batch_size, **schedule)
    return OfflineLossCallback(config, context=None)


def make_sampler(
    consumers: Sequence[OfflineLossCallback] = (),
    consumer_sizes: Sequence[int] = (),
    *,
    train_size: int = 20,
    effective_batch_size: int = 4,
    micro_batch_size: int | None = None,
    epochs: int = 3,
    start: TrainingIteration | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> InterleavedSampler:
    batching = TrainingBatching(
        dataset_size=train_size,
        effective_batch_size=effective_batch_size,
        micro_batch_size=micro_batch_size or effective_batch_size // world_size,
        world_size=world_size,
        rank=rank,
    )
    return InterleavedSampler(
        batching=batching,
        start_iteration=start or TrainingIteration(),
        end_iteration=TrainingIteration(epoch=epochs),
        consumers=consumers,
        consumer_dataset_sizes=consumer_sizes,
        seed=3,
    )


def stream(sampler: InterleavedSampler) -> list[tuple[int, list[list[int]]]]:
    """The sampler's output as events: (0, [micro-batch]) per training micro-batch, (source, batches) per evaluation pass."""
    events: list[tuple[int, list[list[int]]]] = []
    for batch in sampler:
        source, indices = batch.source, list(batch)
        if source != TRAIN_SOURCE and events and events[-1][0] == source:
            events[-1][1].append(indices)
        else:
            events.append((source, [indices]))
    return events


def training_batches(sampler: InterleavedSampler) -> list[list[int]]:
    return [batches[0] for source, batches in stream(sampler) if source == TRAIN_SOURCE]


@pytest.mark.parametrize(
    ("dataset_size", "expected_batch_sizes"),
    [(12, [4, 4, 4]), (10, [4, 4, 2]), (3, [3])],
    ids=["divides", "remainder", "smaller"],
)
def test_an_evaluation_pass_sees_every_sample_once_in_order(dataset_size: int, expected_batch_sizes: list[int]) -> None:
    sampler = make_sampler([consumer("val", batch_size=4, every_n_epochs=1)], [dataset_size])
    passes = [batches for source, batches in stream(sampler) if source != TRAIN_SOURCE]
    assert len(passes) == 3  # one per epoch
    for batches in passes:
        assert [len(batch) for batch in batches] == expected_batch_sizes
        assert [index for batch in batches for index in batch] == list(range(dataset_size))


def test_passes_follow_exactly_the_updates_at_which_their_callbacks_fire() -> None:
    every_3_updates = consumer("val", batch_size=4, every_n_updates=3)  # 6 samples: 2 batches
    every_epoch = consumer("test", batch_size=5, every_n_epochs=1)  # 5 samples: 1 batch
    events = stream(make_sampler([every_3_updates, every_epoch], [6, 5]))

    expected = []
    for update in range(1, 16):  # 20 samples / 4 = 5 updates per epoch, 3 epochs
        expected.append((TRAIN_SOURCE, 1))
        if update % 3 == 0:
            expected.append((1, 2))
        if update % 5 == 0:  # after an epoch's last update, epoch passes come after update passes
            expected.append((2, 1))
    assert [(source, len(batches)) for source, batches in events] == expected


def test_evaluation_passes_do_not_change_the_training_batches() -> None:
    consumers = [consumer("val", batch_size=4, every_n_updates=1), consumer("test", batch_size=3, every_n_epochs=1)]
    # effective batch 8 in micro-batches of 3, 3 and 2
    with_passes = training_batches(make_sampler(consumers, [7, 5], train_size=21, effective_batch_size=8, micro_batch_size=3))
    without = training_batches(make_sampler(train_size=21, effective_batch_size=8, micro_batch_size=3))

    assert with_passes == without
    assert [len(batch) for batch in without[:3]] == [3, 3, 2]
    first_epoch = [index for batch in without[:6] for index in batch]  # 2 updates of 8 (5 samples dropped)
    assert len(set(first_epoch)) == 16 and set(first_epoch) <= set(range(21))


def test_a_sampler_started_mid_training_continues_the_same_stream() -> None:
    def consumers() -> list[OfflineLossCallback]:
        return [consumer("val", batch_size=4, every_n_updates=2), consumer("test", batch_size=4, every_n_epochs=1)]

    full = stream(make_sampler(consumers(), [6, 5]))
    resumed = stream(make_sampler(consumers(), [6, 5], start=TrainingIteration(epoch=1, update=7, sample=28)))

    training_positions = [position for position, (source, _) in enumerate(full) if source == TRAIN_SOURCE]
    assert resumed == full[training_positions[7] :]


def test_ranks_split_each_global_batch_and_each_evaluation_pass() -> None:
    single = training_batches(make_sampler(train_size=24, effective_batch_size=8))
    ranks = [training_batches(make_sampler(train_size=24, effective_batch_size=8, rank=rank, world_size=2)) for rank in (0, 1)]
    for update, global_batch in enumerate(single):
        assert len(ranks[0][update]) == len(ranks[1][update]) == 4
        assert sorted(ranks[0][update] + ranks[1][update]) == sorted(global_batch)

    shares = [[index for batch in evaluation_batches(7, 2, rank, 2) for index in batch] for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4  # equal counts: one sample is repeated as padding
    assert set(shares[0] + shares[1]) == set(range(7))


class NumberedDataset(Dataset):
    """Items that say which dataset and index they came from."""

    def __init__(self, size: int, offset: int) -> None:
        self.size, self.offset = size, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"id": torch.tensor(self.offset + index)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_loader_serves_training_and_evaluation_batches(num_workers: int) -> None:
    sampler = make_sampler([consumer("val", batch_size=4, every_n_epochs=1)], [6], epochs=2)
    dataset = InterleavedDataset([("train", NumberedDataset(20, offset=0)), ("val", NumberedDataset(6, offset=1000))])
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_tagged, num_workers=num_workers)

    served = [(key, batch["id"].tolist()) for key, batch in loader]

    expected = []
    for batch in sampler:
        key = "train" if batch.source == TRAIN_SOURCE else "val"
        expected.append((key, [index + (1000 if key == "val" else 0) for index in batch]))
    assert served == expected
    assert [ids for key, ids in served if key == "val"] == [[1000, 1001, 1002, 1003], [1004, 1005]] * 2


# ----------------------------------------------------------------------------- real runs


def evaluating_callbacks() -> list[dict[str, Any]]:
    """Iterating callbacks on the shared loader (top level and a parent's children) and on a loader of their own."""
    return [
        {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_updates": 4, "dataset_key": "val", "batch_size": 50},
        {"kind": "noether.training.callbacks.AccuracyCallback", "every_n_epochs": 1, "dataset_key": "test"},
        {
            "kind": "tests.support.data_callbacks.ForwardingParentCallback",
            "every_n_epochs": 1,
            "eval_callbacks": [
                {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_updates": 3, "dataset_key": "test"}
            ],
        },
        {
            "kind": "tests.support.data_callbacks.EventParentCallback",
            "every_n_epochs": 1,
            "eval_callbacks": [
                {"kind": "noether.training.callbacks.AccuracyCallback", "every_n_epochs": 1, "dataset_key": "val"}
            ],
        },
    ]


def save_last_weights() -> dict[str, Any]:
    """A checkpoint callback: at the end of training it writes the `last` weights."""
    return {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 2, "save_optim": False}


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "classifier_cp=last_model.th", weights_only=True)["state_dict"]


def metric_records(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_evaluation_callbacks_do_not_change_what_training_sees(tmp_path: Path) -> None:
    trainer = {"kind": "tests.support.data_callbacks.RecordingClassificationTrainer"}
    plain = train(tiny_config(tmp_path / "plain", **trainer, callbacks=[save_last_weights()]))
    evaluated = train(tiny_config(tmp_path / "evaluated", **trainer, callbacks=[*evaluating_callbacks(), save_last_weights()]))

    plain_batches = torch.load(plain.run_dir / TRAINING_BATCHES_FILE, weights_only=True)
    evaluated_batches = torch.load(evaluated.run_dir / TRAINING_BATCHES_FILE, weights_only=True)
    assert len(plain_batches) == len(evaluated_batches) == 18  # 1259 samples // 128 = 9 updates, 2 epochs
    for plain_batch, evaluated_batch in zip(plain_batches, evaluated_batches):
        assert torch.equal(plain_batch["x"], evaluated_batch["x"]) and torch.equal(plain_batch["y"], evaluated_batch["y"])
    # the evaluations ran, yet the weights (dropout draws included) are those of the run without them
    assert "event/accuracy/val" in metric_records(evaluated.run_dir)[-1]
    plain_weights, evaluated_weights = last_weights(plain.run_dir), last_weights(evaluated.run_dir)
    assert all(torch.equal(plain_weights[name], evaluated_weights[name]) for name in plain_weights)


def test_worker_processes_give_the_same_run_as_the_main_process(tmp_path: Path) -> None:
    callbacks = [*evaluating_callbacks(), save_last_weights()]
    in_main = train(tiny_config(tmp_path / "workers0", num_workers=0, callbacks=callbacks))
    in_workers = train(tiny_config(tmp_path / "workers2", num_workers=2, callbacks=callbacks))

    records = metric_records(in_main.run_dir)
    assert {"loss/val/total", "accuracy/test", "parent/loss/test/total", "event/accuracy/val"} <= set().union(*records)
    assert metric_records(in_workers.run_dir) == records
    main_weights, worker_weights = last_weights(in_main.run_dir), last_weights(in_workers.run_dir)
    assert all(torch.equal(main_weights[name], worker_weights[name]) for name in main_weights)
