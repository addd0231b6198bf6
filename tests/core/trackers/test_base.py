"""Tracker configs: resolved by `kind`, checked before training; a missing extra names what to install."""

from __future__ import annotations

import os
import subprocess

import pytest

from noether.core.config import ConfigError
from noether.core.trackers import MlflowTrackerConfig, TensorBoardTrackerConfig, WandbTrackerConfig
from noether.training.run import parse_run_config
from tests.conftest import REPO_ROOT, cli_command, cli_env, tiny_config

# a `sitecustomize` runs at interpreter start: this one makes importing one package fail, as if not installed
IMPORT_BLOCKER = """
import sys


class BlockImport:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {package!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, BlockImport())
"""


def test_tracker_kinds_resolve_to_their_configs(tmp_path):
    tree = tiny_config(tmp_path)
    tree["trackers"] = [
        {"kind": "noether.core.trackers.TensorBoardTracker"},
        {"kind": "noether.core.trackers.WandbTracker", "project": "p", "mode": "offline"},
        {"kind": "noether.core.trackers.MlflowTracker", "tracking_uri": "sqlite:///x.db"},
    ]
    trackers = parse_run_config(tree).trackers

    assert [type(tracker) for tracker in trackers] == [TensorBoardTrackerConfig, WandbTrackerConfig, MlflowTrackerConfig]
    assert trackers[1].mode == "offline" and trackers[2].experiment_name == "noether"


def test_a_wrong_tracker_option_is_a_config_error_naming_its_path(tmp_path):
    tree = tiny_config(tmp_path)
    tree["trackers"] = [
        {"kind": "noether.core.trackers.TensorBoardTracker"},
        {"kind": "noether.core.trackers.WandbTracker", "mode": "online-ish"},
    ]

    with pytest.raises(ConfigError, match=r"trackers\[1\]\.mode: input should be 'online', 'offline' or 'disabled'"):
        parse_run_config(tree)


@pytest.mark.parametrize(("package", "tracker"), [("wandb", "WandbTracker"), ("mlflow", "MlflowTracker")])
def test_a_tracker_whose_extra_is_missing_stops_the_command_before_training_naming_the_extra(
    tmp_path, write_config, package, tracker
):
    blocker_dir = tmp_path / "blocker"
    blocker_dir.mkdir()
    (blocker_dir / "sitecustomize.py").write_text(IMPORT_BLOCKER.format(package=package))
    tree = tiny_config(tmp_path / "outputs")
    tree["trackers"] = [{"kind": "noether.core.trackers.TensorBoardTracker"}, {"kind": f"noether.core.trackers.{tracker}"}]
    config = write_config(tree)
    env = cli_env()
    env["PYTHONPATH"] = f"{blocker_dir}{os.pathsep}{REPO_ROOT}"

    result = subprocess.run(
        [cli_command("noether-train"), str(config)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"noether-train: error: trackers[1]: needs the optional package '{package}' (No module named '{package}'): "
        f"pip install noether-trainkit[{package}]\n"
    )
    assert not (tmp_path / "outputs").exists()  # nothing started
