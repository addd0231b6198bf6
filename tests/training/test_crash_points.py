"""A run stopped right before any one of its file operations (tests/support/crash_at.py) leaves every checkpoint
that exists loadable, `noether-ckpt verify` passing (or naming an interrupted commit the next start completes),
and `--resume auto` ending exactly as the run never stopped: the same final weights, optimizer state, EMA and
metrics.jsonl.

The representative run writes periodic sets with `keep_last_n` deletions, `latest` as a second name of the
periodic set, best models with tolerance links, EMA weights and `last`. `make test` stops it at a few points;
`make crashtest` (NOETHER_CRASHTEST=all) at every one of them and prints how many held. The same promises
are checked in the states a power loss at a stop point may leave (tests/support/power_loss.py).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from noether.core.checkpoint_store import CheckpointStore, Member
from tests.conftest import REPO_ROOT, cli_env, run_cli, tiny_config
from tests.support import power_loss

SAMPLED_POINTS = 3
SAMPLED_POWER_LOSS_POINTS = 2
CALLBACKS = [
    {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
    {
        "kind": "noether.core.callbacks.BestCheckpointCallback",
        "every_n_epochs": 1,
        "metric_key": "loss/val/total",
        "tolerances": [0, 1],
    },
    {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9]},
    {
        "kind": "noether.core.callbacks.CheckpointCallback",
        "every_n_epochs": 1,
        "keep_last_n": 1,
        "save_latest_weights": True,
        "save_latest_optim": True,
    },
]
FINAL_MEMBERS = (Member("classifier", "model"), Member("classifier", "optim"), Member("classifier", "model", 0.9))


def write_config(directory: Path, sharded: bool) -> Path:
    """The representative run; `sharded`: under FSDP in one process, every set in `.dcp` folders."""
    tree = tiny_config(directory / "outputs", max_epochs=3, callbacks=CALLBACKS)
    if sharded:
        tree["trainer"]["parallelism"] = "fsdp"
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def train_stopped_at(
    config: Path, kill_at: int, count_file: Path | None = None, log_dir: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**cli_env(), "NOETHER_CRASH_ROOT": str(config.parent / "outputs" / "run"), "NOETHER_CRASH_AT": str(kill_at)}
    if count_file is not None:
        env["NOETHER_CRASH_COUNT_FILE"] = str(count_file)
    if log_dir is not None:
        env["NOETHER_CRASH_LOG"] = str(log_dir)
    command = [sys.executable, "-m", "tests.support.crash_at", str(config), "--resume", "auto"]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run, and how many file operations it makes."""

    run_dir: Path
    operations: int
    sharded: bool


@pytest.fixture(scope="module", params=["whole files", "sharded"])
def reference(request, tmp_path_factory) -> Reference:
    sharded = request.param == "sharded"
    directory = tmp_path_factory.mktemp("reference")
    config = write_config(directory, sharded)
    result = train_stopped_at(config, 0, count_file=directory / "count")
    assert result.returncode == 0, result.stderr
    return Reference(directory / "outputs" / "run", int((directory / "count").read_text()), sharded)


def problems_after_stop(reference: Reference, directory: Path, kill_at: int) -> list[str]:
    """What breaks a promise after a stop before operation `kill_at` (empty when every promise held)."""
    stopped = train_stopped_at(write_config(directory, reference.sharded), kill_at)
    if stopped.returncode != 137:
        return [f"the run was not stopped (exit {stopped.returncode}): {stopped.stderr.strip()[-300:]}"]
    return problems_of_stopped_run(reference, directory)


def problems_after_power_loss(reference: Reference, directory: Path, kill_at: int) -> dict[str, list[str]]:
    """What breaks a promise in each power-loss state of a stop before operation `kill_at`, by state."""
    (directory / "stopped").mkdir()
    stopped = train_stopped_at(write_config(directory / "stopped", reference.sharded), kill_at, log_dir=directory / "log")
    if stopped.returncode != 137:
        return {"stop": [f"the run was not stopped (exit {stopped.returncode}): {stopped.stderr.strip()[-300:]}"]}
    found = {}
    for state in power_loss.STATES:
        state_dir = directory / state
        state_dir.mkdir()
        (directory / "stopped" / "outputs").mkdir(exist_ok=True)
        # cp -a keeps the hard links between tags: a file's lost bytes are lost under each of its names
        subprocess.run(["cp", "-a", str(directory / "stopped" / "outputs"), str(state_dir)], check=True)
        write_config(state_dir, reference.sharded)
        power_loss.build(state, state_dir / "outputs" / "run", directory / "log")
        problems = problems_of_stopped_run(reference, state_dir)
        if problems:
            found[state] = problems
    return found


def problems_of_stopped_run(reference: Reference, directory: Path) -> list[str]:
    """Every checkpoint loads, verify passes (or names an interrupted commit), `--resume auto` of the run in
    `directory` ends as the uninterrupted run did: what of it does not hold."""
    config, run_dir = directory / "config.yaml", directory / "outputs" / "run"
    problems = []
    for path in sorted(run_dir.glob("checkpoints/*.th")):
        try:
            torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - each unloadable file is one finding
            problems.append(f"{path.name} does not load: {error}")
    if run_dir.joinpath("config.yaml").exists():
        verify = run_cli("noether-ckpt", "verify", str(run_dir), cwd=directory, check=False)
        if verify.returncode not in (0, 3):
            problems.append(f"verify exit {verify.returncode}: {(verify.stdout + verify.stderr).strip()[-1500:]}")
    resumed = run_cli("noether-train", str(config), "--resume", "auto", cwd=directory, check=False)
    if resumed.returncode != 0:
        return [*problems, f"--resume auto failed ({resumed.returncode}): {resumed.stderr.strip()[-300:]}"]
    for member in FINAL_MEMBERS:
        expected = CheckpointStore(reference.run_dir / "checkpoints", "run").load(member, "last")["state_dict"]
        actual = CheckpointStore(run_dir / "checkpoints", "run").load(member, "last")["state_dict"]
        if repr(actual) != repr(expected):
            problems.append(f"{member} of 'last' differs from the uninterrupted run's")
    if (run_dir / "metrics.jsonl").read_text() != (reference.run_dir / "metrics.jsonl").read_text():
        problems.append("metrics.jsonl differs from the uninterrupted run's")
    return problems


def points(count: int, sampled: int = SAMPLED_POINTS, seed: int = 0) -> list[int]:
    if os.environ.get("NOETHER_CRASHTEST") == "all":
        return list(range(1, count + 1))
    return sorted(random.Random(count + seed).sample(range(1, count + 1), sampled))


def test_a_stop_before_any_file_operation_resumes_exactly(reference, tmp_path):
    count = reference.operations
    assert count > 50  # the run did count its operations
    failures = {}
    chosen = points(count)
    for kill_at in chosen:
        directory = tmp_path / f"stop{kill_at}"
        directory.mkdir()
        problems = problems_after_stop(reference, directory, kill_at)
        if problems:
            failures[kill_at] = problems
        shutil.rmtree(directory)
    kind = "sharded" if reference.sharded else "whole-file"
    print(f"\n{len(chosen) - len(failures)} of {len(chosen)} stop points held ({count} file operations in the {kind} run)")
    assert not failures, "\n".join(f"stop before operation {k}: {'; '.join(p)}" for k, p in failures.items())


def test_a_power_loss_before_any_file_operation_resumes_exactly(reference, tmp_path):
    """The same promises in the states a power loss may leave at a stop point (tests/support/power_loss.py):
    data not yet made durable lost, and also every name operation not yet made durable undone."""
    failures = {}
    chosen = points(reference.operations, SAMPLED_POWER_LOSS_POINTS, seed=1)
    for kill_at in chosen:
        directory = tmp_path / f"power-loss{kill_at}"
        directory.mkdir()
        for state, problems in problems_after_power_loss(reference, directory, kill_at).items():
            failures[f"{kill_at} ({state})"] = problems
        shutil.rmtree(directory)
    checked = len(chosen) * len(power_loss.STATES)
    kind = "sharded" if reference.sharded else "whole-file"
    print(f"\n{checked - len(failures)} of {checked} power-loss states held ({len(chosen)} stop points of the {kind} run)")
    assert not failures, "\n".join(f"power loss before operation {k}: {'; '.join(p)}" for k, p in failures.items())
