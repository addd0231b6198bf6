"""CheckpointStore with sharded members: `.dcp` folders commit whole, replace, link, delete and
recover like files, and read back whole in one process (no process group)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointWriter

WEIGHTS, OPTIM, EMA, TRAINER = (
    Member("net", "model"),
    Member("net", "optim"),
    Member("net", "model", 0.99),
    Member("net", "trainer"),
)


def at(update: int) -> TrainingIteration:
    return TrainingIteration(epoch=update // 10, update=update, sample=update * 8)


def members(value: float) -> dict[Member, dict]:
    return {
        WEIGHTS: {"state_dict": {"w": torch.full((4,), value)}, "model_config": {"hidden": 4}},
        OPTIM: {"state_dict": {"state": {"w": {"momentum_buffer": torch.full((4,), value / 2)}}}},
        EMA: {"state_dict": {"w": torch.full((4,), -value)}},
    }


@pytest.fixture(params=[True, False], ids=["async", "sync"])
def store(request, tmp_path: Path):
    writer = CheckpointWriter(asynchronous=request.param)
    yield CheckpointStore(tmp_path, "run", writer, sharded=True)
    writer.close()


def save_set(store: CheckpointStore, tag: str, update: int, value: float) -> None:
    store.save(tag, at(update), members(value), {"note": value}, trainer_model_name="net")


def test_weights_optimizer_and_ema_are_folders_that_read_back_whole(store):
    save_set(store, "latest", 5, 2.0)
    store.wait()

    names = sorted(path.name for path in store.directory.iterdir() if path.name != ".lock")
    assert names == [
        "net_cp=latest_hashes.json",
        "net_cp=latest_model.dcp",
        "net_cp=latest_optim.dcp",
        "net_cp=latest_trainer.th",
        "net_ema=0.99_cp=latest_model.dcp",
    ]
    folder = store.path(WEIGHTS, "latest")
    assert folder.is_dir() and (folder / ".metadata").exists()
    weights = store.load(WEIGHTS, "latest")
    assert torch.equal(weights["state_dict"]["w"], torch.full((4,), 2.0))
    assert weights["model_config"] == {"hidden": 4} and weights["training_iteration"] == at(5).to_dict()
    assert torch.equal(store.load(OPTIM, "latest")["state_dict"]["state"]["w"]["momentum_buffer"], torch.full((4,), 1.0))
    [info] = store.tags()
    assert (info.tag, info.iteration, info.resumable) == ("latest", at(5), True)
    assert info.size > 0


def test_a_folder_loads_in_place_into_a_template(store):
    save_set(store, "latest", 5, 3.0)
    store.wait()
    template = {"w": torch.zeros(4)}

    payload = store.load_into(EMA, "latest", template, expected_iteration=at(5))

    assert payload["state_dict"] is template and torch.equal(template["w"], torch.full((4,), -3.0))


def test_a_newer_set_replaces_the_folders_of_a_tag(store):
    save_set(store, "latest", 5, 1.0)
    save_set(store, "latest", 7, 2.0)
    store.wait()

    assert torch.equal(store.load(WEIGHTS, "latest", expected_iteration=at(7))["state_dict"]["w"], torch.full((4,), 2.0))
    assert store.staged_leftovers() == [] and not list(store.directory.glob(".*replaced"))


def test_recover_puts_back_a_folder_moved_aside_by_a_commit_that_stopped(store):
    save_set(store, "latest", 5, 1.0)
    store.wait()
    final = store.path(WEIGHTS, "latest")
    os.replace(final, final.with_name(f".{final.name}~1a-0.replaced"))  # a commit stopped right after moving it aside

    actions = store.recover()

    assert actions == [f"restored {final.name}, whose replacement was never committed"]
    assert torch.equal(store.load(WEIGHTS, "latest")["state_dict"]["w"], torch.full((4,), 1.0))
    assert store.info("latest").resumable


def test_recover_removes_half_written_folders_and_keeps_the_committed_set(store):
    save_set(store, "latest", 5, 1.0)
    store.wait()
    half_written = store.directory / ".net_cp=latest_model.dcp~1a-3.staged"
    half_written.mkdir()
    (half_written / "__0_0.distcp").write_bytes(b"shards of rank 0, no metadata yet")

    store.recover()

    assert store.staged_leftovers() == []
    assert torch.equal(store.load(WEIGHTS, "latest")["state_dict"]["w"], torch.full((4,), 1.0))


def test_a_linked_folder_holds_the_same_files_and_deletion_removes_a_tag_whole(store):
    store.save("best", at(5), {WEIGHTS: members(4.0)[WEIGHTS]})
    store.link("best", "best.tolerance=2", [WEIGHTS])
    store.wait()

    source, link = store.path(WEIGHTS, "best"), store.path(WEIGHTS, "best.tolerance=2")
    assert link.is_dir() and sorted(p.name for p in link.iterdir()) == sorted(p.name for p in source.iterdir())
    assert all((link / p.name).stat().st_ino == p.stat().st_ino for p in source.iterdir())
    assert torch.equal(store.load(WEIGHTS, "best.tolerance=2")["state_dict"]["w"], torch.full((4,), 4.0))

    store.delete("best")
    store.wait()
    assert not source.exists() and link.is_dir()


def test_every_shard_file_has_a_content_hash_that_finds_a_changed_byte(store):
    save_set(store, "latest", 5, 2.0)
    store.wait()
    assert store.content_check("latest").changed == [] and store.content_check("latest").unhashed == []
    shard = next(path for path in (store.path(OPTIM, "latest")).iterdir() if path.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert store.content_check("latest").changed == [f"net_cp=latest_optim.dcp/{shard.name}"]
