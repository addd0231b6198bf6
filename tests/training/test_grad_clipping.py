"""trainer.max_grad_norm clips the total gradient norm before each optimizer step and logs `grad_norm`."""

from __future__ import annotations

import json

import torch

from noether.core.providers.path import PathProvider
from noether.core.writers.log_writer import LogWriter
from noether.training.run import build_trainer, parse_run_config, train
from tests.conftest import tiny_config

CHECKPOINT = {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1}
LR, MAX_NORM, UPDATES = 0.5, 1e-3, 9


def sgd_tree(tmp_path, **trainer):
    tree = tiny_config(tmp_path, max_epochs=1, callbacks=[CHECKPOINT], **trainer)
    tree["model"]["optimizer"] = {"kind": "torch.optim.SGD", "lr": LR}
    return tree


def initial_weights(tmp_path, tree) -> dict[str, torch.Tensor]:
    """The weights a run of `tree` starts from: its trainer built the same way, before any update."""
    log_writer = LogWriter(tmp_path / "metrics.jsonl", tmp_path / "summary.json")
    trainer = build_trainer(parse_run_config(tree), PathProvider(tmp_path, "initial"), log_writer)
    return {key: value.clone() for key, value in trainer.context.model.state_dict().items()}


def distance_travelled(paths, initial) -> float:
    end = torch.load(paths.checkpoint_dir / "classifier_cp=E1_U9_S1152_model.th", weights_only=True)["state_dict"]
    return sum((end[key] - initial[key]).float().pow(2).sum() for key in initial).sqrt().item()


def test_each_update_moves_the_weights_by_at_most_lr_times_max_grad_norm(tmp_path):
    clipped_tree = sgd_tree(tmp_path / "clipped", max_grad_norm=MAX_NORM)
    initial = initial_weights(tmp_path, clipped_tree)
    clipped, free = train(clipped_tree), train(sgd_tree(tmp_path / "free"))
    bound = UPDATES * LR * MAX_NORM  # plain SGD: each step is lr times the clipped gradient
    assert 0 < distance_travelled(clipped, initial) <= bound * (1 + 1e-4)
    assert distance_travelled(free, initial) > 10 * bound
    rows = [json.loads(line) for line in clipped.metrics_file.read_text().splitlines()]
    assert rows[-1]["grad_norm"] > MAX_NORM  # the norm the gradients had before clipping
    assert "grad_norm" not in free.metrics_file.read_text()
