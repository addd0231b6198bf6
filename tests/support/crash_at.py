"""`noether-train` that ends itself (os._exit, as a SIGKILL would) right before its k-th file operation.

    NOETHER_CRASH_ROOT=RUN_DIR NOETHER_CRASH_AT=K python -m tests.support.crash_at CONFIG [args...]

A file operation is one that changes what is on disk under RUN_DIR: opening a file for writing,
rename/replace, link, unlink, mkdir, rmdir, a folder removal, and every fsync/syncfs (their file
cannot be told from a descriptor; only the run writes durably here). Reads are not counted. With
NOETHER_CRASH_AT=0 nothing is stopped and the count is written to NOETHER_CRASH_COUNT_FILE at exit,
so a harness can first count a run's operations, then stop it before each of them in turn.
"""

from __future__ import annotations

import atexit
import builtins
import io
import os
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any

KILLED = 137  # the exit code of a SIGKILL'ed process, which this stands for
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_lock = threading.Lock()
_count = 0
_root = os.path.abspath(os.environ["NOETHER_CRASH_ROOT"])
_kill_at = int(os.environ.get("NOETHER_CRASH_AT", "0"))


def _inside(path: Any) -> bool:
    try:
        name = os.fsdecode(os.fspath(path))
    except TypeError:
        return False
    return os.path.abspath(name).startswith(_root)


def _operation(path: Any = None) -> None:
    """Count one operation (on `path`, when one is named: only those under the run directory count)."""
    global _count
    if path is not None and not _inside(path):
        return
    with _lock:
        _count += 1
        reached = _count == _kill_at
    if reached:
        os._exit(KILLED)


def _on_path(original: Callable, argument: int = 0) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("dir_fd") is None and len(args) > argument:
            _operation(args[argument])
        return original(*args, **kwargs)

    return wrapper


def _writing_open(original: Callable) -> Callable:
    def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(mode, str) and any(flag in mode for flag in "wax+"):
            _operation(file)
        return original(file, mode, *args, **kwargs)

    return wrapper


def _writing_os_open(original: Callable) -> Callable:
    def wrapper(path: Any, flags: int, *args: Any, **kwargs: Any) -> Any:
        if flags & _WRITE_FLAGS and kwargs.get("dir_fd") is None:
            _operation(path)
        return original(path, flags, *args, **kwargs)

    return wrapper


def _any_call(original: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _operation()
        return original(*args, **kwargs)

    return wrapper


def install() -> None:
    builtins.open = io.open = _writing_open(io.open)
    os.open = _writing_os_open(os.open)
    for name in ("replace", "rename", "link"):
        setattr(os, name, _on_path(getattr(os, name), argument=1))
    for name in ("unlink", "remove", "mkdir", "rmdir"):
        setattr(os, name, _on_path(getattr(os, name)))
    shutil.rmtree = _on_path(shutil.rmtree)
    os.fsync = _any_call(os.fsync)
    from noether.core import storage

    if storage._syncfs is not None:
        storage._syncfs = _any_call(storage._syncfs)
    count_file = os.environ.get("NOETHER_CRASH_COUNT_FILE")
    if count_file:
        atexit.register(lambda: _write_count(count_file))


def _write_count(count_file: str) -> None:
    with open(count_file, "w") as file:  # counted as a run operation only if it lay in the run directory
        file.write(str(_count))


if __name__ == "__main__":
    install()
    from noether.cli import train_main

    sys.exit(train_main(sys.argv[1:]))
