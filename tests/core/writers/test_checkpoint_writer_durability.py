"""The writer's durability barrier for sets of files, its CRC-free files, and how it frees replaced files."""

import os
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from noether.core.writers import checkpoint_writer
from noether.core.writers.checkpoint_writer import CheckpointWriter, load_checkpoint, make_durable, sync_directory


def payload(seed: int, size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"state_dict": {"weight": torch.randn(size, size, generator=generator), "bias": torch.randn(size, generator=generator)},
            "checkpoint_tag": f"tag{seed}"}


def hidden_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def bad_crc_member(path: Path) -> str | None:
    """The first zip member whose stored CRC32 does not match its bytes (None: all match)."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


@pytest.mark.parametrize("use_syncfs", [True, False])
def test_a_set_staged_without_fsync_is_made_durable_at_once_and_moved_into_place(tmp_path, monkeypatch, use_syncfs):
    if not use_syncfs:
        monkeypatch.setattr(checkpoint_writer, "_syncfs", None)  # the per-file fsync path of other platforms
    elif checkpoint_writer._syncfs is None:
        pytest.skip("no syncfs on this platform")
    final = {tmp_path / f"cp=latest_{kind}.th": payload(seed) for seed, kind in enumerate(["model", "optim", "trainer"])}
    staged = {path: path.with_name(f".{path.name}.staged") for path in final}
    with CheckpointWriter() as writer:
        for path, data in final.items():
            writer.save(staged[path], data, sync_directory=False, fsync=False)

        def commit() -> None:
            make_durable(list(staged.values()))
            for path in final:
                writer.replace(staged[path], path)
            sync_directory(tmp_path)

        writer.call_after_writes(commit)
        writer.wait()
    for path, data in final.items():
        loaded = torch.load(path, weights_only=True)
        assert loaded["checkpoint_tag"] == data["checkpoint_tag"]
        assert torch.equal(loaded["state_dict"]["weight"], data["state_dict"]["weight"])
    assert hidden_files(tmp_path) == []


def test_make_durable_names_a_missing_file(tmp_path):
    present = tmp_path / "present.th"
    torch.save({"x": torch.ones(1)}, present)
    with pytest.raises(FileNotFoundError, match="missing.th"):
        make_durable([present, tmp_path / "missing.th"])


def test_a_barrier_that_fails_inside_a_commit_is_reported_and_moves_nothing(tmp_path):
    target = tmp_path / "cp=latest_model.th"
    with CheckpointWriter() as writer:
        writer.save(target, payload(0))
        writer.save(tmp_path / ".staged", payload(1), sync_directory=False, fsync=False)

        def commit() -> None:
            make_durable([tmp_path / ".staged", tmp_path / ".never_written"])
            writer.replace(tmp_path / ".staged", target)

        writer.call_after_writes(commit)
        with pytest.raises(checkpoint_writer.CheckpointWriteError, match="never_written"):
            writer.wait()
    assert load_checkpoint(target)["checkpoint_tag"] == "tag0"


@pytest.mark.parametrize("asynchronous", [True, False])
def test_checkpoint_files_skip_the_crc_but_load_with_weights_only(tmp_path, asynchronous):
    path = tmp_path / "cp=latest_model.th"
    with CheckpointWriter(asynchronous=asynchronous) as writer:
        writer.save(path, payload(0))
    assert bad_crc_member(path) is not None  # documented: zip tools report checksum errors
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["weight"], payload(0)["state_dict"]["weight"])


@pytest.mark.parametrize("asynchronous", [True, False])
def test_the_callers_own_torch_save_keeps_its_crc(tmp_path, asynchronous):
    """Skipping the CRC is the writer's own business: torch.save in the caller's thread, during and
    after the writer's saves, still writes checksums."""
    from torch.utils.serialization import config

    own_files = []
    with CheckpointWriter(asynchronous=asynchronous) as writer:
        for i in range(5):
            writer.save(tmp_path / f"cp={i}_model.th", payload(i, size=512))  # 1 MB each: the writer is busy a while
            own = tmp_path / f"mine{i}.pt"
            torch.save(payload(i), own)
            own_files.append(own)
    assert config.save.compute_crc32 is True
    for own in own_files:
        assert bad_crc_member(own) is None


def test_the_crc_setting_of_another_thread_is_untouched(tmp_path):
    """A user thread that saves while the writer writes keeps torch's default."""
    results = []

    def user_thread() -> None:
        for i in range(5):
            own = tmp_path / f"thread{i}.pt"
            torch.save(payload(i), own)
            results.append(bad_crc_member(own))

    with CheckpointWriter() as writer:
        thread = threading.Thread(target=user_thread)
        thread.start()
        for i in range(5):
            writer.save(tmp_path / f"cp={i}_model.th", payload(i, size=512))
        thread.join()
    assert results == [None] * 5


@pytest.mark.parametrize("asynchronous", [True, False])
def test_a_replaced_file_is_deleted_and_other_names_of_it_keep_the_old_contents(tmp_path, asynchronous):
    path = tmp_path / "cp=latest_model.th"
    with CheckpointWriter(asynchronous=asynchronous) as writer:
        writer.save(path, payload(0))
        writer.wait()
        os.link(path, tmp_path / "kept_by_user.th")
        for seed in (1, 2):
            writer.save(path, payload(seed))
        writer.wait()
        assert load_checkpoint(path)["checkpoint_tag"] == "tag2"
    assert hidden_files(tmp_path) == []
    assert os.stat(path).st_nlink == 1
    assert load_checkpoint(tmp_path / "kept_by_user.th")["checkpoint_tag"] == "tag0"


def test_buffer_bytes_reports_the_host_memory_of_the_snapshot_buffers(tmp_path):
    data = payload(0, size=1024)  # 4 MiB
    tensor_bytes = sum(t.numel() * t.element_size() for t in data["state_dict"].values())
    with CheckpointWriter() as writer:
        writer.save(tmp_path / "cp=latest_trainer.th", payload(1, size=64))  # small: serialized in save, no buffers
        writer.wait()
        assert writer.buffer_bytes == 0
        for _ in range(3):  # reused, not grown, by saves of the same structure
            writer.save(tmp_path / "cp=latest_model.th", data)
            writer.wait()
        assert writer.buffer_bytes == tensor_bytes
