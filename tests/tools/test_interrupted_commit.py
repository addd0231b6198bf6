"""`noether-ckpt verify` on a run killed in the middle of a set's commit: an interrupted commit that the next start
completes (its own line and exit code 3), not a corrupt checkpoint."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from noether.core.checkpoint_store import CheckpointStore
from noether.tools.checkpoints import verify_checkpoints
from tests.conftest import cli_env, run_cli
from tests.tools._kill_mid_commit import NEW_ITERATION

KILL_MID_COMMIT = Path(__file__).with_name("_kill_mid_commit.py")


def test_a_set_killed_mid_commit_is_reported_as_interrupted_and_the_next_start_completes_it(full_run, tmp_path):
    run_dir = tmp_path / full_run.run_id
    shutil.copytree(full_run.run_dir, run_dir)
    checkpoints = run_dir / "checkpoints"
    killed = subprocess.run(
        [sys.executable, str(KILL_MID_COMMIT), str(checkpoints), full_run.run_id], env=cli_env(), capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list(checkpoints.glob(".classifier*_cp=latest_*.th~*.staged"))) == 3  # one of the set's 4 files moved

    result = run_cli("noether-ckpt", "verify", str(run_dir), cwd=tmp_path, check=False)

    assert result.returncode == 3, result.stdout
    assert result.stdout.splitlines() == [
        f"latest: interrupted commit of the set of {NEW_ITERATION} (1 of 5 files moved into place, the rest staged): "
        "the next start of the run completes it",
        "ok: all 19 files of 7 checkpoints load and agree, "
        "apart from the 1 interrupted commit(s) above (the next start completes them)",
    ]
    store = CheckpointStore(checkpoints, full_run.run_id)
    assert store.recover() == [f"completed checkpoint set 'latest' of {NEW_ITERATION}, whose commit a stop had interrupted"]
    assert verify_checkpoints(store) == ([], [], [])
    assert store.iteration("latest") == NEW_ITERATION and store.info("latest").resumable
