"""noether-eval: a checkpoint loaded into the model reproduces what the run logged at that step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from noether.core.checkpoint_store import CheckpointStore
from noether.core.providers.path import PathProvider
from noether.training.run import train
from tests.conftest import run_cli, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, PathProvider]:
    tree = tiny_config(
        tmp_path_factory.mktemp("eval"),
        callbacks=[
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
            {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_optim": False},
        ],
    )
    return tree, train(tree)


def test_eval_reproduces_the_validation_loss_logged_at_the_checkpoints_step(trained, write_config, tmp_path):
    tree, paths = trained
    config = write_config(tree)

    result = run_cli("noether-eval", str(config), "--run", str(paths.run_dir), "--checkpoint", "E1_U9_S1152", cwd=tmp_path)

    logged = next(json.loads(line) for line in paths.metrics_file.read_text().splitlines() if json.loads(line)["update"] == 9)
    assert f"loss/val/total: {logged['loss/val/total']}" in result.stdout.splitlines()
    [record] = [json.loads(line) for line in (paths.run_dir / "eval" / "E1_U9_S1152.jsonl").read_text().splitlines()]
    assert record == {"epoch": 1, "update": 9, "sample": 1152, "loss/val/total": logged["loss/val/total"]}


def test_eval_of_an_unknown_checkpoint_fails_in_one_line(trained, write_config, tmp_path):
    tree, paths = trained
    config = write_config(tree)

    result = run_cli(
        "noether-eval", str(config), "--run", str(paths.run_dir), "--checkpoint", "E5_U1_S1", cwd=tmp_path, check=False
    )

    assert result.returncode == 2  # the CLI's exit code for bad input
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"noether-eval: error: no checkpoint 'E5_U1_S1' in {paths.checkpoint_dir}; its checkpoints: E1_U9_S1152, "
    )


def test_eval_finishes_a_crashed_runs_staged_set_and_works_on_a_read_only_run(trained, write_config, tmp_path):
    tree, paths = trained
    copy = tmp_path / "copy"
    shutil.copytree(paths.run_dir, copy)
    store = CheckpointStore(copy / "checkpoints", "run")
    # a crash in the middle of committing E1: its weights moved into place, its trainer state still staged
    trainer = next(path for member, path in store.info("E1_U9_S1152").files.items() if member.part == "trainer")
    trainer.rename(trainer.with_name(f".{trainer.name}~abc-1.staged"))
    config = write_config(tree)

    run_cli("noether-eval", str(config), "--run", str(copy), "--checkpoint", "E1_U9_S1152", cwd=tmp_path)
    assert store.staged_leftovers() == [] and store.info("E1_U9_S1152").complete  # weights only: complete, not resumable

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mount_read_only(copy, read_only)
    try:
        result = run_cli("noether-eval", str(config), "--run", str(read_only), "--checkpoint", "E2_U18_S2304", cwd=tmp_path)
    finally:
        subprocess.run(["umount", str(read_only)], check=False)
    assert "is read-only: evaluation results are printed, not saved" in result.stdout
    assert any(line.startswith("loss/val/total: ") for line in result.stdout.splitlines())
    assert not (copy / "eval" / "E2_U18_S2304.jsonl").exists()


def mount_read_only(source: Path, target: Path) -> None:
    """`source` seen read-only at `target` (a bind mount, remounted read-only), or a failed test saying why: tests
    and CI run as root, and a directory without write permission is no read-only run for root."""
    for command in (["mount", "--bind", str(source), str(target)], ["mount", "-o", "remount,bind,ro", str(target)]):
        mounted = subprocess.run(command, capture_output=True, text=True)
        if mounted.returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True, check=False)
            why = f"{' '.join(command)}: {mounted.stderr.strip()}"
            pytest.fail(f"cannot mount a read-only view of a run (run the tests as root): {why}")
    if os.access(target, os.W_OK):
        subprocess.run(["umount", str(target)], check=False)
        pytest.fail(f"{target} was mounted read-only but is writable")
