"""Callbacks that iterate a dataset: where their batches come from, and how their results are put together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from noether.core.callbacks.periodic import collate_results, gather_results
from noether.data.samplers import evaluation_batches
from noether.training.run import train
from tests.conftest import tiny_config


def offline_loss(**fields: Any) -> dict[str, Any]:
    return {"kind": "noether.training.callbacks.OfflineLossCallback", "dataset_key": "val", **fields}


def records_with(run_dir: Path, key: str) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if key in record]


# ----------------------------------------------------------------------------- children of other callbacks


def test_a_listed_child_reads_the_shared_loader_at_its_own_schedule(tmp_path: Path) -> None:
    parent = {
        "kind": "tests.support.data_callbacks.ForwardingParentCallback",
        "every_n_epochs": 1,
        "eval_callbacks": [offline_loss(every_n_updates=4)],
    }
    paths = train(tiny_config(tmp_path, callbacks=[offline_loss(every_n_updates=4), parent]))

    child_records = records_with(paths.run_dir, "parent/loss/val/total")
    assert [record["update"] for record in child_records] == [4, 8, 12, 16]  # 18 updates; the parent's epochs are 9 and 18
    # the same model on the same dataset: the same value as the top-level callback's
    assert all(record["parent/loss/val/total"] == record["loss/val/total"] for record in child_records)


def test_a_child_dispatched_on_an_event_reads_a_loader_of_its_own(tmp_path: Path) -> None:
    parent = {
        "kind": "tests.support.data_callbacks.EventParentCallback",
        "every_n_epochs": 1,
        "eval_callbacks": [offline_loss(every_n_updates=5)],
    }
    paths = train(tiny_config(tmp_path, callbacks=[offline_loss(every_n_epochs=1), parent]))

    child_records = records_with(paths.run_dir, "event/loss/val/total")
    assert [record["update"] for record in child_records] == [9, 18]  # when the parent fired; the child's schedule is ignored
    assert all(record["event/loss/val/total"] == record["loss/val/total"] for record in child_records)


def test_a_child_on_the_shared_loader_that_its_parent_does_not_list_fails_clearly(tmp_path: Path) -> None:
    parent = {
        "kind": "tests.support.data_callbacks.UnlistedChildrenParentCallback",
        "every_n_epochs": 1,
        "eval_callbacks": [offline_loss(every_n_updates=4)],
    }
    with pytest.raises(RuntimeError, match=r"expected a batch of 'val' .* but got 'train'.*get_children\(\)"):
        train(tiny_config(tmp_path, callbacks=[parent]))


def test_a_listed_child_that_its_parent_does_not_dispatch_fails_clearly(tmp_path: Path) -> None:
    parent = {
        "kind": "tests.support.data_callbacks.UndispatchedChildrenParentCallback",
        "every_n_epochs": 1,
        "eval_callbacks": [offline_loss(every_n_updates=4)],
    }
    with pytest.raises(RuntimeError, match="'val'"):
        train(tiny_config(tmp_path, callbacks=[parent]))


# ----------------------------------------------------------------------------- collating and gathering results


def test_collate_results_concatenates_batches_and_keeps_the_structure() -> None:
    per_batch = [
        {"score": torch.tensor([1.0, 2.0]), "pair": (torch.tensor([[1, 1], [2, 2]]), [torch.tensor([10, 20])])},
        {"score": torch.tensor([3.0]), "pair": (torch.tensor([[3, 3]]), [torch.tensor([30])])},
    ]
    collated = collate_results(per_batch)

    assert collated.keys() == {"score", "pair"}
    assert torch.equal(collated["score"], torch.tensor([1.0, 2.0, 3.0]))
    assert isinstance(collated["pair"], tuple) and isinstance(collated["pair"][1], list)
    assert torch.equal(collated["pair"][0], torch.tensor([[1, 1], [2, 2], [3, 3]]))
    assert torch.equal(collated["pair"][1][0], torch.tensor([10, 20, 30]))


def test_collate_results_rejects_results_without_a_batch_dimension() -> None:
    with pytest.raises(ValueError, match="one entry per sample"):
        collate_results([{"loss": torch.tensor(0.5)}, {"loss": torch.tensor(0.7)}])
    with pytest.raises(TypeError, match="not float"):
        collate_results([0.5, 0.7])


def test_gather_results_in_one_process_keeps_every_result() -> None:
    results = {"index": torch.arange(7), "pair": (torch.arange(7) * 10, [torch.ones(7, 3)])}
    gathered = gather_results(results, dataset_size=7, world_size=1)
    assert torch.equal(gathered["index"], torch.arange(7))
    assert torch.equal(gathered["pair"][0], torch.arange(7) * 10)
    assert gathered["pair"][1][0].shape == (7, 3)


def evaluate_on_rank(rank: int, world_size: int, init_file: str, dataset_size: int, out_dir: str) -> None:
    """One rank of a distributed evaluation: results of its share of the dataset, in batches of 2."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        per_batch = []
        for batch in evaluation_batches(dataset_size, 2, rank, world_size):
            indices = torch.tensor(batch)
            per_batch.append({"index": indices, "pair": (indices * 10, indices.float().unsqueeze(1).repeat(1, 3))})
        gathered = gather_results(collate_results(per_batch), dataset_size, world_size)
        torch.save(gathered, Path(out_dir) / f"rank{rank}.th")
    finally:
        dist.destroy_process_group()


def test_gather_results_over_two_processes_restores_dataset_order_without_padding(tmp_path: Path) -> None:
    dataset_size = 7  # each rank gets 4 samples: one of them is padding
    mp.spawn(evaluate_on_rank, args=(2, str(tmp_path / "init"), dataset_size, str(tmp_path)), nprocs=2)

    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"rank{rank}.th", weights_only=True)
        assert torch.equal(gathered["index"], torch.arange(dataset_size))
        assert torch.equal(gathered["pair"][0], torch.arange(dataset_size) * 10)
        assert torch.equal(gathered["pair"][1], torch.arange(dataset_size).float().unsqueeze(1).repeat(1, 3))
