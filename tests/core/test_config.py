"""Config errors a user makes, each reported as one message naming the path of the bad value."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from noether.core.config import ConfigError, load_yaml
from noether.training.callbacks import OfflineLossCallbackConfig
from noether.training.run import parse_run_config, seed_everything, train
from tests.conftest import tiny_config
from tests.support.callbacks import FiringRecorderConfig, ForwardingCallbackConfig

CHECKPOINT = "noether.core.callbacks.CheckpointCallback"
OFFLINE_LOSS = "noether.training.callbacks.OfflineLossCallback"
RECORDER = "tests.support.callbacks.FiringRecorder"
FORWARDING = "tests.support.callbacks.ForwardingCallback"


def recorder(**fields) -> dict:
    return {"kind": RECORDER, "every_n_epochs": 1, **fields}


def forwarding(*nested: dict) -> dict:
    """A parent callback entry with `eval_callbacks`, like BestCheckpointCallback's."""
    return {"kind": FORWARDING, "every_n_epochs": 1, "eval_callbacks": list(nested)}


def config_with_callbacks(*callbacks: dict) -> dict:
    return tiny_config(Path("unused"), callbacks=list(callbacks))


def config_error(tree: dict) -> str:
    with pytest.raises(ConfigError) as error:
        parse_run_config(tree)
    return str(error.value)


# ----------------------------------------------------------------------------- unknown keys
def test_unknown_top_level_key_is_rejected():
    tree = config_with_callbacks()
    tree["epochs"] = 3
    assert config_error(tree) == "epochs: extra inputs are not permitted"


def test_unknown_key_of_a_callback_is_rejected_with_its_path():
    tree = config_with_callbacks(recorder(), {"kind": CHECKPOINT, "every_n_epochs": 1, "save_weigths": True})
    assert config_error(tree) == "trainer.callbacks[1].save_weigths: extra inputs are not permitted"


def test_unknown_key_of_the_model_and_of_its_optimizer_are_rejected():
    tree = config_with_callbacks()
    tree["model"]["hidden_size"] = 8
    tree["model"]["optimizer"]["momentum_typo"] = 0.9
    message = config_error(tree)
    assert "model.hidden_size: extra inputs are not permitted" in message
    assert "model.optimizer.momentum_typo: torch.optim.AdamW has no argument 'momentum_typo'" in message


def test_optimizer_kind_that_is_not_an_optimizer_names_the_kind():
    tree = config_with_callbacks()
    tree["model"]["optimizer"]["kind"] = "torch.nn.Linear"
    assert config_error(tree) == "model.optimizer.kind: 'torch.nn.Linear' is not a torch.optim.Optimizer"


# ----------------------------------------------------------------------------- kind
def test_missing_kind_is_reported_at_the_kind_key():
    tree = config_with_callbacks({"every_n_epochs": 1})
    assert config_error(tree) == "trainer.callbacks[0].kind: field required (the dotted import path of the class to build)"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("mypkg.MyCallback", "cannot import module 'mypkg'"),
        ("noether.core.callbacks.NoSuchCallback", "module 'noether.core.callbacks' has no attribute 'NoSuchCallback'"),
        ("CheckpointCallback", "'CheckpointCallback' is not a dotted import path"),
        (3, "must be a dotted import path like 'package.module.Class', not 3"),
    ],
)
def test_kind_that_cannot_be_imported_is_reported(kind, reason):
    message = config_error(config_with_callbacks({"kind": kind, "every_n_epochs": 1}))
    assert message.startswith("trainer.callbacks[0].kind: ")
    assert reason in message


@pytest.mark.parametrize(
    ("kind", "suggestion"),
    [
        ("noether.core.callbacks.BestCheckpointCalback", "noether.core.callbacks.BestCheckpointCallback"),
        ("noether.core.callbacks.checkpointcallback", "noether.core.callbacks.CheckpointCallback"),
        ("noether.core.callbacks.checkpoint.ema.EmaCallbakConfig", "noether.core.callbacks.checkpoint.ema.EmaCallbackConfig"),
        ("noether.core.callback.checkpoint.ema.EmaCallback", "noether.core.callbacks.checkpoint.ema.EmaCallback"),
    ],
)
def test_misspelt_kind_suggests_the_closest_name(kind, suggestion):
    message = config_error(config_with_callbacks({"kind": kind, "every_n_epochs": 1}))
    assert message.startswith("trainer.callbacks[0].kind: ")
    assert message.endswith(f"; did you mean {suggestion}?")


def test_kind_with_no_close_name_gets_no_suggestion():
    message = config_error(config_with_callbacks({"kind": "noether.core.callbacks.SomethingElse", "every_n_epochs": 1}))
    assert "did you mean" not in message


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("torch.nn.Linear", "'torch.nn.Linear' has no config class LinearConfig"),
        ("noether.examples.digits.DigitsDataset", "is configured by DigitsDatasetConfig, which is not a CallBackBaseConfig"),
        ("noether.core.config.build", "'noether.core.config.build' is not a class"),
        ("noether.core.callbacks.base.CallBackBaseConfig", "defines CallBackBaseConfig but no class CallBackBase"),
    ],
)
def test_kind_that_is_not_a_callback_config_is_reported(kind, reason):
    message = config_error(config_with_callbacks({"kind": kind, "every_n_epochs": 1}))
    assert message.startswith("trainer.callbacks[0].kind: ")
    assert reason in message


def test_kind_may_name_the_class_or_its_config_class():
    tree = config_with_callbacks({"kind": CHECKPOINT, "every_n_epochs": 1}, {"kind": f"{RECORDER}Config", "every_n_epochs": 1})
    callbacks = parse_run_config(tree).trainer.callbacks
    assert [type(callback).__name__ for callback in callbacks] == ["CheckpointCallbackConfig", "FiringRecorderConfig"]


# ----------------------------------------------------------------------------- values that would fail once training runs
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("seed", 2**32, "seed: input should be less than 4294967296"),
        ("seed", -1, "seed: input should be greater than or equal to 0"),
        ("device", "gpu0", "device: 'gpu0' is not a torch device (e.g. cpu, cuda, cuda:1)"),
        ("run_id", "../elsewhere", "run_id: '../elsewhere' is not a directory name (it is placed under output_path)"),
        ("run_id", "a/b", "run_id: 'a/b' is not a directory name (it is placed under output_path)"),
    ],
)
def test_top_level_value_that_would_fail_later_is_rejected(key, value, message):
    tree = config_with_callbacks()
    tree[key] = value
    assert config_error(tree) == message


@pytest.mark.parametrize("name", ["a/b", "", "a\\b"])
def test_model_name_that_cannot_name_a_file_is_rejected(name):
    tree = config_with_callbacks()
    tree["model"]["name"] = name
    assert config_error(tree).startswith(f"model.name: '{name}' cannot name checkpoint files")


def test_largest_seed_numpy_accepts_is_valid():
    tree = config_with_callbacks()
    tree["seed"] = 2**32 - 1
    seed = parse_run_config(tree).seed
    assert seed == 2**32 - 1

    seed_everything(seed)

    # every global generator now draws what a fresh generator seeded with it draws
    assert random.random() == random.Random(2**32 - 1).random()
    assert np.random.random_sample() == np.random.RandomState(2**32 - 1).random_sample()
    assert torch.initial_seed() == 2**32 - 1
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(2**32 - 1)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_rejected():
    tree = config_with_callbacks()
    tree["device"] = "cuda"
    assert config_error(tree) == "device: 'cuda': CUDA is not available on this machine"


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("lr", float("nan"), "model.optimizer.lr: input should be a finite number"),
        ("weight_decay", float("inf"), "model.optimizer.weight_decay: must be a finite number, got inf"),
        ("betas", [0.9, float("nan")], "model.optimizer.betas: must be a finite number, got [0.9, nan]"),
        (
            "betas",
            [0.9, 2.0],
            "model.optimizer: torch.optim.AdamW rejects these settings: Invalid beta parameter at index 1: 2.0",
        ),
        ("weight_decay", -1.0, "model.optimizer: torch.optim.AdamW rejects these settings: Invalid weight_decay value: -1.0"),
    ],
)
def test_optimizer_setting_torch_would_reject_is_a_config_error(setting, value, message):
    tree = config_with_callbacks()
    tree["model"]["optimizer"][setting] = value
    assert config_error(tree) == message


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("model", "optimizer", "schedule", "end_factor"), float("nan")),
        (("datasets", "train", "val_fraction"), float("nan")),
        (
            ("trainer", "callbacks"),
            [{"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [float("inf")]}],
        ),
    ],
)
def test_non_finite_number_anywhere_in_the_config_is_rejected(path, value):
    tree = config_with_callbacks()
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert "input should be a finite number" in config_error(tree)


# ----------------------------------------------------------------------------- schedules
def test_callback_without_a_schedule_is_rejected():
    message = config_error(config_with_callbacks({"kind": CHECKPOINT}))
    assert (
        message
        == "trainer.callbacks[0]: set exactly one of every_n_epochs, every_n_updates, every_n_samples, every_n_seconds (got none)"
    )


def test_callback_with_two_schedules_is_rejected():
    message = config_error(config_with_callbacks({"kind": CHECKPOINT, "every_n_epochs": 1, "every_n_updates": 10}))
    assert message == (
        "trainer.callbacks[0]: set exactly one of every_n_epochs, every_n_updates, every_n_samples, every_n_seconds "
        "(got every_n_epochs, every_n_updates)"
    )


@pytest.mark.parametrize("field", ["every_n_epochs", "every_n_updates", "every_n_samples", "every_n_seconds"])
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_interval_is_rejected(field, value):
    message = config_error(config_with_callbacks({"kind": CHECKPOINT, field: value, "batch_size": 16}))
    assert message == f"trainer.callbacks[0].{field}: input should be greater than 0"


def test_sample_interval_needs_a_batch_size():
    message = config_error(config_with_callbacks({"kind": CHECKPOINT, "every_n_samples": 1000}))
    assert message == "trainer.callbacks[0]: every_n_samples requires batch_size"


# ----------------------------------------------------------------------------- dataset keys
# (an unknown dataset key of a callback, nested or not: tests/data/test_container.py, through train)


def test_missing_dataset_key_of_a_nested_callback_is_a_required_field():
    nested = {"kind": OFFLINE_LOSS, "every_n_epochs": 1}
    tree = config_with_callbacks(recorder(), forwarding(nested))
    assert config_error(tree) == "trainer.callbacks[1].eval_callbacks[0].dataset_key: field required"


def test_several_errors_come_in_one_message():
    tree = config_with_callbacks({"kind": OFFLINE_LOSS, "every_n_epochs": 1}, {"kind": CHECKPOINT, "every_n_updates": 0})
    tree["trainer"]["max_epochs"] = "two"
    message = config_error(tree)
    assert "\n" not in message
    assert message.split("; ") == [
        "trainer.max_epochs: input should be a valid integer, unable to parse string as an integer",
        "trainer.callbacks[0].dataset_key: field required",
        "trainer.callbacks[1].every_n_updates: input should be greater than 0",
    ]


# ----------------------------------------------------------------------------- user-defined callback configs
def test_user_callback_config_is_accepted_nested_in_eval_callbacks():
    offline_loss = {"kind": OFFLINE_LOSS, "every_n_epochs": 1, "dataset_key": "val"}
    tree = config_with_callbacks(forwarding(recorder(metric="inner"), offline_loss))
    (parent,) = parse_run_config(tree).trainer.callbacks
    assert isinstance(parent, ForwardingCallbackConfig)
    recorder_config, offline_loss_config = parent.eval_callbacks
    assert isinstance(recorder_config, FiringRecorderConfig) and recorder_config.metric == "inner"
    assert isinstance(offline_loss_config, OfflineLossCallbackConfig) and offline_loss_config.dataset_key == "val"


def test_error_inside_a_nested_user_config_names_the_full_path():
    tree = config_with_callbacks(recorder(), forwarding(recorder(), recorder(metric=["not", "a", "string"])))
    assert config_error(tree) == "trainer.callbacks[1].eval_callbacks[1].metric: input should be a valid string"


def test_nested_entry_must_be_a_callback_config():
    tree = config_with_callbacks(forwarding({"kind": "noether.examples.digits.DigitsClassifier", "every_n_epochs": 1}))
    assert config_error(tree) == (
        "trainer.callbacks[0].eval_callbacks[0].kind: 'noether.examples.digits.DigitsClassifier' is configured by "
        "DigitsClassifierConfig, which is not a CallBackBaseConfig"
    )


# ----------------------------------------------------------------------------- errors come before training
def test_config_error_is_raised_before_the_run_directory_is_made(tmp_path):
    tree = tiny_config(tmp_path, callbacks=[recorder(), {"kind": OFFLINE_LOSS, "every_n_epochs": 1}])
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[1\]\.dataset_key: field required"):
        train(tree)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- files and overrides
@pytest.fixture
def config_file(write_config, tmp_path):
    callbacks = [{"kind": CHECKPOINT, "every_n_epochs": 1}, {"kind": RECORDER, "every_n_updates": 4}]
    return write_config(tiny_config(tmp_path, callbacks=callbacks))


def test_overrides_set_nested_keys_and_list_entries_with_yaml_values(config_file):
    overrides = ["trainer.max_epochs=3", "trainer.callbacks.0.every_n_epochs=2", "trainer.callbacks.1.metric=ticks"]
    overrides.append("model.optimizer.lr=1e-3")
    config = parse_run_config(load_yaml(config_file, overrides))
    assert config.trainer.max_epochs == 3
    assert config.trainer.callbacks[0].every_n_epochs == 2
    assert config.trainer.callbacks[1].metric == "ticks"
    assert config.model.optimizer.lr == 0.001


def test_override_can_add_keys_and_remove_a_value(config_file):
    tree = load_yaml(config_file, ["trainer.callbacks.1.every_n_updates=null", "trainer.callbacks.1.every_n_epochs=1", "run_id="])
    config = parse_run_config(tree)
    assert (config.trainer.callbacks[1].every_n_updates, config.trainer.callbacks[1].every_n_epochs) == (None, 1)
    assert config.run_id is None


def test_override_of_an_unknown_key_fails_validation_with_its_path(config_file):
    tree = load_yaml(config_file, ["trainer.callbacks.0.every_n_epoch=2"])
    assert config_error(tree) == "trainer.callbacks[0].every_n_epoch: extra inputs are not permitted"


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("trainer.max_epochs", "override 'trainer.max_epochs' is not of the form dotted.key=value"),
        ("=3", "override '=3' is not of the form dotted.key=value"),
        ("trainer..max_epochs=3", "override 'trainer..max_epochs=3' is not of the form dotted.key=value"),
        ("trainer.callbacks.2.every_n_epochs=1", "trainer.callbacks.2.every_n_epochs: '2' is not an index of a list of 2"),
        ("trainer.callbacks.first.every_n_epochs=1", "'first' is not an index of a list of 2"),
        ("trainer.max_epochs.value=3", "override trainer.max_epochs.value: trainer.max_epochs is not a mapping"),
        ("trainer.max_epochs.value.deeper=3", "override trainer.max_epochs.value.deeper: trainer.max_epochs is not a mapping"),
        ("trainer.callbacks=[1, 2", "override 'trainer.callbacks=[1, 2': the value is not valid YAML"),
    ],
)
def test_bad_override_is_a_config_error(config_file, override, reason):
    with pytest.raises(ConfigError) as error:
        load_yaml(config_file, [override])
    assert reason in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "absent.yaml")


def test_invalid_yaml_is_reported_on_one_line_with_its_position(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  max_epochs: [1, 2\n  callbacks: []\n")
    with pytest.raises(ConfigError) as error:
        load_yaml(path)
    message = str(error.value)
    assert message.startswith(f"config file {path} is not valid YAML: ")
    assert "line 3" in message
    assert "\n" not in message


def test_config_file_that_is_not_utf8_names_the_first_bad_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        load_yaml(path)
    assert str(error.value) == f"config file {path} is not UTF-8 text (byte 0xe9 at offset 13)"


def test_config_file_with_a_utf8_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("seed: 1\n".encode("utf-8-sig"))
    assert load_yaml(path) == {"seed": 1}


def test_config_file_must_hold_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_yaml(path)
