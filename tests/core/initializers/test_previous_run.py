"""PreviousRunInitializer: a run starts from the weights or EMA weights of an earlier run, once."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from noether.core.config import ConfigError
from noether.core.models.base import apply_initializers, build_model
from noether.core.providers.path import PathProvider
from noether.training.run import parse_run_config, train
from tests.conftest import run_cli, tiny_config
from tests.support.checkpoints import checkpoint_path
from tests.support.models import composite_model_config

INITIALIZER = "noether.core.initializers.PreviousRunInitializer"
RECORDER = {"kind": "tests.support.callbacks.StartingWeightsRecorder"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished run with an EMA, its weights at hidden width 32."""
    tree = tiny_config(
        tmp_path_factory.mktemp("source"),
        callbacks=[
            {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9]},
            {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1},
        ],
    )
    tree["run_id"] = "source"
    tree["model"]["hidden_dim"] = 32
    return train(tree)


def fine_tune_tree(source, output_path: Path, **initializer: Any) -> dict[str, Any]:
    tree = tiny_config(
        output_path, callbacks=[RECORDER, {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_updates": 4}]
    )
    tree["model"]["hidden_dim"] = 32
    tree["model"]["initializers"] = [
        {"kind": INITIALIZER, "run_id": str(source.run_dir), "model_name": "classifier", "checkpoint_tag": "last", **initializer}
    ]
    return tree


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_a_run_starts_from_an_ema_of_an_earlier_run_bit_for_bit_and_a_resume_does_not_reapply_it(source, tmp_path):
    tree = fine_tune_tree(source, tmp_path, model_info="ema=0.9")
    tree["trainer"]["callbacks"].append(
        {"kind": "tests.support.interrupting.SignalSelfCallback", "at_update": 8, "signal_name": "SIGTERM"}
    )
    paths = train(tree)
    ema = load_weights(checkpoint_path(source, "classifier", "last", "model", ema_factor=0.9))
    assert_identical(torch.load(paths.run_dir / "starting_weights.0.pt", weights_only=True), ema)

    tree["trainer"]["callbacks"].pop()
    train(tree, resume=str(paths.run_dir))

    interrupted = load_weights(checkpoint_path(paths, "classifier", "E0_U8_S1024.signal_interrupt", "model"))
    assert_identical(torch.load(paths.run_dir / "starting_weights.1.pt", weights_only=True), interrupted)


def test_keys_are_filtered_and_renamed_into_a_submodel_of_a_composite(source, tmp_path):
    """The middle layer (32 -> 32) of the source classifier becomes the encoder of a composite."""
    model_tree = composite_model_config()
    model_tree["encoder"]["initializers"] = [
        {
            "kind": INITIALIZER,
            "run_id": "source",
            "model_name": "classifier",
            "checkpoint_tag": "last",
            "patterns_to_remove": ["layers.0.", "layers.6."],
            "patterns_to_rename": [{"src": "layers.3.", "dst": "linear."}],
        }
    ]
    config = parse_run_config({**tiny_config(tmp_path), "model": model_tree})
    model = build_model(config.model)
    head_before = {key: value.clone() for key, value in model.head.state_dict().items()}

    apply_initializers(model, source.output_path)

    trained = load_weights(checkpoint_path(source, "classifier", "last", "model"))
    assert torch.equal(model.encoder.linear.weight, trained["layers.3.weight"])
    assert torch.equal(model.encoder.linear.bias, trained["layers.3.bias"])
    assert_identical(model.head.state_dict(), head_before)


@pytest.mark.parametrize(
    ("initializer", "message"),
    [
        ({"run_id": "nowhere"}, r"initializers\[0\]: run_id: unknown run 'nowhere'"),
        (
            {"checkpoint_tag": "best"},
            "checkpoint 'best' of classifier in run .* does not exist; its checkpoints of that model: E1_U9_S1152, E2_U18_S2304, last",
        ),
        (
            {"model_info": "ema=0.5"},
            r"checkpoint 'last' of classifier \(ema=0.5\) .* does not exist; that checkpoint holds weights of: classifier, classifier \(ema=0.9\)",
        ),
        ({"model_info": "average"}, r"model_info: .*expected 'ema=<factor>'"),
        ({"keys_to_remove": ["layers.6.bias"]}, "does not fit the model: missing keys layers.6.bias"),
        (
            {"patterns_to_rename": [{"src": "layers.", "dst": "blocks."}]},
            "missing keys layers.0.weight, layers.0.bias, layers.3.weight ...; unexpected keys blocks.0.weight",
        ),
    ],
    ids=["unknown-run", "unknown-tag", "unknown-ema", "bad-model-info", "missing-key", "renamed-away"],
)
def test_an_initializer_that_does_not_fit_is_one_line_before_training(source, tmp_path, write_config, initializer, message):
    """The fine-tuning run lies next to its source run, in an output path of its own: a copy of the
    source run (the module's tests share the source itself)."""
    outputs = tmp_path / "outputs"
    shutil.copytree(source.run_dir, outputs / source.run_id)
    copied_source = PathProvider(outputs, source.run_id)
    tree = fine_tune_tree(copied_source, outputs, **initializer)
    tree["run_id"] = "fine-tune"
    result = run_cli("noether-train", str(write_config(tree)), cwd=tmp_path, check=False)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert re.search(message, line), line
    assert not (outputs / "fine-tune" / "starting_weights.0.pt").exists()


def test_a_shape_mismatch_names_the_key(source, tmp_path):
    tree = fine_tune_tree(source, tmp_path)
    tree["model"]["hidden_dim"] = 16
    with pytest.raises(ConfigError, match=r"shape mismatch \(checkpoint vs model\) layers\.0\.weight \[32, 64\] vs \[16, 64\]"):
        train(tree)
