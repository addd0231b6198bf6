"""Shared helpers: a tiny version of the bundled example, trained in-process or as a subprocess."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests stop runs with Ctrl-C (SIGINT) as a user at a terminal would. A test process started in the
# background inherits SIGINT ignored, which the trainer rightly keeps ignored (and so would every
# training subprocess): restore the terminal's default here.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"


def tiny_config(output_path: Path, **trainer_overrides: Any) -> dict[str, Any]:
    """The quickstart config shrunk to seconds: small model, few epochs, no callbacks or trackers unless given."""
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["output_path"] = str(output_path)
    tree["run_id"] = "run"
    tree["trackers"] = []
    tree["model"]["hidden_dim"] = 16
    tree["trainer"].update({"max_epochs": 2, "effective_batch_size": 128, "callbacks": []})
    tree["trainer"].update(trainer_overrides)
    return copy.deepcopy(tree)


def cli_env() -> dict[str, str]:
    """Environment for command-line subprocesses: the repo root importable, so `kind: tests.support...` works."""
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def cli_command(name: str) -> str:
    """The installed console script (`noether-train`, `noether-eval`) of this interpreter's environment."""
    return str(Path(sys.executable).parent / name)


def run_cli(name: str, *args: str, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script as a real subprocess and return its result."""
    result = subprocess.run([cli_command(name), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"command failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def write_config(tmp_path: Path):
    def write(tree: dict[str, Any], name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tree))
        return path

    return write


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 for one test module, its endpoint and credentials in the environment
    (imported here: moto is a test extra that GPU checks without it never need)."""
    from tests.support.s3 import S3Server

    server = S3Server()
    with server.environment():
        yield server
    server.stop()
