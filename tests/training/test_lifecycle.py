"""A week-long run's life: retention, resume from the newest checkpoint, requeue with `--resume auto`
after SIGKILL, one owner per run directory, a full disk, and the errors of a bad launch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from noether.core.checkpoint_store import CheckpointStore
from noether.core.providers.path import PathProvider
from noether.training.run import train
from tests.conftest import cli_command, cli_env, run_cli, tiny_config
from tests.support.checkpoints import checkpoint_path
from tests.support.fork_server import ForkServer

CHECKPOINT = "noether.core.callbacks.CheckpointCallback"
LATEST = {
    "kind": CHECKPOINT,
    "every_n_epochs": 2,
    "save_weights": False,
    "save_optim": False,
    "save_latest_weights": True,
    "save_latest_optim": True,
}


def retained_tree(output_path: Path, **overrides: Any) -> dict[str, Any]:
    """5 epochs of 4 updates; a periodic set every epoch of which the newest 2 stay, `latest` every 2 epochs."""
    return tiny_config(
        output_path,
        max_epochs=5,
        effective_batch_size=256,
        callbacks=[
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
            {
                "kind": "noether.core.callbacks.EmaCallback",
                "every_n_epochs": 1,
                "target_factors": [0.9],
                "save_latest_weights": False,
            },
            {"kind": CHECKPOINT, "every_n_epochs": 1, "keep_last_n": 2},
            LATEST,
        ],
        **overrides,
    )


def last_state(paths: PathProvider) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path(paths, "classifier", "last", "model"), weights_only=True)["state_dict"]


def assert_same_end(actual: PathProvider, expected: PathProvider) -> None:
    """Same final weights, optimizer state, EMA and metrics."""
    for part, ema in (("model", None), ("optim", None), ("model", 0.9)):
        a = torch.load(checkpoint_path(actual, "classifier", "last", part, ema), weights_only=True)["state_dict"]
        e = torch.load(checkpoint_path(expected, "classifier", "last", part, ema), weights_only=True)["state_dict"]
        assert repr(a.keys()) == repr(e.keys())
        for key in e:
            if isinstance(e[key], torch.Tensor):
                assert torch.equal(a[key], e[key]), (part, ema, key)
    assert actual.metrics_file.read_text() == expected.metrics_file.read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> PathProvider:
    return train(retained_tree(tmp_path_factory.mktemp("reference")))


def tags(paths: PathProvider) -> list[str]:
    return [info.tag for info in CheckpointStore(paths.checkpoint_dir, paths.run_id).tags()]


# --------------------------------------------------------------------------------- retention
def test_keep_last_n_keeps_the_newest_periodic_sets_whole(reference):
    assert tags(reference) == ["E4_U16_S4096", "latest", "E5_U20_S5120", "last"]
    files = sorted(path.name for path in reference.checkpoint_dir.iterdir() if not path.name.startswith("."))
    for tag in ("E4_U16_S4096", "E5_U20_S5120", "last"):
        for name in (
            "classifier_cp={}_model.th",
            "classifier_cp={}_optim.th",
            "classifier_cp={}_trainer.th",
            "classifier_ema=0.9_cp={}_model.th",
        ):
            assert name.format(tag) in files
    assert not any("E3_U12" in name or "E1_U4" in name for name in files)
    assert "and keep ~" in reference.log_file.read_text()  # the start-up estimate accounts for retention


def test_a_run_resumed_from_the_older_kept_set_ends_as_the_uninterrupted_run(reference, tmp_path):
    resumed = PathProvider(tmp_path, "run")
    shutil.copytree(reference.run_dir, resumed.run_dir)
    train(retained_tree(tmp_path), resume="run", checkpoint="E4_U16_S4096")
    assert_same_end(resumed, reference)
    assert tags(resumed) == ["E4_U16_S4096", "latest", "E5_U20_S5120", "last"]


def test_latest_written_as_a_second_name_of_its_periodic_set_resumes_after_that_set_was_pruned(reference, tmp_path):
    tree = retained_tree(tmp_path)
    tree["trainer"]["callbacks"][2]["keep_last_n"] = 1
    paths = train(tree)
    assert tags(paths) == ["latest", "E5_U20_S5120", "last"]  # `latest` of E4: its periodic set is gone
    assert CheckpointStore(paths.checkpoint_dir, "run").info("latest").resumable

    train(tree, resume="run", checkpoint="latest")

    assert_same_end(paths, reference)


# --------------------------------------------------------------------------------- resume newest
def test_resume_without_a_tag_takes_the_newest_complete_checkpoint_an_interrupt(reference, tmp_path, write_config):
    signalling = {"kind": "tests.support.interrupting.SignalSelfCallback", "at_update": 14, "signal_name": "SIGTERM"}
    tree = retained_tree(tmp_path)
    tree["trainer"]["callbacks"].append(signalling)
    config = write_config(tree)
    run_cli("noether-train", str(config), cwd=tmp_path)
    paths = PathProvider(tmp_path, "run")
    assert CheckpointStore(paths.checkpoint_dir, "run").info("latest").iteration.update == 8

    result = run_cli("noether-train", str(write_config(retained_tree(tmp_path))), "--resume", "run", cwd=tmp_path)

    assert "resuming from the newest complete checkpoint 'E3_U14_S3584.signal_interrupt'" in result.stdout
    assert_same_end(paths, reference)


def test_overrides_may_follow_the_resume_options(reference, tmp_path, write_config):
    shutil.copytree(reference.run_dir, tmp_path / "run")
    config = write_config(retained_tree(tmp_path))
    run_cli("noether-train", str(config), "--resume", "run", "--checkpoint", "last", "trainer.max_epochs=6", cwd=tmp_path)
    assert CheckpointStore(tmp_path / "run" / "checkpoints", "run").info("last").iteration.epoch == 6


# --------------------------------------------------------------------------------- requeue
def newest_logged_update(metrics_file: Path) -> int:
    """The update of the newest whole line of metrics.jsonl; 0 when there is none."""
    with contextlib.suppress(FileNotFoundError):
        for line in reversed(metrics_file.read_text().splitlines()):
            with contextlib.suppress(ValueError):
                return json.loads(line)["update"]
    return 0


def file_digests(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones included) by relative path: its SHA-256; folders as 'folder'."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        for path in sorted(directory.rglob("*"))
    }


# when each killed launch is killed: once its own metrics line of that update is written (or, "resumed", once it has
# loaded its checkpoint, before its first update), then after a random delay shorter than the update that follows
KILLS = [1, 3, 6, "resumed", 11, 16]
SLOW_UPDATE_SECONDS = 0.1


def test_resume_auto_after_sigkills_mid_run_ends_as_a_run_never_stopped(tmp_path):
    """The same command relaunched after each SIGKILL, as a requeued cluster job would. Each kill waits for the
    launch to get somewhere (a metrics line of a new update, or its checkpoint loaded) instead of a fixed time, so
    on any machine every killed launch dies mid-run; the first lands before any checkpoint exists."""
    tree = retained_tree(tmp_path, log_every_n_updates=1)
    tree["trainer"]["callbacks"].append({"kind": "tests.support.callbacks.SlowUpdates", "seconds": SLOW_UPDATE_SECONDS})
    paths = PathProvider(tmp_path, "run")
    store = CheckpointStore(paths.checkpoint_dir, "run")
    output = tmp_path / "processes.log"
    delays = random.Random(1)
    server = ForkServer(output)

    def launch() -> tuple[int, int]:
        offset = output.stat().st_size if output.exists() else 0
        return server.start(tree, resume="auto"), offset

    def said(offset: int) -> str:
        return output.read_bytes()[offset:].decode(errors="replace")

    def got_to(target: int | None, offset: int) -> bool:
        """The launch logged update `target`; None: it loaded its checkpoint."""
        return "resumed from checkpoint" in said(offset) if target is None else newest_logged_update(paths.metrics_file) >= target

    try:
        reached = 0
        for number, moment in enumerate(KILLS, 1):
            pid, offset = launch()
            target = None if moment == "resumed" else max(moment, reached + 1)  # an update it logs itself
            deadline = time.monotonic() + 120
            while not got_to(target, offset):
                alive = Path(f"/proc/{pid}").exists() and time.monotonic() < deadline
                assert alive, f"launch {number} ended or timed out before it got to {moment!r}:\n{said(offset)[-3000:]}"
                time.sleep(0.002)
            time.sleep(delays.uniform(0.0, 0.8 * SLOW_UPDATE_SECONDS))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pytest.fail(f"launch {number} ended ({server.ended()}) before its kill at {moment!r}:\n{said(offset)[-3000:]}")
            assert server.ended() == -signal.SIGKILL, f"launch {number} was not ended by the kill:\n{said(offset)[-3000:]}"
            assert not store.info("last").resumable, f"launch {number} had finished the run before its kill"
            assert "nothing left to do" not in said(offset)
            if number == 1:
                assert store.newest_resumable() is None, "the first kill was meant to land before the first checkpoint"
            if number > 3:  # the third reached update 6: the set of update 4 is on disk since
                assert "resuming from the newest complete checkpoint" in said(offset), f"launch {number} was no requeue"
            reached = newest_logged_update(paths.metrics_file)

        pid, offset = launch()
        assert server.ended() == 0, said(offset)[-3000:]
        assert "resuming from the newest complete checkpoint" in said(offset)  # the launch that finishes is a requeue too
        assert store.info("last").resumable

        before = file_digests(paths.run_dir)
        log_before = paths.log_file.read_text()
        pid, offset = launch()  # a relaunch of the finished job changes nothing
        assert server.ended() == 0, said(offset)[-3000:]
        after = file_digests(paths.run_dir)
        log_after = paths.log_file.read_text()

        server.start({**tree, "run_id": "reference"}, resume=None)  # with the same threads as the killed ones
        assert server.ended() == 0, server.log_tail()
    finally:
        server.close()

    # every file as it was, byte for byte; but `.lock` names its newest holder (the relaunch's process) and log.txt
    # gets the relaunch's own lines appended, which say it had nothing to do
    for exempt in (".lock", "log.txt"):
        del before[exempt], after[exempt]
    assert after == before
    assert log_after.startswith(log_before)
    appended = log_after[len(log_before) :].splitlines()
    assert "run run has finished (checkpoint 'last' at E5_U20_S5120): nothing left to do" in appended[-1], appended

    assert_same_end(paths, PathProvider(tmp_path, "reference"))
    # (`latest` may be older than in the reference: a kill between the commits of two sets of one step
    # leaves the second to the next time it is due)
    assert set(tags(paths)) == {"E4_U16_S4096", "latest", "E5_U20_S5120", "last"}


def test_resume_auto_needs_a_run_id(tmp_path, write_config):
    tree = retained_tree(tmp_path)
    del tree["run_id"]
    result = run_cli("noether-train", str(write_config(tree)), "--resume", "auto", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "noether-train: error: --resume auto needs the run's id: add run_id=ID, the same in every launch of the job"
    )


# --------------------------------------------------------------------------------- ownership
def test_a_second_process_on_a_live_run_is_refused_at_once(tmp_path, write_config):
    ready = tmp_path / "ready"
    waiting = {"kind": "tests.support.interrupting.WaitForStopCallback", "at_update": 2, "ready_file": str(ready)}
    tree = retained_tree(tmp_path)
    tree["trainer"]["callbacks"].append(waiting)
    first = subprocess.Popen(
        [cli_command("noether-train"), str(write_config(tree))],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        config = write_config(retained_tree(tmp_path), "second.yaml")
        for extra in ([], ["--resume", "run"], ["--resume", "auto"]):
            result = run_cli("noether-train", str(config), *extra, cwd=tmp_path, check=False)
            assert result.returncode == 2, result.stderr
            [line] = result.stderr.strip().splitlines()
            assert line.startswith("noether-train: error: run 'run' (") and f"is in use by process {first.pid} on " in line, line
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
    assert (tmp_path / "run" / "log.txt").read_text().count("training classifier") == 1  # the others never started


# --------------------------------------------------------------------------------- bad launches
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, write_config):
    (tmp_path / "taken").write_text("")
    result = run_cli("noether-train", str(write_config(retained_tree(tmp_path / "taken"))), cwd=tmp_path, check=False)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"noether-train: error: output_path: cannot create the run directory {tmp_path / 'taken' / 'run'}: Not a directory"
    )


def test_resume_with_max_epochs_below_the_checkpoint_is_refused(reference, tmp_path, write_config):
    shutil.copytree(reference.run_dir, tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    result = run_cli(
        "noether-train",
        str(write_config(retained_tree(tmp_path))),
        "--resume",
        "run",
        "trainer.max_epochs=3",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert (
        "checkpoint 'E5_U20_S5120' was written at E5_U20_S5120, past the end of training (trainer.max_epochs=3): nothing left to train"
        in line
    )
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


# --------------------------------------------------------------------------------- disk full
def mount_tmpfs(mount_point: Path, size: str) -> None:
    """A tmpfs of `size` at `mount_point`, or a failed test saying why: tests and CI run as root, and a file-size
    limit instead of a full disk would test another error (EFBIG) than the one a full disk gives (ENOSPC)."""
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs for the full-disk test (run the tests as root): {mounted.stderr.strip()}")
    if mount_point.stat().st_dev == mount_point.parent.stat().st_dev:
        pytest.fail(f"`{' '.join(command)}` succeeded but mounted nothing at {mount_point}")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB filesystem (tmpfs)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mount_tmpfs(mount_point, "3m")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_keeps_every_checkpoint_whole_and_the_run_resumes_after_space_is_freed(small_disk, tmp_path, write_config):
    tree = tiny_config(
        small_disk,
        max_epochs=None,
        max_updates=16,
        effective_batch_size=64,
        log_every_n_updates=2,
        callbacks=[
            {"kind": CHECKPOINT, "every_n_updates": 2, "save_latest_weights": True, "save_latest_optim": True},
        ],
    )
    tree["model"].update(hidden_dim=192, depth=2)  # ~0.5 MB of weights and AdamW state a set
    config = write_config(tree)

    result = run_cli("noether-train", str(config), cwd=tmp_path, check=False)

    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("noether-train: error: could not write checkpoint ") and "No space left on device" in line, line
    assert "the checkpoint the run can resume from: '" in line
    log = (small_disk / "run" / "log.txt").read_text()
    if "saving its checkpoint failed too" in log:  # the error set did not fit either: never said to be saved
        assert "; saved checkpoint '" not in log, log
    store = CheckpointStore(small_disk / "run" / "checkpoints", "run")
    assert store.staged_leftovers() == []
    for info in store.tags():
        for path in info.files.values():
            torch.load(path, weights_only=True)
        assert info.resumable, info.tag

    # free space: the same filesystem, grown
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    run_cli("noether-train", str(config), "--resume", "run", cwd=tmp_path)
    reference = train({**tree, "output_path": str(tmp_path / "reference")})
    resumed, expected = last_state(PathProvider(small_disk, "run")), last_state(reference)
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[key], expected[key]) for key in expected)
    assert (small_disk / "run" / "metrics.jsonl").read_text() == reference.metrics_file.read_text()
