"""Nothing lost at the edges of a run's life: retention between two checkpoint callbacks, relaunches of a
finished run whatever its callbacks, branching twice from one checkpoint, weights-only sets, and a resume
with another optimizer class."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from noether.core.checkpoint_store import CheckpointStore
from noether.core.providers.path import PathProvider
from noether.core.writers.checkpoint_writer import CheckpointLoadError
from noether.training.run import train
from tests.conftest import tiny_config

CHECKPOINT = "noether.core.callbacks.CheckpointCallback"
OFFLINE_LOSS = {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"}
BEST = {
    "kind": "noether.core.callbacks.BestCheckpointCallback",
    "every_n_epochs": 1,
    "metric_key": "loss/val/total",
    "tolerances": [1],
}
EMA = {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9]}


def tags(paths: PathProvider) -> list[str]:
    return [info.tag for info in CheckpointStore(paths.checkpoint_dir, paths.run_id).tags()]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory by its content hash (log.txt, which a relaunch appends to, aside)."""
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.name not in ("log.txt", ".lock")
    }


def run(tmp_path: Path, callbacks: list[dict[str, Any]], **trainer: Any) -> dict[str, Any]:
    return tiny_config(tmp_path, callbacks=callbacks, **trainer)


def test_a_rolling_checkpoint_callback_never_deletes_the_sets_a_keep_all_one_wrote(tmp_path):
    tree = run(
        tmp_path,
        [
            {"kind": CHECKPOINT, "every_n_updates": 2, "keep_last_n": 1},
            {"kind": CHECKPOINT, "every_n_updates": 4, "id": "keep_all"},
        ],
        max_updates=12,
        max_epochs=None,
    )
    paths = train(tree)
    periodic = [tag for tag in tags(paths) if tag.startswith("E")]
    updates = [int(tag.split("_U")[1].split("_")[0]) for tag in periodic]
    assert updates == [4, 8, 12]  # every keep-all set, and the rolling callback's newest (12)
    assert all(CheckpointStore(paths.checkpoint_dir, "run").info(tag).resumable for tag in periodic)


def test_relaunching_a_finished_run_changes_nothing(tmp_path):
    """The last periodic set falls on the final update, where `latest` and `last` are too."""
    tree = run(
        tmp_path,
        [OFFLINE_LOSS, BEST, {"kind": CHECKPOINT, "every_n_epochs": 1, "save_latest_weights": True, "save_latest_optim": True}],
    )
    paths = train(tree)
    before = snapshot(paths.run_dir)
    assert paths.metrics_file.read_text().count("\n") == 3  # two epochs and after_training's best values
    for resume in ("auto", "run"):
        train(tree, resume=resume)
        assert snapshot(paths.run_dir) == before
    assert "has finished (checkpoint 'last' at" in paths.log_file.read_text()


def test_a_finished_run_without_a_resumable_checkpoint_is_not_trained_again(tmp_path):
    tree = run(tmp_path, [OFFLINE_LOSS, BEST, EMA])
    paths = train(tree)
    before = snapshot(paths.run_dir)
    for _ in range(2):
        train(tree, resume="auto")
        assert snapshot(paths.run_dir) == before
    assert not list(paths.checkpoint_dir.glob("abandoned_after_*"))
    assert "has finished: its checkpoint 'last' holds no optimizer state" in paths.log_file.read_text()


def test_weights_only_periodic_sets_are_listed_but_not_resumed(tmp_path):
    tree = run(tmp_path, [{"kind": CHECKPOINT, "every_n_epochs": 1, "save_optim": False}])
    paths = train(tree)
    store = CheckpointStore(paths.checkpoint_dir, "run")
    infos = {info.tag: info for info in store.tags()}
    assert set(infos) == {"E1_U9_S1152", "E2_U18_S2304", "last"}
    assert all(info.complete and not info.resumable for info in infos.values())
    before = snapshot(paths.run_dir)
    train(tree, resume="auto")  # finished: nothing to do, no exit 2
    assert snapshot(paths.run_dir) == before


def test_branching_twice_from_one_checkpoint_keeps_both_abandoned_histories(tmp_path):
    tree = run(tmp_path, [OFFLINE_LOSS, BEST, {"kind": CHECKPOINT, "every_n_epochs": 1}], max_epochs=3)
    paths = train(tree)
    original_last = (paths.checkpoint_dir / "classifier_cp=last_model.th").read_bytes()
    train({**tree, "seed": 1}, resume="run", checkpoint="E1_U9_S1152")
    train({**tree, "seed": 2}, resume="run", checkpoint="E1_U9_S1152")
    first, second = paths.checkpoint_dir / "abandoned_after_E1_U9_S1152", paths.checkpoint_dir / "abandoned_after_E1_U9_S1152.2"
    assert (first / "classifier_cp=last_model.th").read_bytes() == original_last
    assert (second / "classifier_cp=last_model.th").exists()
    assert (second / "classifier_cp=last_model.th").read_bytes() != original_last  # the first branch's own end


def test_a_resume_with_another_optimizer_class_is_refused_naming_both(tmp_path):
    tree = run(tmp_path, [{"kind": CHECKPOINT, "every_n_epochs": 1}], max_epochs=1)
    paths = train(tree)
    changed = {**tree, "model": {**tree["model"], "optimizer": {"kind": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}}}
    with pytest.raises(CheckpointLoadError) as refused:
        train({**changed, "trainer": {**tree["trainer"], "max_epochs": 2}}, resume="run", checkpoint="E1_U9_S1152")
    message = str(refused.value)
    assert "\n" not in message
    assert "torch.optim.AdamW" in message and "torch.optim.SGD" in message and "classifier" in message
    assert (paths.checkpoint_dir / "classifier_cp=E1_U9_S1152_optim.th").exists()
