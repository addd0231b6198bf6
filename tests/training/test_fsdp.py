"""Sharded training (trainer.parallelism: fsdp): two-process CPU runs (gloo) against one process,
sharded checkpoints on disk, resume with the same and another number of processes, a job killed
while writing, evaluation in one process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.providers.path import PathProvider
from noether.core.writers.checkpoint_writer import CheckpointLoadError
from noether.training.run import train
from tests.conftest import run_cli
from tests.training.test_distributed import (
    RUN_TIMEOUT_SECONDS,
    TOLERANCE,
    distributable_tree,
    run_torchrun,
    torchrun,
    torchrun_command,
    torchrun_env,
    write_yaml,
)

RESUMED_TAG = "E1_U9_S1152"


def sharded_tree(output_path: Path, *extra_callbacks: dict[str, Any]) -> dict[str, Any]:
    tree = distributable_tree(output_path, *extra_callbacks)
    tree["trainer"]["parallelism"] = "fsdp"
    return tree


def weights(paths: PathProvider, tag: str = "last", ema_factor: float | None = None) -> dict[str, torch.Tensor]:
    """A sharded member read whole in this process (no process group)."""
    return CheckpointStore(paths.checkpoint_dir, paths.run_id).load(Member("classifier", "model", ema_factor), tag)["state_dict"]


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=TOLERANCE, msg=key)


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> PathProvider:
    directory = tmp_path_factory.mktemp("two")
    result = run_torchrun(write_yaml(sharded_tree(directory), directory / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    return PathProvider(directory, "run")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> PathProvider:
    directory = tmp_path_factory.mktemp("one")
    return train(sharded_tree(directory))


def copy_run(paths: PathProvider, output_path: Path) -> PathProvider:
    shutil.copytree(paths.run_dir, output_path / paths.run_id)
    return PathProvider(output_path, paths.run_id)


def test_two_processes_train_like_one_and_write_every_checkpoint_sharded(two_processes, one_process):
    assert_close(weights(two_processes), weights(one_process))
    assert_close(weights(two_processes, ema_factor=0.9), weights(one_process, ema_factor=0.9))
    names = {path.name for path in two_processes.checkpoint_dir.iterdir()}
    for name in (
        f"classifier_cp={RESUMED_TAG}_model.dcp",
        f"classifier_cp={RESUMED_TAG}_optim.dcp",
        f"classifier_ema=0.9_cp={RESUMED_TAG}_model.dcp",
        "classifier_cp=latest_optim.dcp",
        "classifier_cp=best_model.loss.val.total_model.dcp",
        "classifier_cp=best_model.loss.val.total.tolerance=0_model.dcp",
    ):
        folder = two_processes.checkpoint_dir / name
        assert {path.name for path in folder.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "noether.th"}, name
    assert f"classifier_cp={RESUMED_TAG}_trainer.th" in names
    assert not [name for name in names if name.startswith(".") and name != ".lock"]


def test_a_run_of_two_processes_resumes_with_one(two_processes, one_process, tmp_path):
    copy_run(two_processes, tmp_path)

    resumed = train(sharded_tree(tmp_path), resume="run", checkpoint=RESUMED_TAG)

    assert_close(weights(resumed), weights(one_process))
    assert_close(weights(resumed, ema_factor=0.9), weights(one_process, ema_factor=0.9))


def test_a_run_of_one_process_resumes_with_two(two_processes, one_process, tmp_path):
    paths = copy_run(one_process, tmp_path)

    result = run_torchrun(
        write_yaml(sharded_tree(tmp_path), tmp_path / "config.yaml"), "--resume", "run", "--checkpoint", RESUMED_TAG
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert_close(weights(paths), weights(two_processes))


def test_sigterm_inside_an_epoch_resumes_with_two_processes_exactly(two_processes, tmp_path):
    ready_file = tmp_path / "update-5-done"
    waiting = {"kind": "tests.support.distributed.WaitForSignalOnAnyRankCallback", "at_update": 5, "ready_file": str(ready_file)}
    config = write_yaml(sharded_tree(tmp_path, waiting), tmp_path / "config.yaml")
    with torchrun(config) as process:
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while not all(Path(f"{ready_file}.{rank}").exists() for rank in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    paths = PathProvider(tmp_path, "run")
    tag = "E0_U5_S640.signal_interrupt"
    assert (paths.checkpoint_dir / f"classifier_cp={tag}_optim.dcp").is_dir()

    resumed = run_torchrun(config, "--resume", "run", "--checkpoint", tag)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_identical(weights(paths), weights(two_processes))
    assert_identical(weights(paths, ema_factor=0.9), weights(two_processes, ema_factor=0.9))


def kill_job(torchrun_pid: int, timeout: float = 60.0) -> None:
    """SIGKILLs torchrun and every process under it at once, as a node failure would, and waits until all
    have exited. Killing torchrun's process group is not enough: torchrun starts each worker in a session
    of its own, and a worker left running keeps writing while the test recovers the directory."""
    job = [*_descendants(torchrun_pid), torchrun_pid]
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in job):
        assert time.monotonic() < deadline, f"processes of the job still running {timeout} s after SIGKILL"
        time.sleep(0.01)


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat_fields(int(entry))) is not None:
            parents[int(entry)] = int(stat[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has exited; a process killed inside a disk write finishes it first)."""
    stat = _stat_fields(pid)
    return stat is not None and stat[0] != "Z"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/{pid}/stat after the command name: state, parent pid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def test_a_job_killed_while_writing_shards_leaves_every_folder_loadable_and_resumes_exactly(two_processes, tmp_path):
    """Killed (SIGKILL, every process) while a sharded folder is staged, after the first complete set: every folder
    loads, and `--resume` ends as the uninterrupted run of the same config, bit for bit."""
    config = write_yaml(sharded_tree(tmp_path), tmp_path / "config.yaml")
    paths = PathProvider(tmp_path, "run")
    checkpoints = paths.checkpoint_dir
    first_set_done = checkpoints / f"classifier_cp={RESUMED_TAG}_trainer.th"  # a set's trainer state is committed last
    process = subprocess.Popen(
        torchrun_command(config),
        cwd=tmp_path,
        env=torchrun_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while not first_set_done.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        while not list(checkpoints.glob(".*.dcp~*.staged")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.002)
        caught_writing = [path.name for path in checkpoints.glob(".*.dcp~*.staged")]
    finally:
        kill_job(process.pid)
        process.wait(timeout=60)
    assert first_set_done.exists() and caught_writing, "the job ended or timed out before a sharded write after its first set"
    assert process.returncode == -signal.SIGKILL, process.returncode  # torchrun itself was killed, not finished

    store = CheckpointStore(checkpoints, "run")
    store.recover()
    assert store.staged_leftovers() == []
    for folder in checkpoints.glob("*.dcp"):
        member, tag = Member.parse(folder.name)
        assert "state_dict" in store.load(member, tag)
    assert store.newest_resumable() is not None, caught_writing

    resumed = run_torchrun(config, "--resume", "run")

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from the newest complete checkpoint" in resumed.stdout
    assert_identical(weights(paths), weights(two_processes))
    assert_identical(weights(paths, ema_factor=0.9), weights(two_processes, ema_factor=0.9))
    assert paths.metrics_file.read_text() == two_processes.metrics_file.read_text()


def test_a_sharded_checkpoint_is_evaluated_in_one_process(two_processes, tmp_path):
    config = write_yaml(sharded_tree(two_processes.output_path), tmp_path / "config.yaml")

    result = run_cli("noether-eval", str(config), "--run", str(two_processes.run_dir), "--checkpoint", RESUMED_TAG, cwd=tmp_path)

    logged = next(
        json.loads(line) for line in two_processes.metrics_file.read_text().splitlines() if json.loads(line)["update"] == 9
    )
    [line] = [line for line in result.stdout.splitlines() if line.startswith("loss/val/total: ")]
    assert float(line.split(": ")[1]) == pytest.approx(logged["loss/val/total"], abs=1e-5)


def test_a_changed_shard_is_named_by_verify_and_refused_by_an_explicit_resume(two_processes, tmp_path):
    paths = copy_run(two_processes, tmp_path)
    shard = sorted((paths.checkpoint_dir / f"classifier_cp={RESUMED_TAG}_model.dcp").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    verify = run_cli("noether-ckpt", "verify", str(paths.run_dir), cwd=tmp_path, check=False)
    assert verify.returncode == 1
    assert f"{shard.name}: its bytes changed since it was written (content hash differs)" in verify.stdout
    with pytest.raises(CheckpointLoadError, match=f"checkpoint '{RESUMED_TAG}' is damaged"):
        train(sharded_tree(tmp_path), resume="run", checkpoint=RESUMED_TAG)
