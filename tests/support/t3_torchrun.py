"""`noether-train` under torchrun (two CPU processes, gloo) with extra environment variables, for tests
whose runs need some (trackers' offline settings), and reading what such a run printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import cli_command, cli_env

TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN_TIMEOUT_SECONDS = 180


def run_torchrun(config: Path, *args: str, env: dict[str, str] | None = None, processes: int = 2) -> subprocess.CompletedProcess:
    """A finished run of `processes` processes on this machine; one that hangs fails the test after the timeout
    (stopped as a scheduler would: SIGTERM to torchrun, which passes it on, then SIGKILL)."""
    launch = ["--standalone", "--nproc_per_node", str(processes), "--no-python"]
    command = [str(TORCHRUN), *launch, cli_command("noether-train"), str(config), *args]
    process = subprocess.Popen(
        command,
        cwd=config.parent,
        env={**cli_env(), "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        raise AssertionError(f"torchrun did not finish within {RUN_TIMEOUT_SECONDS} s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
