"""`noether-train` that ends itself (os._exit, as a SIGKILL would) right before its k-th file operation.

    NOETHER_CRASH_ROOT=RUN_DIR NOETHER_CRASH_AT=K python -m tests.support.crash_at CONFIG [args...]

A file operation is one that changes what is on disk under RUN_DIR: opening a file for writing,
rename/replace, link, unlink, mkdir, rmdir, a folder removal, and every fsync/syncfs (their file
cannot be told from a descriptor; only the run writes durably here). Reads are not counted. With
NOETHER_CRASH_AT=0 nothing is stopped and the count is written to NOETHER_CRASH_COUNT_FILE at exit,
so a harness can first count a run's operations, then stop it before each of them in turn.

With NOETHER_CRASH_LOG=DIR each operation done is also recorded, one JSON line in DIR/ops.jsonl written
before it runs, and what it destroys (an unlinked file, a replaced name, a truncated file, a removed
folder) is kept in DIR/stash/: tests/support/power_loss.py builds from them the states a power loss could
leave.
"""

from __future__ import annotations

import atexit
import builtins
import io
import json
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
_log_dir = os.environ.get("NOETHER_CRASH_LOG")
_log_fd: int | None = None
_link, _copyfile, _copytree = os.link, shutil.copyfile, shutil.copytree  # the originals, for the stash


def _relative(path: Any) -> str | None:
    """`path` relative to the run directory; None for a path outside it (or not a path at all)."""
    try:
        name = os.path.abspath(os.fsdecode(os.fspath(path)))
    except TypeError:
        return None
    return os.path.relpath(name, _root) if name == _root or name.startswith(_root + os.sep) else None


def _operation(kind: str, path: Any = None, **details: Any) -> int | None:
    """Count one operation (on `path`, when one is named: only those under the run directory count); stop
    before the chosen one; record the others when asked. Returns its number, None when not counted."""
    global _count
    relative = None if path is None else _relative(path)
    counted = path is None or (relative if "dest" not in details else _relative(details["dest"])) is not None
    if not counted:  # a rename or link counts by where it puts the name
        return None
    with _lock:
        _count += 1
        if _count == _kill_at:
            os._exit(KILLED)
        if _log_fd is not None:
            _record(kind, relative, path, details)
        return _count


def _run(number: int | None, original: Callable, *args: Any, **kwargs: Any) -> Any:
    """Do a counted operation; one that fails is recorded as not done."""
    try:
        return original(*args, **kwargs)
    except BaseException:
        if number is not None and _log_fd is not None:
            os.write(_log_fd, (json.dumps({"op": "failed", "number": number}) + "\n").encode())
        raise


def _record(kind: str, relative: str | None, path: Any, details: dict[str, Any]) -> None:
    entry = {"op": kind, "number": _count, "path": relative, **details}
    stash = os.path.join(_log_dir, "stash", str(_count))
    if "dest" in entry:
        entry["dest"] = _relative(entry["dest"])
    destroyed = path if kind in ("unlink", "rmtree") else details.get("dest") if kind == "rename" else None
    if kind == "open" and details["truncated"]:
        destroyed = path
    if destroyed is not None and os.path.lexists(destroyed):
        if kind == "rmtree":
            _copytree(destroyed, stash, copy_function=_link, symlinks=True)
        elif kind == "open":
            _copyfile(destroyed, stash)  # truncated in place: a link would see the truncation
        else:
            _link(destroyed, stash)
        entry["stash"] = stash
    os.write(_log_fd, (json.dumps(entry) + "\n").encode())


def _on_path(kind: str, original: Callable, argument: int = 0) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        number = None
        if kwargs.get("dir_fd") is None and len(args) > argument:
            number = _operation(kind, args[0], dest=args[1]) if argument == 1 else _operation(kind, args[0])
        return _run(number, original, *args, **kwargs)

    return wrapper


def _opened(path: Any, *, truncates: bool) -> int | None:
    """`size`: what the file holds before (kept by a power loss unless the file was truncated)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None  # a descriptor: not a path of the run
    existed = os.path.exists(path)
    size = os.path.getsize(path) if existed and not truncates else 0
    return _operation("open", path, created=not existed, truncated=existed and truncates, size=size)


def _writing_open(original: Callable) -> Callable:
    def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        number = None
        if isinstance(mode, str) and any(flag in mode for flag in "wax+"):
            number = _opened(file, truncates="w" in mode)
        return _run(number, original, file, mode, *args, **kwargs)

    return wrapper


def _writing_os_open(original: Callable) -> Callable:
    def wrapper(path: Any, flags: int, *args: Any, **kwargs: Any) -> Any:
        number = None
        if flags & _WRITE_FLAGS and kwargs.get("dir_fd") is None:
            number = _opened(path, truncates=bool(flags & os.O_TRUNC))
        return _run(number, original, path, flags, *args, **kwargs)

    return wrapper


def _fsync(original: Callable) -> Callable:
    def wrapper(fd: int) -> Any:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = None
        relative = None if path is None else _relative(path)
        _operation("fsync", None, file=relative, folder=relative is not None and os.path.isdir(path))
        return original(fd)

    return wrapper


def _syncfs(original: Callable) -> Callable:
    def wrapper(*args: Any) -> Any:
        _operation("syncfs")
        return original(*args)

    return wrapper


def install() -> None:
    global _log_fd
    if _log_dir is not None:
        os.makedirs(os.path.join(_log_dir, "stash"), exist_ok=True)
        _log_fd = os.open(os.path.join(_log_dir, "ops.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    builtins.open = io.open = _writing_open(io.open)
    os.open = _writing_os_open(os.open)
    for name in ("replace", "rename", "link"):
        setattr(os, name, _on_path("link" if name == "link" else "rename", getattr(os, name), argument=1))
    for name in ("unlink", "remove"):
        setattr(os, name, _on_path("unlink", getattr(os, name)))
    for name in ("mkdir", "rmdir"):
        setattr(os, name, _on_path(name, getattr(os, name)))
    shutil.rmtree = _on_path("rmtree", shutil.rmtree)
    os.fsync = _fsync(os.fsync)
    from noether.core import storage

    if storage._syncfs is not None:
        storage._syncfs = _syncfs(storage._syncfs)
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
