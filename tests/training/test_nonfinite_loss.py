"""trainer.on_nonfinite_loss: a NaN loss never reaches the weights, the EMA or a checkpoint. `stop` ends the
run before the bad update's optimizer step with an error checkpoint of the state before it; `skip` drops
that update's gradients, counts it, and resumes exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration
from noether.training.run import train
from noether.training.trainers.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from tests.conftest import run_cli, tiny_config

EMA = {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9]}
NAN_TRAIN = {"kind": "tests.support.nonfinite.NanDigitsDataset", "split": "train", "nan_index": 5}


def nan_tree(tmp_path: Path, **trainer) -> dict:
    tree = tiny_config(tmp_path, **trainer)
    tree["datasets"]["train"] = dict(NAN_TRAIN)
    return tree


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every checkpoint file in `directory`, keyed by file and key."""
    found = {}
    for path in sorted(directory.glob("*.th")):
        payload = torch.load(path, weights_only=True)
        stack = [(path.name, payload)]
        while stack:
            name, value = stack.pop()
            if isinstance(value, dict):
                stack.extend((f"{name}/{key}", item) for key, item in value.items())
            elif isinstance(value, (list, tuple)):
                stack.extend((f"{name}/{index}", item) for index, item in enumerate(value))
            elif isinstance(value, torch.Tensor):
                found[name] = value
    return found


def rows(paths) -> list[dict]:
    return [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]


def test_stop_ends_before_the_bad_update_with_an_error_checkpoint_of_the_state_before_it(tmp_path, write_config):
    tree = nan_tree(tmp_path / "nan", max_epochs=1, callbacks=[EMA])
    result = run_cli("noether-train", str(write_config(tree)), cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("noether-train: error:")]
    match = re.search(r"loss term 'total' is nan at update (?P<update>\d+) \(epoch 1\): stopped before its optimizer step", line)
    assert match, line
    bad_update = int(match["update"])
    checkpoints = tmp_path / "nan" / "run" / "checkpoints"
    [error_set] = {path.name.split("_cp=")[1].rsplit("_", 1)[0] for path in checkpoints.glob("*.error_trainer.th")}
    assert f"_U{bad_update - 1}_" in error_set
    tensors = checkpoint_tensors(checkpoints)
    assert tensors and all(torch.isfinite(value).all() for value in tensors.values() if value.is_floating_point())

    # the same run without the poisoned sample, saved after every update: its set of the update before is
    # the error set, bit for bit (the poisoned sample changes no batch before its own)
    clean = tiny_config(
        tmp_path / "clean",
        max_epochs=1,
        callbacks=[EMA, {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_updates": 1}],
    )
    clean_paths = train(clean)
    reference = clean_paths.checkpoint_dir / f"classifier_cp={error_set.removesuffix('.error')}_model.th"
    expected = torch.load(reference, weights_only=True)["state_dict"]
    saved = torch.load(checkpoints / f"classifier_cp={error_set}_model.th", weights_only=True)["state_dict"]
    assert expected.keys() == saved.keys()
    assert all(torch.equal(expected[key], saved[key]) for key in expected)


def test_skip_drops_each_bad_update_counts_it_and_keeps_everything_finite(tmp_path):
    tree = nan_tree(tmp_path, max_epochs=2, on_nonfinite_loss="skip", log_every_n_updates=1, callbacks=[EMA])
    paths = train(tree)
    logged = rows(paths)
    counts = [row["nonfinite/skipped_updates"] for row in logged if "nonfinite/skipped_updates" in row]
    assert counts == [1, 2]  # the poisoned sample is drawn once per epoch
    losses = [row["loss/online/total"] for row in logged if "loss/online/total" in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    tensors = checkpoint_tensors(paths.checkpoint_dir)
    assert tensors and all(torch.isfinite(value).all() for value in tensors.values() if value.is_floating_point())
    assert "its gradients are dropped, no optimizer step (2 skipped so far)" in (paths.run_dir / "log.txt").read_text()


def test_a_skipping_run_resumed_from_its_first_epoch_ends_as_the_uninterrupted_one(tmp_path):
    checkpoint = {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_optim": True}
    tree = nan_tree(tmp_path, max_epochs=2, on_nonfinite_loss="skip", callbacks=[EMA, checkpoint])
    whole = train(tree)
    final = torch.load(whole.checkpoint_dir / "classifier_cp=last_model.th", weights_only=True)["state_dict"]
    [first_epoch] = [
        path.name.split("_cp=")[1].removesuffix("_trainer.th") for path in whole.checkpoint_dir.glob("*_cp=E1_*_trainer.th")
    ]
    resumed = train(tree, resume=str(whole.run_dir), checkpoint=first_epoch)
    again = torch.load(resumed.checkpoint_dir / "classifier_cp=last_model.th", weights_only=True)["state_dict"]
    assert all(torch.equal(final[key], again[key]) for key in final)
    assert [row["nonfinite/skipped_updates"] for row in rows(resumed) if "nonfinite/skipped_updates" in row] == [1, 2]


@pytest.mark.parametrize("on_nonfinite_loss", ["stop", "skip"])
def test_batch_norm_statistics_of_a_bad_update_are_put_back(on_nonfinite_loss):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    guard = NonFiniteLossGuard(on_nonfinite_loss)
    counter = UpdateCounter(
        start_iteration=TrainingIteration(),
        end_iteration=TrainingIteration(update=10),
        updates_per_epoch=5,
        effective_batch_size=2,
    )
    guard.begin_update(model)
    guard.track({"total": model(torch.ones(2, 3)).sum()})
    assert guard.update_is_finite(counter)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    guard.begin_update(model)
    guard.track({"total": model(torch.full((2, 3), float("nan"))).sum()})
    assert not torch.isfinite(model[1].running_mean).all()  # the forward pass spoilt them
    if on_nonfinite_loss == "stop":
        with pytest.raises(NonFiniteLossError, match=r"loss term 'total' is nan at update 1 \(epoch 1\)"):
            guard.update_is_finite(counter)
    else:
        assert not guard.update_is_finite(counter)
        assert guard.skipped_updates == 1
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
