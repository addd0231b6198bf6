"""One process group owns a run directory at a time.

The owner holds an exclusive `flock` on `{run_dir}/.lock`: the kernel (or the NFS server's lease)
releases it when the process dies however it dies, so a lock left by a killed process or a lost
node never blocks the next start, and there is no stale-lock guessing.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class RunInUseError(Exception):
    """Another live process is writing this run."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self) -> None:
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "another process"
            file.close()
            run_dir = self.path.parent
            raise RunInUseError(
                f"run '{run_dir.name}' ({run_dir}) is in use by {owner}; wait for it to end or pick another run_id"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {socket.gethostname()}")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
