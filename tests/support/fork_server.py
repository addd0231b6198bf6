"""The test side of `tests/support/fork_trainer.py`: start training jobs in forked processes, learn how they ended."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT, cli_env


class ForkServer:
    """`tests/support/fork_trainer.py`: training processes forked from one that imported torch already."""

    def __init__(self, log: Path) -> None:
        # one thread per process: two cores shared by several processes would otherwise spin
        env = {**cli_env(), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fork_trainer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        self.log = log

    def start(self, tree: dict[str, Any], resume: str | None) -> int:
        self.process.stdin.write(json.dumps({"tree": tree, "resume": resume, "log": str(self.log)}) + "\n")
        self.process.stdin.flush()
        return int(self._answer("started"))

    def ended(self) -> int:
        return int(self._answer("ended"))

    def _answer(self, word: str) -> str:
        answer, value = self.process.stdout.readline().split()
        assert answer == word
        return value

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
