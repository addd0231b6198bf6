"""EmaCallback: the EMA recurrence over real updates, its files, exact resume, and children run on the EMA weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from noether.core.checkpoint_store import CheckpointStore
from noether.core.config import ConfigError
from noether.core.providers.path import PathProvider
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.log_writer import LogWriter
from noether.examples.digits import DigitsClassifier, DigitsClassifierConfig
from noether.training.run import build_trainer, parse_run_config, train
from noether.training.trainers.base import BaseTrainer
from tests.conftest import run_cli, tiny_config
from tests.support.checkpoints import checkpoint_path
from tests.support.ema_callbacks import CHILD_FAILURE, LIVE_WEIGHTS_FILE, checksum
from tests.support.ema_models import Decoder, DecoderConfig, Encoder, EncoderConfig

EMA = "noether.core.callbacks.EmaCallback"
SUPPORT = "tests.support.ema_callbacks"
FACTORS = [0.9, 0.99]
BATCH_SIZE = 128  # tiny_config's; the 1259 training digits make 9 updates per epoch


def tag(epoch: int, update: int) -> str:
    return str(TrainingIteration(epoch=epoch, update=update, sample=update * BATCH_SIZE))


def run_paths(run_dir: Path) -> PathProvider:
    return PathProvider(run_dir.parent, run_dir.name)


def ema_file(run_dir: Path, factor: float, checkpoint_tag: str, model: str = "classifier") -> Path:
    return checkpoint_path(run_paths(run_dir), model, checkpoint_tag, "model", ema_factor=factor)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def ema_state(run_dir: Path, factor: float, checkpoint_tag: str, model: str = "classifier") -> dict[str, torch.Tensor]:
    return load(ema_file(run_dir, factor, checkpoint_tag, model))["state_dict"]


def live_state(run_dir: Path, checkpoint_tag: str) -> dict[str, torch.Tensor]:
    return load(checkpoint_path(run_paths(run_dir), "classifier", checkpoint_tag, "model"))["state_dict"]


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def ema_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """What the EMA's children logged, by update."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_update = {row["update"]: {key: value for key, value in row.items() if key.startswith("ema=")} for row in rows}
    return {update: values for update, values in by_update.items() if values}


def copy_run(run_dir: Path, output_path: Path) -> Path:
    copy = output_path / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def train_in_process(tree: dict[str, Any]) -> BaseTrainer:
    """Like `train`, but returns the trainer, so that a test can look at its callbacks."""
    config = parse_run_config(tree)
    paths = PathProvider(config.output_path, config.run_id)
    paths.create()
    trainer = build_trainer(config, paths, LogWriter(paths.metrics_file, paths.summary_file))
    try:
        trainer.train()
    finally:
        trainer.context.checkpoints.close()
    return trainer


# --------------------------------------------------------------------------------- the recurrence
def hand_computed_emas(live_states: list[dict[str, torch.Tensor]], factor: float, parameter_names: set[str]):
    """`ema = factor * ema + (1 - factor) * live` for parameters, the live value for buffers; one per update."""
    ema = dict(live_states[0])
    for live in live_states[1:]:
        ema = {key: factor * ema[key] + (1 - factor) * value if key in parameter_names else value for key, value in live.items()}
        yield ema


def test_ema_follows_the_recurrence_over_real_updates_and_loads_into_a_fresh_model(tmp_path):
    factors = [0.9, 0.5]
    tree = tiny_config(
        tmp_path,
        max_epochs=None,
        max_updates=4,
        callbacks=[
            {"kind": f"{SUPPORT}.LiveWeightsRecorder", "every_n_updates": 1},
            {"kind": EMA, "every_n_updates": 1, "target_factors": factors, "save_weights": True},
        ],
    )
    tree["model"]["optimizer"]["lr"] = 0.05  # large steps, so that a wrong recurrence is far off
    run_dir = train(tree).run_dir
    live_states = torch.load(run_dir / LIVE_WEIGHTS_FILE)
    parameter_names = set(live_states[0])  # the MLP has no buffers

    for factor in factors:
        for update, expected in enumerate(hand_computed_emas(live_states, factor, parameter_names), start=1):
            payload = load(ema_file(run_dir, factor, tag(0, update)))
            assert payload["training_iteration"] == {"epoch": 0, "update": update, "sample": update * BATCH_SIZE}
            torch.testing.assert_close(payload["state_dict"], expected)
            weight = "layers.0.weight"
            assert not torch.allclose(payload["state_dict"][weight], live_states[update][weight], atol=1e-4)
        for checkpoint_tag in ("latest", "last"):  # the same bytes as the periodic file of update 4, written once
            assert ema_file(run_dir, factor, checkpoint_tag).samefile(ema_file(run_dir, factor, tag(0, 4)))
            payload = load(ema_file(run_dir, factor, checkpoint_tag))
            assert payload["training_iteration"] == {"epoch": 0, "update": 4, "sample": 4 * BATCH_SIZE}

    payload = load(ema_file(run_dir, 0.9, "last"))
    fresh = DigitsClassifier(DigitsClassifierConfig(**payload["model_config"]))
    fresh.load_state_dict(payload["state_dict"])
    assert_identical(fresh.state_dict(), payload["state_dict"])
    tags = [tag(0, update) for update in range(1, 5)] + ["latest", "last"]
    assert {path.name for path in (run_dir / "checkpoints").glob("*_ema=*")} == {
        ema_file(run_dir, factor, checkpoint_tag).name for factor in factors for checkpoint_tag in tags
    }


def test_each_model_path_of_a_composite_model_gets_its_own_ema(tmp_path):
    ema = {"kind": EMA, "every_n_updates": 1, "target_factors": FACTORS, "save_weights": True}
    ema["model_paths"] = ["encoder", "decoder"]
    tree = tiny_config(
        tmp_path,
        max_epochs=None,
        max_updates=3,
        callbacks=[{"kind": f"{SUPPORT}.LiveWeightsRecorder", "every_n_updates": 1}, ema],
    )
    tree["model"] = {
        "kind": "tests.support.ema_models.EncoderDecoder",
        "name": "composite",
        "encoder": {"hidden_dim": 16, "optimizer": {"kind": "torch.optim.AdamW", "lr": 0.05}},
        "decoder": {"hidden_dim": 16, "optimizer": {"kind": "torch.optim.SGD", "lr": 0.5}},
    }
    tree["trainer"]["kind"] = "tests.support.ema_models.EncoderDecoderTrainer"
    run_dir = train(tree).run_dir
    live_states = torch.load(run_dir / LIVE_WEIGHTS_FILE)

    for path, model_class, config_class in [("encoder", Encoder, EncoderConfig), ("decoder", Decoder, DecoderConfig)]:
        prefix, file_model = f"{path}.", f"composite.{path}"
        submodel_states = [{k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)} for state in live_states]
        for factor in FACTORS:
            payload = load(ema_file(run_dir, factor, "last", model=file_model))
            fresh = model_class(config_class(**payload["model_config"]))
            fresh.load_state_dict(payload["state_dict"])
            parameter_names = {name for name, _ in fresh.named_parameters()}
            for update, expected in enumerate(hand_computed_emas(submodel_states, factor, parameter_names), start=1):
                torch.testing.assert_close(ema_state(run_dir, factor, tag(0, update), model=file_model), expected)
    assert ema_state(run_dir, 0.9, "last", model="composite.encoder")["layers.1.num_batches_tracked"] == 3  # buffers: copied
    assert not list((run_dir / "checkpoints").glob("composite_ema=*"))


# --------------------------------------------------------------------------------- children
def test_children_run_on_their_own_schedule_on_the_ema_weights_and_leave_the_live_weights_as_they_were(tmp_path):
    children = [
        {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 2, "dataset_key": "val"},
        {"kind": f"{SUPPORT}.WeightsChecksum", "every_n_epochs": 2},
    ]
    ema = {"kind": EMA, "every_n_epochs": 3, "target_factors": FACTORS, "save_weights": True, "eval_callbacks": children}
    trainer = train_in_process(tiny_config(tmp_path / "ema", max_epochs=4, callbacks=[ema]))
    without_ema = train_in_process(tiny_config(tmp_path / "plain", max_epochs=4))
    run_dir = trainer.context.paths.run_dir

    metrics = ema_metrics(run_dir)
    child_keys = sorted(f"ema={factor}/{key}" for factor in FACTORS for key in ("loss/val/total", "weights/checksum"))
    assert {update // 9: sorted(values) for update, values in metrics.items()} == {2: child_keys, 4: child_keys}
    for factor in FACTORS:  # after the last epoch, the children saw the EMA that is saved as `last`
        assert metrics[36][f"ema={factor}/weights/checksum"] == checksum(ema_state(run_dir, factor, "last"))
    # the EMA is swapped in only for the two epochs a child ran, once per factor, never on the other 34 updates
    assert trainer.callbacks[-1].emas[None].copy_count == 2 * len(FACTORS)
    assert_identical(trainer.context.model.state_dict(), without_ema.context.model.state_dict())

    ema_files = sorted(path.name for path in (run_dir / "checkpoints").iterdir() if not path.name.endswith("_hashes.json"))
    assert ema_files == sorted(ema_file(run_dir, f, t).name for f in FACTORS for t in (tag(3, 27), "latest", "last"))
    assert load(ema_file(run_dir, 0.9, "latest"))["training_iteration"]["epoch"] == 3
    assert load(ema_file(run_dir, 0.9, "last"))["training_iteration"]["epoch"] == 4


@pytest.mark.parametrize("ema_listed_first", [True, False])
def test_ema_weights_due_at_a_trainer_checkpoint_are_written_once_in_that_set(tmp_path, monkeypatch, ema_listed_first):
    """The EMA's own save and the trainer's checkpoint of one step hold the same EMA weights: the trainer's set
    writes them, the EMA's own save adds no set, in either order of the callbacks."""
    saved_sets: list[tuple[str, bool]] = []  # (tag, with trainer state) of every set the store was asked to save
    save = CheckpointStore.save

    def recording_save(store, tag, iteration, members, trainer_state=None, **kwargs):
        saved_sets.append((tag, trainer_state is not None))
        return save(store, tag, iteration, members, trainer_state, **kwargs)

    monkeypatch.setattr(CheckpointStore, "save", recording_save)
    ema = {"kind": EMA, "every_n_epochs": 1, "target_factors": FACTORS, "save_weights": True, "save_latest_weights": True}
    checkpoints = {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 2, "save_latest_weights": True}
    run_dir = train(
        tiny_config(tmp_path, max_epochs=2, callbacks=[ema, checkpoints] if ema_listed_first else [checkpoints, ema])
    ).run_dir

    # epoch 1: the EMA's own sets; epoch 2: the trainer's sets alone, then `last`
    assert saved_sets == [(tag(1, 9), False), ("latest", False), (tag(2, 18), True), ("latest", True), ("last", True)]
    trainer_files = load(checkpoint_path(run_paths(run_dir), "classifier", tag(2, 18), "trainer"))["files"]
    for factor in FACTORS:
        assert ema_file(run_dir, factor, "{tag}").name in trainer_files
        for update in (9, 18):
            assert load(ema_file(run_dir, factor, tag(update // 9, update)))["training_iteration"]["update"] == update


def resume_config(output_path: Path, *, extra_callbacks: list[dict] = (), extra_children: list[dict] = ()) -> dict[str, Any]:
    """Checkpoints (and `latest`) every epoch, while the EMA writes its own `latest` every 4 updates, so the two
    `latest` disagree most of the time; children that iterate data, read the weights and keep state."""
    children = [
        {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 2, "dataset_key": "val"},
        {"kind": f"{SUPPORT}.WeightsChecksum", "every_n_epochs": 2},
        {"kind": f"{SUPPORT}.InvocationCounter", "every_n_epochs": 1},
    ]
    checkpoints = {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1}
    checkpoints.update(save_latest_weights=True, save_latest_optim=True)
    ema = {"kind": EMA, "every_n_updates": 4, "target_factors": FACTORS, "eval_callbacks": children + list(extra_children)}
    return tiny_config(output_path, max_epochs=3, callbacks=[checkpoints, ema, *extra_callbacks])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run the resumed ones must reproduce."""
    return train(resume_config(tmp_path_factory.mktemp("reference"))).run_dir


def test_a_failing_child_leaves_the_live_weights_as_they_were(reference_run, tmp_path):
    failing = {"kind": f"{SUPPORT}.FailingChild", "every_n_epochs": 1}
    with pytest.raises(RuntimeError, match=CHILD_FAILURE):
        train(resume_config(tmp_path, extra_children=[failing]))
    run_dir = tmp_path / "run"
    error_tag = f"{tag(1, 9)}.error"  # the child failed after the first epoch, with the EMA swapped in

    assert_identical(live_state(run_dir, error_tag), live_state(reference_run, tag(1, 9)))
    for factor in FACTORS:
        assert_identical(ema_state(run_dir, factor, error_tag), ema_state(reference_run, factor, tag(1, 9)))


def test_noether_eval_runs_the_children_on_the_ema_weights_of_the_checkpoint(reference_run, tmp_path, write_config):
    run_dir = copy_run(reference_run, tmp_path)
    files_before = {path.name: path.stat().st_mtime_ns for path in (run_dir / "checkpoints").iterdir()}
    config = write_config(resume_config(tmp_path))
    result = run_cli("noether-eval", str(config), "--run", str(run_dir), "--checkpoint", tag(2, 18), cwd=tmp_path)
    summary = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)

    live_checksum = checksum(live_state(run_dir, tag(2, 18)))
    for factor in FACTORS:
        seen = float(summary[f"ema={factor}/weights/checksum"])
        assert seen == checksum(ema_state(run_dir, factor, tag(2, 18)))
        assert seen != live_checksum
        assert f"ema={factor}/loss/val/total" in summary
    files_after = {path.name: path.stat().st_mtime_ns for path in (run_dir / "checkpoints").iterdir()}
    assert files_after == files_before  # nothing is saved at eval


# --------------------------------------------------------------------------------- resume
def test_resume_from_a_periodic_checkpoint_reproduces_the_uninterrupted_ema(reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    train(resume_config(tmp_path), resume=str(run_dir), checkpoint=tag(1, 9))

    for factor in FACTORS:
        for checkpoint_tag in (tag(2, 18), tag(3, 27), "last"):
            assert_identical(ema_state(run_dir, factor, checkpoint_tag), ema_state(reference_run, factor, checkpoint_tag))
    assert ema_metrics(run_dir) == ema_metrics(reference_run)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """A `noether-train` process that receives SIGTERM after update 14, between two EMA saves of `latest`."""
    output_path = tmp_path_factory.mktemp("interrupted")
    sigterm = {"kind": f"{SUPPORT}.SigtermAtUpdate", "every_n_epochs": 1, "update": 14}
    config = output_path / "config.yaml"
    config.write_text(yaml.safe_dump(resume_config(output_path, extra_callbacks=[sigterm])))
    run_cli("noether-train", str(config), cwd=output_path)
    return output_path / "run"


def test_resume_after_sigterm_reproduces_the_uninterrupted_ema(reference_run, interrupted_run, tmp_path):
    run_dir = copy_run(interrupted_run, tmp_path)
    interrupt_tag = f"{tag(1, 14)}.signal_interrupt"
    assert all(ema_file(run_dir, factor, interrupt_tag).exists() for factor in FACTORS)
    train(resume_config(tmp_path), resume=str(run_dir), checkpoint=interrupt_tag)

    for factor in FACTORS:
        assert_identical(ema_state(run_dir, factor, "last"), ema_state(reference_run, factor, "last"))
    assert ema_metrics(run_dir) == ema_metrics(reference_run)


def test_the_emas_own_latest_saves_never_overwrite_the_ema_of_the_trainers_latest_checkpoint(
    reference_run, interrupted_run, tmp_path
):
    run_dir = copy_run(interrupted_run, tmp_path)
    # the EMA saves `latest` every epoch on its own, the checkpoint callback wrote `latest` after update 9
    # (with the EMA in its set); the EMA's later `latest` saves left that set alone
    assert load(ema_file(run_dir, 0.9, "latest"))["training_iteration"]["update"] == 9
    train(resume_config(tmp_path), resume=str(run_dir), checkpoint="latest")

    for factor in FACTORS:
        assert_identical(ema_state(run_dir, factor, "last"), ema_state(reference_run, factor, "last"))
    assert "no EMA weights" not in (run_dir / "log.txt").read_text()


def test_an_ema_of_another_iteration_is_never_loaded(reference_run, tmp_path):
    # resumed from its final checkpoint, a run trains no more and writes as `last` the EMA it started with
    run_dir = copy_run(reference_run, tmp_path)
    final_tag = tag(3, 27)
    for factor in FACTORS:
        ema_file(run_dir, factor, final_tag).unlink()
        shutil.copyfile(ema_file(run_dir, factor, tag(2, 18)), ema_file(run_dir, factor, "latest"))

    train(resume_config(tmp_path), resume=str(run_dir), checkpoint=final_tag)

    log = (run_dir / "log.txt").read_text()
    for factor in FACTORS:
        assert_identical(ema_state(run_dir, factor, "last"), live_state(run_dir, final_tag))
        looked_for = ema_file(run_dir, factor, final_tag).name
        assert (
            f"no EMA weights written at {final_tag} (looked for {looked_for}); EMA {factor} restarts from the live weights" in log
        )


def test_without_its_ema_file_one_factor_restarts_from_the_live_weights(reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    final_tag = tag(3, 27)
    ema_file(run_dir, 0.9, final_tag).unlink()

    train(resume_config(tmp_path), resume=str(run_dir), checkpoint=final_tag)

    assert_identical(ema_state(run_dir, 0.9, "last"), live_state(run_dir, final_tag))
    assert_identical(ema_state(run_dir, 0.99, "last"), ema_state(reference_run, 0.99, final_tag))
    warning = f"no EMA weights written at {final_tag} (looked for {ema_file(run_dir, 0.9, final_tag).name}); EMA 0.9 restarts"
    assert warning in (run_dir / "log.txt").read_text()


# --------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("factors", "message"),
    [([], "at least one target factor"), ([0.9, 1.0], "0 <= factor < 1"), ([0.9, 0.9], "must be distinct")],
)
def test_invalid_target_factors_are_config_errors(tmp_path, factors, message):
    tree = tiny_config(tmp_path, callbacks=[{"kind": EMA, "every_n_epochs": 1, "target_factors": factors}])
    with pytest.raises(ConfigError, match=rf"trainer\.callbacks\[0\]\.target_factors: .*{message}"):
        parse_run_config(tree)


def test_an_unknown_model_path_fails_before_training(tmp_path):
    ema = {"kind": EMA, "every_n_epochs": 1, "target_factors": FACTORS, "model_paths": ["encoder"]}
    with pytest.raises(ConfigError, match=r"model 'classifier' has no submodule 'encoder' \(its submodules: layers\)"):
        train(tiny_config(tmp_path, callbacks=[ema]))
    assert not list((tmp_path / "run").glob("checkpoints/*"))
