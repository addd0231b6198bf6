"""noether-eval: a checkpoint loaded into the model reproduces what the run logged at that step."""

from __future__ import annotations

import json

import pytest

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

    result = run_cli("noether-eval", str(config), "--run", str(paths.run_dir), "--checkpoint", "E5_U1_S1", cwd=tmp_path, check=False)

    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"noether-eval: error: no checkpoint 'E5_U1_S1' in {paths.checkpoint_dir}; its checkpoints: E1_U9_S1152, ")
