"""A week-long run's life: retention, resume from the newest checkpoint, requeue with `--resume auto`
after SIGKILL, one owner per run directory, a full disk, and the errors of a bad launch."""

from __future__ import annotations

import contextlib
import os
import random
import resource
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
LATEST = {"kind": CHECKPOINT, "every_n_epochs": 2, "save_weights": False, "save_optim": False, "save_latest_weights": True, "save_latest_optim": True}


def retained_tree(output_path: Path, **overrides: Any) -> dict[str, Any]:
    """5 epochs of 4 updates; a periodic set every epoch of which the newest 2 stay, `latest` every 2 epochs."""
    return tiny_config(
        output_path,
        max_epochs=5,
        effective_batch_size=256,
        callbacks=[
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
            {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9], "save_latest_weights": False},
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
        for name in ("classifier_cp={}_model.th", "classifier_cp={}_optim.th", "classifier_cp={}_trainer.th", "classifier_ema=0.9_cp={}_model.th"):
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
def test_resume_auto_after_sigkills_at_random_moments_ends_as_a_run_never_stopped(tmp_path):
    """The same command relaunched after each kill, as a requeued cluster job would; the first kills land
    before any checkpoint exists."""
    tree = retained_tree(tmp_path)
    tree["trainer"]["callbacks"].append({"kind": "tests.support.callbacks.SlowUpdates", "seconds": 0.05})  # ~1 s of training
    moments = random.Random(1)
    server = ForkServer(tmp_path / "processes.log")
    try:
        for _ in range(8):
            pid = server.start(tree, resume="auto")
            time.sleep(moments.uniform(0.0, 1.0))
            with contextlib.suppress(ProcessLookupError):  # it may have finished a short remainder
                os.kill(pid, signal.SIGKILL)
            server.ended()
        server.start(tree, resume="auto")
        assert server.ended() == 0, server.log_tail()
        server.start(tree, resume="auto")  # a relaunch of the finished job changes nothing
        assert server.ended() == 0, server.log_tail()
        server.start({**tree, "run_id": "reference"}, resume=None)  # with the same threads as the killed ones
        assert server.ended() == 0, server.log_tail()
    finally:
        server.close()
    paths = PathProvider(tmp_path, "run")
    assert_same_end(paths, PathProvider(tmp_path, "reference"))
    # (`latest` may be older than in the reference: a kill between the commits of two sets of one step
    # leaves the second to the next time it is due)
    assert set(tags(paths)) == {"E4_U16_S4096", "latest", "E5_U20_S5120", "last"}


def test_resume_auto_needs_a_run_id(tmp_path, write_config):
    tree = retained_tree(tmp_path)
    del tree["run_id"]
    result = run_cli("noether-train", str(write_config(tree)), "--resume", "auto", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "noether-train: error: --resume auto needs the run's id: add run_id=ID, the same in every launch of the job"


# --------------------------------------------------------------------------------- ownership
def test_a_second_process_on_a_live_run_is_refused_at_once(tmp_path, write_config):
    ready = tmp_path / "ready"
    waiting = {"kind": "tests.support.interrupting.WaitForStopCallback", "at_update": 2, "ready_file": str(ready)}
    tree = retained_tree(tmp_path)
    tree["trainer"]["callbacks"].append(waiting)
    first = subprocess.Popen([cli_command("noether-train"), str(write_config(tree))], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    assert line.startswith(f"noether-train: error: output_path: cannot create the run directory {tmp_path / 'taken' / 'run'}: Not a directory")


def test_resume_with_max_epochs_below_the_checkpoint_is_refused(reference, tmp_path, write_config):
    shutil.copytree(reference.run_dir, tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    result = run_cli("noether-train", str(write_config(retained_tree(tmp_path))), "--resume", "run", "trainer.max_epochs=3", cwd=tmp_path, check=False)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "checkpoint 'E5_U20_S5120' was written at E5_U20_S5120, past the end of training (trainer.max_epochs=3): nothing left to train" in line
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


# --------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB filesystem (tmpfs) when this process may mount one, else a 3 MB file-size limit."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True).returncode == 0
    yield mount_point, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_keeps_every_checkpoint_whole_and_the_run_resumes_after_space_is_freed(small_disk, tmp_path, write_config):
    mount_point, mounted = small_disk
    tree = tiny_config(mount_point, max_epochs=None, max_updates=16, effective_batch_size=64, log_every_n_updates=2, callbacks=[
        {"kind": CHECKPOINT, "every_n_updates": 2, "save_latest_weights": True, "save_latest_optim": True},
    ])
    tree["model"].update(hidden_dim=192, depth=2)  # ~0.5 MB of weights and AdamW state a set
    config = write_config(tree)

    limit = None if mounted else (lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))))
    result = subprocess.run([cli_command("noether-train"), str(config)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300, preexec_fn=limit)

    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    reason = "No space left on device" if mounted else "File too large"
    assert line.startswith("noether-train: error: could not write checkpoint ") and reason in line, line
    assert "the checkpoint the run can resume from: '" in line
    store = CheckpointStore(mount_point / "run" / "checkpoints", "run")
    assert store.staged_leftovers() == []
    for info in store.tags():
        for path in info.files.values():
            torch.load(path, weights_only=True)
        assert info.resumable, info.tag

    if mounted:  # free space: the same filesystem, grown
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)
        run_cli("noether-train", str(config), "--resume", "run", cwd=tmp_path)
    else:
        run_cli("noether-train", str(config), "--resume", "run", cwd=tmp_path)
    reference = train({**tree, "output_path": str(tmp_path / "reference")})
    assert all(torch.equal(a, b) for a, b in zip(last_state(PathProvider(mount_point, "run")).values(), last_state(reference).values()))
    assert (mount_point / "run" / "metrics.jsonl").read_text() == reference.metrics_file.read_text()
