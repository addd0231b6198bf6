"""The run's datasets by key, and what a user sees when a callback names a dataset that is not there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from noether.core.config import ConfigError
from noether.data import DataContainer
from noether.data.container import UnknownDatasetKeyError
from noether.training.run import train
from tests.conftest import run_cli, tiny_config


def accuracy_on(dataset_key: str) -> dict[str, object]:
    return {"kind": "noether.training.callbacks.AccuracyCallback", "every_n_epochs": 1, "dataset_key": dataset_key}


def test_the_container_returns_datasets_by_key_and_names_the_known_keys_for_an_unknown_one() -> None:
    train_set, val_set = TensorDataset(torch.zeros(4)), TensorDataset(torch.ones(2))
    container = DataContainer({"train": train_set, "val": val_set})

    assert container.get("val") is val_set
    with pytest.raises(UnknownDatasetKeyError, match=r"^unknown dataset key 'vla'; known keys: train, val$"):
        container.get("vla")


def test_a_callback_on_an_unknown_dataset_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        train(tiny_config(tmp_path, callbacks=[accuracy_on("val"), accuracy_on("tset")]))
    assert str(error.value) == "trainer.callbacks[1].dataset_key: unknown dataset key 'tset'; known keys: test, train, val"
    assert not (tmp_path / "run").exists()


def test_a_nested_callback_on_an_unknown_dataset_fails_before_training(tmp_path: Path) -> None:
    parent = {
        "kind": "tests.support.data_callbacks.EventParentCallback",
        "every_n_epochs": 1,
        "eval_callbacks": [accuracy_on("tset")],
    }
    with pytest.raises(ConfigError) as error:
        train(tiny_config(tmp_path, callbacks=[parent]))
    assert (
        str(error.value)
        == "trainer.callbacks[0].eval_callbacks[0].dataset_key: unknown dataset key 'tset'; known keys: test, train, val"
    )
    assert not (tmp_path / "run").exists()


def test_the_command_line_reports_an_unknown_dataset_in_one_line(tmp_path: Path, write_config) -> None:
    config = write_config(tiny_config(tmp_path / "outputs", callbacks=[accuracy_on("tset")]))
    result = run_cli("noether-train", str(config), cwd=tmp_path, check=False)

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "noether-train: error: trainer.callbacks[0].dataset_key: unknown dataset key 'tset'; known keys: test, train, val"
    ]
    assert not (tmp_path / "outputs" / "run").exists()
