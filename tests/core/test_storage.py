"""The storage contract, held by the local filesystem and by the in-memory storage alike: the store's
transactions (and the fast tests that run them in memory) rely on nothing more."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.run_lock import RunInUseError
from noether.core.storage import LocalStorage, MemoryStorage, Storage
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError, CheckpointWriter

FILES_IN_A_LARGE_FOLDER = 5000  # long enough to remove that a reader sees the removal under way


@pytest.fixture(params=["memory", "local"])
def storage(request) -> Storage:
    return MemoryStorage() if request.param == "memory" else LocalStorage()


@pytest.fixture
def folder(storage: Storage, tmp_path: Path) -> str:
    path = str(tmp_path / "run")
    storage.make_folder(path)
    return path


def write(storage: Storage, path: str, data: bytes, *, durable: bool = True) -> str | None:
    return storage.write(path, lambda file: file.write(data), durable=durable, sync_folder=durable)


def read(storage: Storage, path: str) -> bytes:
    with storage.open_read(path) as file:
        return file.read()


def test_a_write_replaces_a_file_whole_and_can_keep_its_old_bytes(storage, folder):
    path = f"{folder}/a.th"
    write(storage, path, b"first")
    replaced = write(storage, path, b"second")
    assert read(storage, path) == b"second"
    if replaced is not None:  # a hidden second name of the old bytes (local), for the caller to free later
        assert read(storage, replaced) == b"first"
        storage.remove(replaced)
    assert storage.list(folder) == ["a.th"]


def test_a_failed_write_leaves_the_previous_file_and_nothing_else(storage, folder):
    path = f"{folder}/a.th"
    write(storage, path, b"first")

    def fail(file) -> None:
        file.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        storage.write(path, fail, durable=True, sync_folder=True)
    assert read(storage, path) == b"first"
    assert storage.list(folder) == ["a.th"]


def test_rename_replaces_a_file_and_returns_its_old_bytes_when_asked(storage, folder):
    write(storage, f"{folder}/.staged", b"new")
    write(storage, f"{folder}/final", b"old")
    storage.make_durable([f"{folder}/.staged"])
    replaced = storage.rename(f"{folder}/.staged", f"{folder}/final", keep_replaced=True)
    storage.sync_folder(folder)
    assert read(storage, f"{folder}/final") == b"new"
    assert not storage.exists(f"{folder}/.staged")
    if replaced is not None:
        assert read(storage, replaced) == b"old"


@pytest.mark.parametrize("size, kept", [(16 << 20, True), (4096, False)])
def test_on_disk_only_a_large_replaced_file_outlives_the_rename(tmp_path, size, kept):
    """A large replaced file keeps a hidden name, so that freeing its blocks waits for the caller; a small
    one is freed by the rename itself (its link and unlink would cost more than freeing it)."""
    storage, path = LocalStorage(), str(tmp_path / "a.th")
    write(storage, path, b"o" * size)
    write(storage, f"{path}.staged", b"new")
    replaced = storage.rename(f"{path}.staged", path, keep_replaced=True)
    rewritten = write(storage, path, b"newer")
    assert read(storage, path) == b"newer"
    if kept:
        assert read(storage, replaced) == b"o" * size and rewritten is None  # the file "new" was small
        storage.remove(replaced)
    else:
        assert replaced is None and rewritten is None
    assert sorted(os.listdir(tmp_path)) == ["a.th"]


def test_a_folder_moves_with_everything_in_it(storage, folder):
    storage.make_folder(f"{folder}/set.dcp")
    write(storage, f"{folder}/set.dcp/shard", b"x")
    storage.rename(f"{folder}/set.dcp", f"{folder}/other.dcp")
    assert storage.is_folder(f"{folder}/other.dcp") and not storage.exists(f"{folder}/set.dcp")
    assert read(storage, f"{folder}/other.dcp/shard") == b"x"


def test_a_folder_is_never_renamed_over_one_that_holds_files(storage, folder):
    for name in ("a.dcp", "b.dcp"):
        storage.make_folder(f"{folder}/{name}")
        write(storage, f"{folder}/{name}/shard", name.encode())
    with pytest.raises(OSError):
        storage.rename(f"{folder}/a.dcp", f"{folder}/b.dcp")
    assert read(storage, f"{folder}/b.dcp/shard") == b"b.dcp"


def test_a_link_is_the_same_bytes_and_outlives_its_source(storage, folder):
    write(storage, f"{folder}/a", b"bytes")
    storage.link(f"{folder}/a", f"{folder}/b")
    assert storage.same_file(f"{folder}/a", f"{folder}/b")
    storage.remove(f"{folder}/a")
    assert read(storage, f"{folder}/b") == b"bytes"
    assert not storage.same_file(f"{folder}/a", f"{folder}/b")


def test_a_folder_is_linked_file_by_file(storage, folder):
    storage.make_folder(f"{folder}/a.dcp")
    write(storage, f"{folder}/a.dcp/shard", b"x")
    storage.link(f"{folder}/a.dcp", f"{folder}/b.dcp")
    assert storage.same_file(f"{folder}/a.dcp/shard", f"{folder}/b.dcp/shard")


def test_missing_names_are_told_apart(storage, folder):
    with pytest.raises(FileNotFoundError):
        storage.open_read(f"{folder}/gone")
    with pytest.raises(FileNotFoundError):
        storage.link(f"{folder}/gone", f"{folder}/b")
    storage.remove(f"{folder}/gone")  # nothing to do
    assert storage.list(f"{folder}/no_such_folder") == []
    with pytest.raises(FileExistsError):
        storage.make_folder(folder)


def test_remove_takes_a_folder_with_everything_in_it(storage, folder):
    storage.make_folder(f"{folder}/a.dcp")
    write(storage, f"{folder}/a.dcp/shard", b"x")
    storage.remove(f"{folder}/a.dcp")
    assert storage.list(folder) == []


def test_a_held_folder_cannot_be_held_twice_until_released(storage, folder):
    lock = storage.lock(folder)
    with pytest.raises(RunInUseError):
        storage.lock(folder)
    lock.release()
    storage.lock(folder).release()


# --------------------------------------------------------------------------------- the store over memory
def test_a_store_in_memory_saves_links_lists_and_loads_a_set():
    storage = MemoryStorage()
    store = CheckpointStore(Path("/runs/a/checkpoints"), "a", CheckpointWriter(asynchronous=False, storage=storage))
    weights = {Member("net", "model"): {"state_dict": {"w": torch.arange(3.0)}}}
    iteration = TrainingIteration(1, 4, 32)
    store.save("E1_U4_S32", iteration, weights, {"files_note": 1}, trainer_model_name="net")
    store.link("E1_U4_S32", "latest", [Member("net", "model"), Member("net", "trainer")])
    assert [info.tag for info in store.tags()] == ["E1_U4_S32", "latest"]
    assert store.newest_resumable().tag == "E1_U4_S32"
    assert torch.equal(store.load(Member("net", "model"), "latest")["state_dict"]["w"], torch.arange(3.0))
    assert not any(name.startswith(".") for name in storage.list("/runs/a/checkpoints"))
    store.delete("E1_U4_S32")
    assert [info.tag for info in store.tags()] == ["latest"] and store.info("latest").resumable


def test_a_damaged_file_in_memory_is_named_like_one_on_disk():
    storage = MemoryStorage()
    storage.write(
        "/runs/a/checkpoints/net_cp=best_model.th", lambda file: file.write(b"PK\x03\x04cut"), durable=True, sync_folder=True
    )
    store = CheckpointStore(Path("/runs/a/checkpoints"), "a", storage=storage)
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt: /runs/a/checkpoints/net_cp=best_model.th"):
        store.load(Member("net", "model"), "best")


def test_sharded_sets_need_a_local_folder():
    with pytest.raises(ValueError, match="needs /runs/a/checkpoints on a local filesystem"):
        CheckpointStore(Path("/runs/a/checkpoints"), "a", storage=MemoryStorage(), sharded=True)


def test_a_changed_byte_in_memory_is_found_by_the_content_check():
    storage = MemoryStorage()
    store = CheckpointStore(Path("/runs/a/checkpoints"), "a", CheckpointWriter(asynchronous=False, storage=storage))
    store.save("best", TrainingIteration(1, 4, 32), {Member("net", "model"): {"state_dict": {"w": torch.arange(64.0)}}})
    assert store.content_check("best").changed == []
    path = "/runs/a/checkpoints/net_cp=best_model.th"
    data = bytearray(storage.files[path].data)
    data[len(data) // 2] ^= 0x01
    storage.files[path].data = bytes(data)
    assert store.content_check("best").changed == ["net_cp=best_model.th"]


def test_a_stop_while_a_folder_is_removed_never_leaves_part_of_it_under_its_name(tmp_path):
    """A sharded set's folder is hidden before its files go: a process killed during the removal leaves a
    hidden temporary folder (swept later), never the folder's name over some of its files."""
    folder = tmp_path / "classifier_cp=E1_U9_S1152_model.dcp"
    folder.mkdir()
    for number in range(FILES_IN_A_LARGE_FOLDER):
        (folder / f"{number}.distcp").write_bytes(b"x")
    remover = subprocess.Popen(
        [sys.executable, "-c", f"from noether.core.storage import LocalStorage; LocalStorage().remove({str(folder)!r})"]
    )
    try:
        while folder.exists():  # the name stands for the whole folder for as long as it exists
            with contextlib.suppress(FileNotFoundError):
                assert len(os.listdir(folder)) == FILES_IN_A_LARGE_FOLDER
        remover.kill()  # somewhere in the removal of the hidden folder, or after it
    finally:
        remover.kill()
        remover.wait()
    assert not folder.exists()
    assert all(path.name.startswith(f".{folder.name}~") and path.name.endswith(".tmp") for path in tmp_path.iterdir())
