"""Resume: a run continued from any of its checkpoints ends exactly as if it had never stopped.

The reference is one uninterrupted run; a resumed run is a copy of its directory continued from
one of its checkpoints, so it recomputes everything after that checkpoint and must reproduce the
reference bit for bit: weights, optimizer state and every logged metric.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from noether.core.callbacks.default import TrainingLossCallback
from noether.core.config import ConfigError
from noether.core.providers.path import PathProvider
from noether.core.writers.checkpoint_writer import CheckpointLoadError
from noether.core.writers.log_writer import LogWriter
from noether.training.run import build_trainer, parse_run_config, train
from tests.conftest import run_cli, tiny_config
from tests.support.checkpoints import checkpoint_path
from tests.support.fork_server import ForkServer
from tests.support.models import composite_model_config

CHECKPOINT = "noether.core.callbacks.CheckpointCallback"


def resumable_tree(output_path: Path) -> dict[str, Any]:
    """18 updates (9 per epoch) with state everywhere: dropout, AdamW with a cosine schedule, training
    losses summed over 3 updates, a counting callback, validation passes served by the shared sampler."""
    return tiny_config(
        output_path,
        log_every_n_updates=3,
        callbacks=[
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_updates": 5, "dataset_key": "val"},
            {"kind": "tests.support.stateful.CountingCallback", "every_n_updates": 2},
            {"kind": CHECKPOINT, "every_n_epochs": 1, "save_latest_weights": True, "save_latest_optim": True},
            {"kind": CHECKPOINT, "every_n_updates": 4},
        ],
    )


def resume_copy(reference_dir: Path, output_path: Path, tree: dict[str, Any], checkpoint: str, run_id: str = "resumed"):
    """Continue a copy of the reference run from `checkpoint`."""
    shutil.copytree(reference_dir, output_path / run_id)
    return train({**tree, "output_path": str(output_path), "run_id": run_id}, resume=run_id, checkpoint=checkpoint)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def assert_identical(actual: Any, expected: Any, where: str = "") -> None:
    """Equal structure, equal values, tensors bit for bit."""
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def assert_same_end(actual_paths, expected_paths, model_names: list[str]) -> None:
    """Same final weights, optimizer states and metrics.jsonl."""
    for name in model_names:
        for part in ("model", "optim"):
            actual = load(checkpoint_path(actual_paths, name, "last", part))["state_dict"]
            expected = load(checkpoint_path(expected_paths, name, "last", part))["state_dict"]
            assert_identical(actual, expected, f"{name} {part}")
    assert metrics(actual_paths) == metrics(expected_paths)


def metrics(paths) -> list[dict[str, float]]:
    return [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    output_path = tmp_path_factory.mktemp("reference")
    tree = resumable_tree(output_path)
    return tree, train(tree)


# --------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize(
    "checkpoint",
    [
        pytest.param("E1_U9_S1152", id="epoch-boundary"),
        pytest.param("E0_U4_S512", id="mid-epoch"),  # one update after a log: summed losses in flight
        pytest.param("E1_U16_S2048", id="mid-epoch-after-validation"),
    ],
)
def test_resume_from_a_periodic_checkpoint_reproduces_the_uninterrupted_run(reference, tmp_path, checkpoint):
    tree, reference_paths = reference
    resumed = resume_copy(reference_paths.run_dir, tmp_path, tree, checkpoint)

    assert_same_end(resumed, reference_paths, ["classifier"])
    assert f"resumed from checkpoint '{checkpoint}'" in resumed.log_file.read_text()


def test_resume_from_last_trains_no_further(reference, tmp_path):
    tree, reference_paths = reference
    resumed = resume_copy(reference_paths.run_dir, tmp_path, tree, "last")

    assert_same_end(resumed, reference_paths, ["classifier"])


def test_resume_of_a_composite_model_with_a_frozen_submodel(tmp_path):
    """The frozen embed is not saved: it is rebuilt from config and seed; encoder and head resume exactly."""
    tree = tiny_config(tmp_path, callbacks=[{"kind": CHECKPOINT, "every_n_updates": 5}])
    tree["model"] = composite_model_config()
    reference_paths = train(tree)
    assert not checkpoint_path(reference_paths, "composite.embed", "E0_U5_S640", "model").exists()

    resumed = resume_copy(reference_paths.run_dir, tmp_path, tree, "E0_U5_S640")

    assert_same_end(resumed, reference_paths, ["composite.encoder", "composite.head"])


def test_callbacks_missing_on_either_side_are_named_in_warnings(reference, tmp_path):
    tree, reference_paths = reference
    callbacks = [callback for callback in tree["trainer"]["callbacks"] if "Counting" not in callback["kind"]]
    callbacks.append({"kind": "tests.support.stateful.CountingCallback", "every_n_updates": 2, "id": "new_counter"})
    changed = {**tree, "trainer": {**tree["trainer"], "callbacks": callbacks}}

    log = resume_copy(reference_paths.run_dir, tmp_path, changed, "E1_U9_S1152").log_file.read_text()

    assert "checkpoint 'E1_U9_S1152' has no state for callback 'new_counter'; it starts fresh" in log
    assert "checkpoint 'E1_U9_S1152' has state for callback 'CountingCallback', which this run does not have" in log


def test_a_new_run_in_the_directory_of_a_run_is_refused(reference, tmp_path):
    """On a copy of the reference run (the module's tests share the reference itself), which the
    refused start leaves byte for byte as it was."""
    tree, reference_paths = reference
    shutil.copytree(reference_paths.run_dir, tmp_path / "run")
    before = {path: path.read_bytes() for path in sorted((tmp_path / "run").rglob("*")) if path.is_file()}
    expected = f"run directory {tmp_path / 'run'} already holds a run; use --resume to continue it"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        train({**tree, "output_path": str(tmp_path)})
    assert {path: path.read_bytes() for path in sorted((tmp_path / "run").rglob("*")) if path.is_file()} == before


# --------------------------------------------------------------------------------- bad files
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class Foreign:
    """Not a tensor type: a file holding it is refused by weights_only loading."""


def write_foreign_object(path: Path) -> None:
    torch.save({"state_dict": Foreign()}, path)


def write_weights_of_another_model(path: Path) -> None:
    payload = load(path)
    payload["state_dict"] = torch.nn.Linear(3, 4).state_dict()
    torch.save(payload, path)


def write_trainer_state_of_another_program(path: Path) -> None:
    torch.save({"epoch": 1, "weights": torch.zeros(3)}, path)


def replace_by_later_checkpoint(path: Path) -> None:
    shutil.copyfile(path.with_name(path.name.replace("E0_U4_S512", "E0_U8_S1024")), path)


@pytest.mark.parametrize(
    ("damage", "part", "message"),
    [
        pytest.param(
            truncate,
            "model",
            "checkpoint file is truncated or corrupt: {path}",
            id="truncated",
        ),
        pytest.param(
            write_foreign_object, "model", "refusing to load {path}: it is not a plain tensor checkpoint", id="foreign-object"
        ),
        pytest.param(
            write_weights_of_another_model,
            "model",
            "checkpoint 'E0_U4_S512' is damaged: {path} is not the file that was written (its content hash differs)",
            id="another-model",  # it loads, with the stamp of its set: only its bytes tell
        ),
        pytest.param(
            write_trainer_state_of_another_program,
            "trainer",
            "{path} is not the trainer state of classifier written by noether",
            id="foreign-trainer-state",
        ),
        pytest.param(
            replace_by_later_checkpoint, "optim", "{path} was written at E0_U8_S1024 but the rest of checkpoint", id="mixed-set"
        ),
        pytest.param(
            Path.unlink, "optim", "checkpoint 'E0_U4_S512' holds no optimizer state of classifier ({path.name})", id="missing"
        ),
    ],
)
def test_a_bad_checkpoint_file_is_refused_with_its_name(reference, tmp_path, damage, part, message):
    tree, reference_paths = reference
    shutil.copytree(reference_paths.run_dir, tmp_path / "damaged")
    path = tmp_path / "damaged" / "checkpoints" / f"classifier_cp=E0_U4_S512_{part}.th"
    damage(path)

    with pytest.raises(CheckpointLoadError) as error:
        train({**tree, "output_path": str(tmp_path), "run_id": "damaged"}, resume="damaged", checkpoint="E0_U4_S512")

    assert message.format(path=path) in str(error.value)


def test_an_unknown_checkpoint_tag_is_refused(reference, tmp_path):
    tree, reference_paths = reference
    shutil.copytree(reference_paths.run_dir, tmp_path / "run")
    missing = tmp_path / "run" / "checkpoints" / "classifier_cp=E7_U1_S1_trainer.th"

    with pytest.raises(
        CheckpointLoadError, match=re.escape(f"no checkpoint 'E7_U1_S1' to resume from: {missing} does not exist")
    ):
        train({**tree, "output_path": str(tmp_path)}, resume="run", checkpoint="E7_U1_S1")


def test_the_command_line_reports_a_bad_checkpoint_in_one_line(reference, tmp_path, write_config):
    tree, reference_paths = reference
    shutil.copytree(reference_paths.run_dir, tmp_path / "run")
    damaged = tmp_path / "run" / "checkpoints" / "classifier_cp=latest_model.th"
    write_foreign_object(damaged)
    config = write_config({**tree, "output_path": str(tmp_path)})

    result = run_cli("noether-train", str(config), "--resume", "run", "--checkpoint", "latest", cwd=tmp_path, check=False)

    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    # `--resume run` is found under output_path (which is also the working directory here)
    assert line.startswith(f"noether-train: error: refusing to load {damaged}: it is not a plain tensor checkpoint")


# --------------------------------------------------------------------------------- SIGKILL
KILLS = 24


def test_runs_killed_while_writing_checkpoints_leave_loadable_files_and_resume_exactly(tmp_path):
    """A 7 MB checkpoint (weights and AdamW state of a 560k-parameter MLP) as `latest` after every
    update: the process spends most of its time writing when it is killed. Every restart resumes
    from `latest`; the run finally ends as a never-killed one does."""
    every_update = {
        "kind": CHECKPOINT,
        "every_n_updates": 1,
        "save_weights": False,
        "save_optim": False,
        "save_latest_weights": True,
        "save_latest_optim": True,
    }
    tree = tiny_config(tmp_path, max_epochs=None, max_updates=400, effective_batch_size=32, callbacks=[every_update])
    tree["model"].update(hidden_dim=512, depth=3)
    checkpoint_dir = tmp_path / "run" / "checkpoints"
    latest = checkpoint_dir / "classifier_cp=latest_trainer.th"
    server = ForkServer(tmp_path / "processes.log")
    moments = random.Random(0)
    try:
        for kill in range(KILLS):
            previous = latest.stat().st_ino if latest.exists() else None
            pid = server.start(tree, resume=None if previous is None else "run")
            # from the moment a new `latest` is in place, the next one is being written
            deadline = time.monotonic() + 120
            while (latest.stat().st_ino if latest.exists() else None) == previous:
                assert time.monotonic() < deadline, f"kill {kill}: no new checkpoint\n{server.log_tail()}"
                time.sleep(0.002)
            time.sleep(moments.uniform(0, 0.2))
            os.kill(pid, signal.SIGKILL)
            assert server.ended() == -signal.SIGKILL, server.log_tail()
            for path in checkpoint_dir.iterdir():
                if path.name.endswith("_hashes.json"):
                    json.loads(path.read_text())
                elif not path.name.startswith("."):  # every file under a final name is complete
                    load(path)

        # the rest without killing, and a reference that was never killed; saving `latest` less
        # often changes nothing in training
        sparse = json.loads(json.dumps(tree))
        sparse["trainer"]["callbacks"][0]["every_n_updates"] = 1000
        server.start(sparse, resume="run")
        assert server.ended() == 0, server.log_tail()
        server.start({**sparse, "run_id": "reference"}, resume=None)
        assert server.ended() == 0, server.log_tail()
    finally:
        server.close()

    assert_same_end(PathProvider(tmp_path, "run"), PathProvider(tmp_path, "reference"), ["classifier"])


def branched_run_tree(output_path: Path) -> dict[str, Any]:
    """4 epochs, validated, best-tracked and checkpointed (with `latest`) at every epoch."""
    return tiny_config(
        output_path,
        max_epochs=4,
        callbacks=[
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
            {
                "kind": "noether.core.callbacks.BestCheckpointCallback",
                "every_n_epochs": 1,
                "metric_key": "loss/val/total",
                "tolerances": [1],
            },
            {"kind": CHECKPOINT, "every_n_epochs": 1, "save_latest_weights": True, "save_latest_optim": True},
        ],
    )


def validation_losses(paths: PathProvider) -> dict[int, float]:
    """Epoch -> loss/val/total, as metrics.jsonl logged it."""
    return {row["epoch"]: row["loss/val/total"] for row in metrics(paths) if "loss/val/total" in row}


def periodic_tag(epoch: int) -> str:
    return f"E{epoch}_U{9 * epoch}_S{1152 * epoch}"  # 9 updates of 128 samples an epoch


def test_resume_from_an_older_checkpoint_sets_the_abandoned_history_aside(tmp_path):
    """The run went on to epoch 4; resumed from epoch 1 with another learning rate it takes another path:
    nothing of the abandoned epochs 2-4 may pass for this history's best, latest or metrics. The
    best epoch of each history is read off its validation losses in metrics.jsonl, and each best
    file must hold the very weights of that epoch's periodic checkpoint."""
    tree = branched_run_tree(tmp_path)
    paths = train(tree)
    abandoned_losses = validation_losses(paths)
    abandoned_best_epoch = min(abandoned_losses, key=abandoned_losses.__getitem__)
    assert abandoned_best_epoch > 1
    abandoned_weights = {
        epoch: load(checkpoint_path(paths, "classifier", periodic_tag(epoch), "model"))["state_dict"] for epoch in (2, 3, 4)
    }

    branch = json.loads(json.dumps(tree))
    branch["model"]["optimizer"]["lr"] = 0.0001
    branch["trainer"]["max_epochs"] = 2
    train(branch, resume="run", checkpoint="E1_U9_S1152")

    aside = paths.checkpoint_dir / "abandoned_after_E1_U9_S1152"
    assert sorted(path.name for path in aside.glob("classifier_cp=E*_model.th")) == [
        f"classifier_cp={periodic_tag(e)}_model.th" for e in (2, 3, 4)
    ]
    assert checkpoint_path(paths, "classifier", "E1_U9_S1152", "trainer").exists()  # the branch point stays in place
    set_aside_best = load(aside / "classifier_cp=best_model.loss.val.total_model.th")
    assert set_aside_best["training_iteration"]["epoch"] == abandoned_best_epoch
    assert load(aside / "classifier_cp=latest_trainer.th")["training_iteration"] == {"epoch": 4, "update": 36, "sample": 4608}

    losses = validation_losses(paths)
    assert list(losses) == [1, 2]
    assert losses[1] == abandoned_losses[1]  # the shared past
    best_epoch = min(losses, key=losses.__getitem__)  # the first lowest: a tie is no improvement
    best = load(checkpoint_path(paths, "classifier", "best_model.loss.val.total", "model"))
    assert best["training_iteration"] == {"epoch": best_epoch, "update": 9 * best_epoch, "sample": 1152 * best_epoch}
    best_epoch_weights = load(checkpoint_path(paths, "classifier", periodic_tag(best_epoch), "model"))["state_dict"]
    assert_identical(best["state_dict"], best_epoch_weights, "best")
    # tolerance 1 is never exceeded in two epochs: its file is the best of the whole (new) history
    assert_identical(
        load(checkpoint_path(paths, "classifier", "best_model.loss.val.total.tolerance=1", "model"))["state_dict"],
        best_epoch_weights,
        "tolerance=1",
    )
    # `latest` is this history's newest set, epoch 2 of the new learning rate, not the abandoned epoch 2
    latest = {part: load(checkpoint_path(paths, "classifier", "latest", part)) for part in ("model", "optim", "trainer")}
    assert {part: payload["training_iteration"] for part, payload in latest.items()} == {
        part: {"epoch": 2, "update": 18, "sample": 2304} for part in latest
    }
    for part in ("model", "optim"):
        assert_identical(
            latest[part]["state_dict"], load(checkpoint_path(paths, "classifier", "last", part))["state_dict"], f"latest {part}"
        )
    assert not torch.equal(latest["model"]["state_dict"]["layers.0.weight"], abandoned_weights[2]["layers.0.weight"])
    rows = metrics(paths)
    assert [row["epoch"] for row in rows if "loss/val/total" in row] == [1, 2]
    summary = json.loads(paths.summary_file.read_text())
    last_values: dict[str, float] = {}
    for row in rows:
        last_values.update({key: value for key, value in row.items() if key not in ("epoch", "update", "sample")})
    assert summary == last_values


def test_a_branch_whose_later_epochs_are_worse_keeps_the_branch_point_as_its_best(tmp_path):
    tree = branched_run_tree(tmp_path)
    paths = train(tree)
    branch = json.loads(json.dumps(tree))
    branch["model"]["optimizer"]["lr"] = 3.0  # diverges: epoch 2 of this history is worse than epoch 1
    branch["trainer"]["max_epochs"] = 2
    train(branch, resume="run", checkpoint="E1_U9_S1152")

    losses = validation_losses(paths)
    assert losses[2] > losses[1]  # the premise: this history's best is epoch 1
    branch_point = load(checkpoint_path(paths, "classifier", "E1_U9_S1152", "model"))
    for tag in ("best_model.loss.val.total", "best_model.loss.val.total.tolerance=1"):
        best = load(checkpoint_path(paths, "classifier", tag, "model"))
        assert best["training_iteration"] == {"epoch": 1, "update": 9, "sample": 1152}, tag
        assert_identical(best["state_dict"], branch_point["state_dict"], tag)
    assert "'best_model.loss.val.total' is the model of 'E1_U9_S1152' again" in paths.log_file.read_text()


@pytest.mark.parametrize("refusal", ["unknown tag", "batch size"])
def test_a_refused_resume_names_the_reason_and_leaves_config_yaml_as_it_was(reference, tmp_path, refusal):
    """A resume with another effective batch size would miscount epochs and restart the data order: refused
    with the old and new value. No refusal rewrites the run's config.yaml."""
    tree, reference_paths = reference
    shutil.copytree(reference_paths.run_dir, tmp_path / "run")
    config_file = tmp_path / "run" / "config.yaml"
    before = config_file.read_text()
    changed = {**tree, "output_path": str(tmp_path), "trainer": {**tree["trainer"], "effective_batch_size": 64}}
    if refusal == "unknown tag":
        with pytest.raises(CheckpointLoadError, match="no checkpoint 'E7_U1_S1'"):
            train(changed, resume="run", checkpoint="E7_U1_S1")
    else:
        with pytest.raises(
            CheckpointLoadError,
            match=r"^cannot resume checkpoint 'latest' with trainer.effective_batch_size 64: it was trained with 128$",
        ):
            train(changed, resume="run", checkpoint="latest")
    assert config_file.read_text() == before


def test_a_restored_training_loss_sum_lives_on_the_trainer_device(reference, tmp_path):
    """Checkpoints load onto the CPU; the restored sums must be moved where the next losses are added
    (checked on a CPU-only machine with the meta device standing for the GPU)."""
    tree, _ = reference
    config = parse_run_config({**tree, "output_path": str(tmp_path)})
    paths = PathProvider(tmp_path, "device-check")  # not in the reference's output path, which the module's tests share
    trainer = build_trainer(config, paths, LogWriter(paths.run_dir / "m.jsonl", paths.run_dir / "s.json", is_main_process=False))
    callback = next(c for c in trainer.callbacks if isinstance(c, TrainingLossCallback))
    trainer.device = torch.device("meta")  # a device other than the CPU the checkpoint loaded onto
    callback.load_state_dict({"loss_sums": {"total": torch.tensor(2.0)}, "step_count": 1})
    assert callback.loss_sums["total"].device == torch.device("meta")


def test_optimizer_hyperparameters_changed_in_the_config_apply_on_resume(reference, tmp_path):
    tree, reference_paths = reference
    shutil.copytree(reference_paths.run_dir, tmp_path / "run")
    changed = {
        **tree,
        "output_path": str(tmp_path),
        "model": {**tree["model"], "optimizer": {**tree["model"]["optimizer"], "weight_decay": 0.5}},
    }

    paths = train(changed, resume="run", checkpoint="E1_U9_S1152")

    assert [
        group["weight_decay"]
        for group in load(checkpoint_path(paths, "classifier", "last", "optim"))["state_dict"]["param_groups"]
    ] == [0.5]
    assert (
        "optimizer of classifier: the config's weight_decay 0.01 -> 0.5 replaces the checkpoint's" in paths.log_file.read_text()
    )


def test_a_run_saving_no_optimizer_state_warns_at_start_and_its_checkpoints_say_why_they_cannot_resume(tmp_path):
    tree = tiny_config(tmp_path, max_epochs=1, callbacks=[{"kind": CHECKPOINT, "every_n_epochs": 1, "save_optim": False}])
    paths = train(tree)
    assert "no callback saves optimizer state" in paths.log_file.read_text()

    with pytest.raises(
        CheckpointLoadError,
        match="checkpoint 'E1_U9_S1152' holds no optimizer state of classifier .*so training cannot continue from it",
    ):
        train(tree, resume="run", checkpoint="E1_U9_S1152")
