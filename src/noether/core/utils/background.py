"""Threads that upload beside training give it the CPU first.

The checkpoint writer keeps its priority: starved by a busy training loop it would leave a checkpoint
undurable until the next save (with a niced writer, the SIGKILL test's children, saving in a tight
loop, wrote 9 checkpoints in its windows where the test needs 17)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable

BACKGROUND_NICENESS = 19
"""The lowest priority: such a thread runs on what training leaves idle. Where that is too little, its
queue fills and training waits for it (the upload queue's bound on sets), so nothing is lost, only
delayed."""


def yield_cpu() -> None:
    """Lowest CPU priority for the calling thread: on Linux a thread's nice value is its own; elsewhere
    it is the process's, which stays as it is. Where a sandbox refuses the call the thread works at the
    priority it has: slower training beats a thread that never starts."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


def in_background(work: Callable[[], None]) -> Callable[[], None]:
    """`work` as a thread's target that first yields the CPU."""

    def run() -> None:
        yield_cpu()
        work()

    return run
