"""The states a power loss may leave, built from a run's recorded file operations (tests/support/crash_at.py
with NOETHER_CRASH_LOG) and the directory the run left when it stopped.

The model is POSIX's: what an fsync (of the file, or of its folder for its name) or a syncfs made durable
stays; anything else may be lost. Two states per stop point:

- `data`: every file keeps its name, but the bytes written since it was last made durable are gone (a
  new file is empty, an appended one is cut back, a rewritten one holds its old bytes): what a file
  system that commits names before data (ext4 in writeback mode, delayed allocation) can leave.
- `names`: the same data loss, and every name operation not yet durable undone, newest first (created
  files and folders gone, renames, links and removals reverted): a journal that never committed them.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATES = ("data", "names")


@dataclass
class _Replay:
    """Where each name's file stands after the recorded operations: which files are not durable (and what
    of them is), which name operations are not (and in which folders they still wait for an fsync)."""

    names: dict[str, int] = field(default_factory=dict)  # path -> file identity (hard links share one)
    durable_content: dict[int, tuple[str, Any]] = field(default_factory=dict)  # not durable: ("size", n) | ("stash", path)
    pending: list[tuple[dict[str, Any], set[str]]] = field(default_factory=list)  # name operations, their folders
    _ids: itertools.count = field(default_factory=itertools.count)

    def identity(self, path: str) -> int:
        return self.names.setdefault(path, next(self._ids))

    def apply(self, op: dict[str, Any]) -> None:
        kind, path = op["op"], op.get("path")
        if kind == "syncfs":
            self.durable_content.clear()
            self.pending.clear()
        elif kind == "fsync":
            self._fsync(op)
        elif kind == "open":
            self._open(op, path)
        elif kind in ("rename", "link"):  # from outside the run directory (path None): a file now durable
            moved = self.names.pop(path) if kind == "rename" and path in self.names else None
            self.names[op["dest"]] = next(self._ids) if path is None else moved if moved is not None else self.identity(path)
            self._name_changed(op, *([op["dest"]] if kind == "link" or path is None else [path, op["dest"]]))
        elif kind in ("unlink", "rmtree"):
            for name in [n for n in self.names if n == path or n.startswith(path + os.sep)]:
                del self.names[name]
            self._name_changed(op, path)
        elif kind in ("mkdir", "rmdir"):
            self._name_changed(op, path)

    def _fsync(self, op: dict[str, Any]) -> None:
        path = op["file"]
        if path is None:
            return
        if op["folder"]:
            for _, folders in self.pending:
                folders.discard(path)
            self.pending = [(entry, folders) for entry, folders in self.pending if folders]
        elif path in self.names:
            self.durable_content.pop(self.names[path], None)

    def _open(self, op: dict[str, Any], path: str) -> None:
        if op["created"]:
            self.names[path] = next(self._ids)
            self._name_changed(op, path)
        identity = self.identity(path)
        if op["truncated"] and "stash" in op:
            self.durable_content.setdefault(identity, ("stash", op["stash"]))
        elif op["created"] or op["truncated"]:
            self.durable_content.setdefault(identity, ("size", 0))
        else:  # appended to, or opened to be read and written: what it held before is not at risk here
            self.durable_content.setdefault(identity, ("size", op["size"]))

    def _name_changed(self, op: dict[str, Any], *paths: str) -> None:
        self.pending.append((op, {os.path.dirname(path) for path in paths}))


def recorded_operations(log_dir: Path) -> list[dict[str, Any]]:
    """The operations done before the stop (not those that failed); a line cut by the stop is not one."""
    operations = []
    for line in (log_dir / "ops.jsonl").read_text().splitlines():
        try:
            operations.append(json.loads(line))
        except json.JSONDecodeError:
            break
    failed = {op["number"] for op in operations if op["op"] == "failed"}
    return [op for op in operations if op["op"] != "failed" and op["number"] not in failed]


def build(state: str, run_dir: Path, log_dir: Path) -> int:
    """Turn `run_dir` (as the stopped run left it) into power-loss state `state`; returns how many
    recorded operations were not durable (lost data of a file, or a name operation)."""
    replay = _Replay()
    for op in recorded_operations(log_dir):
        replay.apply(op)
    for path, identity in replay.names.items():
        if identity in replay.durable_content:
            _lose_data(run_dir / path, replay.durable_content[identity])
    lost_data = sum(1 for identity in set(replay.names.values()) if identity in replay.durable_content)
    if state == "data":
        return lost_data
    for op, _ in reversed(replay.pending):
        _undo(op, run_dir)
    return lost_data + len(replay.pending)


def _lose_data(path: Path, durable: tuple[str, Any]) -> None:
    if not path.is_file():
        return
    kind, value = durable
    if kind == "stash":
        content = Path(value).read_bytes()
        with open(path, "r+b") as file:  # in place: every hard link of the file sees it
            file.truncate(0)
            file.write(content)
    elif path.stat().st_size > value:
        os.truncate(path, value)


def _undo(op: dict[str, Any], run_dir: Path) -> None:
    kind, stash = op["op"], op.get("stash")
    path = None if op["path"] is None else run_dir / op["path"]
    dest = None if op.get("dest") is None else run_dir / op["dest"]
    if kind == "open":
        _remove_file(path)
    elif kind in ("rename", "link"):
        if kind == "rename" and path is not None and dest.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(dest, path)
        else:  # a second name, or a file moved in from outside the run
            _remove_file(dest)
        if stash is not None and not dest.exists():  # the file the rename replaced
            os.link(stash, dest)
    elif kind == "unlink" and stash is not None and not path.exists():
        os.link(stash, path)
    elif kind == "mkdir" and path.is_dir():
        shutil.rmtree(path)
    elif kind == "rmdir" and not path.exists():
        path.mkdir()
    elif kind == "rmtree" and stash is not None:  # what is gone of the folder (its closing rmdir's undo made it again)
        shutil.copytree(stash, path, copy_function=_link_if_missing, symlinks=True, dirs_exist_ok=True)


def _remove_file(path: Path) -> None:
    if path.is_file() or path.is_symlink():
        path.unlink()


def _link_if_missing(source: str, target: str) -> None:
    if not os.path.lexists(target):
        os.link(source, target)
