"""The writer's durability barrier for sets of files, its CRC-free files, and how it frees replaced files."""

import contextlib
import os
import re
import stat
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from noether.core import storage
from noether.core.storage import make_durable, sync_directory
from noether.core.writers.checkpoint_writer import CheckpointWriteError, CheckpointWriter, load_checkpoint
from noether.training.run import train
from tests.conftest import tiny_config


def payload(seed: int, size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "state_dict": {"weight": torch.randn(size, size, generator=generator), "bias": torch.randn(size, generator=generator)},
        "checkpoint_tag": f"tag{seed}",
    }


def hidden_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def bad_crc_member(path: Path) -> str | None:
    """The first zip member whose stored CRC32 does not match its bytes (None: all match)."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


@pytest.mark.parametrize("use_syncfs", [True, False])
def test_a_set_staged_without_fsync_is_made_durable_at_once_and_moved_into_place(tmp_path, monkeypatch, use_syncfs):
    if not use_syncfs:
        monkeypatch.setattr(storage, "_syncfs", None)  # the per-file fsync path of other platforms
    elif storage._syncfs is None:
        pytest.skip("no syncfs on this platform")
    final = {tmp_path / f"cp=latest_{kind}.th": payload(seed) for seed, kind in enumerate(["model", "optim", "trainer"])}
    staged = {path: path.with_name(f".{path.name}.staged") for path in final}
    syncfs_calls, fsynced = [], []
    real_syncfs, real_fsync = storage._syncfs, os.fsync
    if real_syncfs is not None:
        monkeypatch.setattr(storage, "_syncfs", lambda fd: syncfs_calls.append(fd) or real_syncfs(fd))
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(os.fstat(fd).st_ino), real_fsync(fd))[1])
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
    # the barrier really ran: one syncfs for the whole set, or else one fsync per file (and no other fsync of a file)
    files = sorted(path.stat().st_ino for path in final)
    if use_syncfs:
        assert len(syncfs_calls) == 1
        assert [ino for ino in fsynced if ino in files] == []
    else:
        assert syncfs_calls == []
        assert sorted(ino for ino in fsynced if ino in files) == files


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
        with pytest.raises(CheckpointWriteError, match="never_written"):
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


# --------------------------------------------------------------------------------- one barrier per set, in a real run
STAGED_NAME = re.compile(r"^\.(?P<final>.+)~(?P<set_id>[0-9a-f]+-\d+)\.staged$")


class DurabilitySpy:
    """Records, in order, the real calls a run makes: each durability barrier (`make_durable`, as the
    checkpoint store calls it) with the files it covers, each rename, each hard link and each fsync of
    a file (not a directory) outside a barrier. Every call still does what it did."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple] = []
        self._inside_barrier = threading.local()
        real_make_durable, real_replace, real_link, real_fsync = storage.make_durable, os.replace, os.link, os.fsync

        def make_durable(paths: list[Path]) -> None:
            self.events.append(("barrier", [Path(path) for path in paths]))
            self._inside_barrier.active = True
            try:
                real_make_durable(paths)
            finally:
                self._inside_barrier.active = False

        def replace(source, target, *args, **kwargs) -> None:
            real_replace(source, target, *args, **kwargs)
            self.events.append(("rename", Path(source), Path(target)))

        def link(source, target, *args, **kwargs) -> None:
            real_link(source, target, *args, **kwargs)
            self.events.append(("link", Path(source), Path(target)))

        def fsync(fd: int) -> None:
            if not getattr(self._inside_barrier, "active", False) and stat.S_ISREG(os.fstat(fd).st_mode):
                with contextlib.suppress(OSError):
                    self.events.append(("fsync outside a barrier", Path(os.readlink(f"/proc/self/fd/{fd}"))))
            real_fsync(fd)

        monkeypatch.setattr(storage, "make_durable", make_durable)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "fsync", fsync)


def set_of(path: Path) -> str | None:
    match = STAGED_NAME.match(path.name)
    return None if match is None else match["set_id"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file an fsync is for")
@pytest.mark.parametrize("async_checkpoints", [True, False])
def test_a_run_makes_each_checkpoint_set_durable_with_one_barrier_before_its_first_rename(
    tmp_path, monkeypatch, async_checkpoints
):
    """Periodic sets (every 4 updates) with `latest` linked to them, EMA weights, best weights (every 3
    updates, some at a periodic step, so linked) and `last`: a set's files written by the writer are
    made durable by exactly one barrier, which covers all of them and comes before any of the set's
    files takes its final name; a set made only of links to durable files needs none."""
    tree = tiny_config(
        tmp_path,
        callbacks=[
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_updates": 3, "dataset_key": "val"},
            {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_updates": 3, "metric_key": "loss/val/total"},
            {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9]},
            {
                "kind": "noether.core.callbacks.CheckpointCallback",
                "every_n_updates": 4,
                "save_latest_weights": True,
                "save_latest_optim": True,
            },
        ],
    )
    spy = DurabilitySpy(monkeypatch)
    paths = train({**tree, "async_checkpoints": async_checkpoints})
    events = spy.events  # renames and links of other files too: only the store stages files as `.{name}~{set id}.staged`
    assert {path.parent for event in events if event[0] == "barrier" for path in event[1]} == {paths.checkpoint_dir.absolute()}

    # no file of a checkpoint, staged or in its writer's temporary file, is made durable on its own
    assert [
        event for event in events if event[0] == "fsync outside a barrier" and event[1].parent == paths.checkpoint_dir.absolute()
    ] == []
    linked = {event[2].name for event in events if event[0] == "link" and set_of(event[2])}
    # the commit renames: a staged file onto the final name it was staged for
    commits: dict[str, list[int]] = {}
    staged_files: dict[str, set[str]] = {}
    for index, event in enumerate(events):
        if event[0] == "rename" and (set_id := set_of(event[1])) is not None:
            assert event[2].name == STAGED_NAME.match(event[1].name)["final"], event
            commits.setdefault(set_id, []).append(index)
            staged_files.setdefault(set_id, set()).add(event[1].name)
    barriers: dict[str, list[tuple[int, set[str]]]] = {}
    for index, event in enumerate(events):
        if event[0] == "barrier" and event[1]:
            owners = {set_of(path) for path in event[1]}
            assert len(owners) == 1 and None not in owners, f"a barrier over other files than one staged set: {event[1]}"
            barriers.setdefault(owners.pop(), []).append((index, {path.name for path in event[1]}))

    assert len(commits) >= 10, commits  # the run committed many sets: the checks below are not vacuous
    link_only = [set_id for set_id, names in staged_files.items() if names <= linked]
    assert link_only, "no set made only of links (latest, a best at a periodic step)"
    for set_id, rename_indices in commits.items():
        written = staged_files[set_id] - linked
        set_barriers = barriers.get(set_id, [])
        if not written:
            assert set_barriers == [], f"set {set_id} holds only links, yet had a barrier"
            continue
        assert len(set_barriers) == 1, f"set {set_id} ({sorted(staged_files[set_id])}): {len(set_barriers)} barriers"
        [(barrier_index, covered)] = set_barriers
        assert covered == written, f"set {set_id}: the barrier covered {sorted(covered)}, written were {sorted(written)}"
        assert barrier_index < min(rename_indices), f"set {set_id}: a file took its final name before the barrier"
    assert set(barriers) <= set(commits)  # no barrier for a set that was never committed
