"""Where checkpoint bytes lie: the handful of file operations the checkpoint store's transactions are made of.

The store decides names, staging, commit order and recovery; a `Storage` carries out one operation at a
time on string paths and knows nothing of checkpoints. `LocalStorage` is a POSIX filesystem (atomic
writes, hard links, one `syncfs` barrier per set); `MemoryStorage` keeps files in a dict, so that the
decisions above it are tested in microseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import itertools
import os
import re
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from noether.core.run_lock import RunInUseError, RunLock

WriteBytes = Callable[[BinaryIO], Any]


class Lock(Protocol):
    def release(self) -> None: ...


class Storage(Protocol):
    """File operations on string paths. Renames and links stay within one folder's filesystem."""

    def write(self, path: str, write_bytes: WriteBytes, *, durable: bool, sync_folder: bool) -> str | None:
        """Write a file whole or not at all: `write_bytes` fills it under a temporary name that then
        replaces `path`. `durable` makes the contents survive a power loss, `sync_folder` the name.
        Returns a second name of the file it replaced, for the caller to `remove` when convenient."""

    def make_durable(self, paths: Iterable[str]) -> None:
        """Make the contents of files written with `durable=False` survive a power loss (not their names)."""

    def sync_folder(self, folder: str) -> None:
        """Make the renames and new names in `folder` survive a power loss."""

    def rename(self, source: str, target: str, *, keep_replaced: bool = False) -> str | None:
        """Move a file or folder to `target`, replacing a file or an empty folder there. With
        `keep_replaced`, returns a second name of the replaced file (see `write`)."""

    def link(self, source: str, target: str) -> None:
        """A second name of file or folder `source` (same bytes; a durable copy where links are missing)."""

    def make_folder(self, path: str) -> None:
        """Create a folder; FileExistsError if something has that name."""

    def remove(self, path: str) -> None:
        """Remove a file or a folder with everything in it; nothing happens when it is gone."""

    def list(self, folder: str) -> list[str]:
        """The names in `folder` (empty when there is no such folder)."""

    def exists(self, path: str) -> bool: ...

    def is_folder(self, path: str) -> bool: ...

    def same_file(self, first: str, second: str) -> bool:
        """Whether two names are the same bytes (a link, not a copy)."""

    def open_read(self, path: str) -> BinaryIO:
        """A file's bytes; FileNotFoundError when it is gone."""

    def local_path(self, path: str) -> str | None:
        """Where `path` lies on this machine's filesystem, for readers that need one (memory maps,
        torch.distributed.checkpoint); None when it lies elsewhere."""

    def lock(self, folder: str) -> Lock:
        """Hold `folder` for this process (RunInUseError while another live process holds it)."""


# ------------------------------------------------------------------------------------- local filesystem
# Temporary files are named ".<final name>~<host>~<pid>~<n>.tmp": the leading dot and the suffix keep
# them from being taken for checkpoints, host and pid tell whether the process that wrote one is gone.
HOST = socket.gethostname()
"""This machine's name, recorded beside process ids: a pid means something only on its own host."""
_TMP_NAME = re.compile(r"^\..+~(?P<host>[^~]+)~(?P<pid>\d+)~\d+\.tmp$")
_tmp_counter = itertools.count()


class LocalStorage:
    """A POSIX filesystem. The first write into a folder removes the temporary files that processes of
    this host, now gone, left there (only files of this module's naming pattern)."""

    def __init__(self) -> None:
        self._swept: set[str] = set()
        self._sweep_lock = threading.Lock()

    def write(self, path: str, write_bytes: WriteBytes, *, durable: bool, sync_folder: bool) -> str | None:
        folder = os.path.dirname(path)
        with self._sweep_lock:
            first = folder not in self._swept
            self._swept.add(folder)
        if first:
            _remove_stale_tmp_files(folder)
        tmp = _tmp_name(path)
        replaced = _second_name(path)
        try:
            with open(tmp, "wb") as file:
                write_bytes(file if _sync_file_range is None else _EarlyWriteback(file))
                if durable:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            for leftover in (tmp, replaced):
                if leftover is not None:
                    _unlink_quietly(leftover)
            raise
        if sync_folder:
            sync_directory(folder)
        return replaced

    def make_durable(self, paths: Iterable[str]) -> None:
        make_durable(paths)

    def sync_folder(self, folder: str) -> None:
        sync_directory(folder)

    def rename(self, source: str, target: str, *, keep_replaced: bool = False) -> str | None:
        replaced = _second_name(target) if keep_replaced else None
        try:
            os.replace(source, target)
        except BaseException:
            if replaced is not None:
                _unlink_quietly(replaced)
            raise
        return replaced

    def link(self, source: str, target: str) -> None:
        if not os.path.isdir(source):
            _link_or_copy(source, target)
            return
        os.mkdir(target)
        for name in os.listdir(source):
            _link_or_copy(os.path.join(source, name), os.path.join(target, name))
        sync_directory(target)

    def make_folder(self, path: str) -> None:
        os.mkdir(path)

    def remove(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            # out of sight first: a stop during the removal leaves a hidden temporary folder (swept by the
            # next write into this folder), never a folder under its own name with some of its files gone
            hidden = _tmp_name(path)
            try:
                os.rename(path, hidden)
            except OSError:
                hidden = path
            shutil.rmtree(hidden, ignore_errors=True)
        else:
            _unlink_quietly(path)

    def list(self, folder: str) -> list[str]:
        try:
            return os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def is_folder(self, path: str) -> bool:
        return os.path.isdir(path)

    def same_file(self, first: str, second: str) -> bool:
        try:
            return os.path.samefile(first, second)
        except FileNotFoundError:
            return False

    def open_read(self, path: str) -> BinaryIO:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it

    def local_path(self, path: str) -> str | None:
        return path

    def lock(self, folder: str) -> Lock:
        lock = RunLock(Path(folder))
        lock.acquire()
        return lock


def make_durable(paths: Iterable[str | os.PathLike]) -> None:
    """Make the contents of files durable, in one barrier where possible: files on one filesystem share a
    single `syncfs` (Linux), about one journal commit instead of one per file; elsewhere each file is
    fsync'ed. Their names are not covered: rename them into place, then `sync_directory`."""
    descriptors = []
    try:
        for path in dict.fromkeys(paths):
            descriptors.append(os.open(path, os.O_RDONLY))
        if len(descriptors) > 1 and _syncfs is not None and len({os.fstat(fd).st_dev for fd in descriptors}) == 1:
            if _syncfs(descriptors[0]) == 0:
                return
        for fd in descriptors:
            os.fsync(fd)
    finally:
        for fd in descriptors:
            os.close(fd)


def sync_directory(directory: str | os.PathLike) -> None:
    """Make the renames and new names in `directory` durable (a no-op where folders cannot be fsync'ed)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _linux_libc_call(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """A libc function that Python's os module lacks, returning an int; None off Linux or where libc has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


_syncfs = _linux_libc_call("syncfs", [ctypes.c_int])
_sync_file_range = _linux_libc_call("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages, do not wait for them
_WRITEBACK_CHUNK = 8 << 20


class _EarlyWriteback:
    """The file a write goes into: every 8 MB it asks the kernel to start writing what came so far to
    disk, so that the disk works while the rest is serialized and the closing fsync waits only for the
    tail. Left to itself the kernel starts writing only at its dirty-memory threshold, often after a
    whole checkpoint; a 1.2 GB checkpoint then took write + fsync in series (about 4.5 s on the
    project's VMs against about 3.4 s overlapped). A hint only: errors surface in the fsync."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._fd = file.fileno()
        self._written = 0
        self._writeback_started = 0

    def write(self, data: Any) -> int:
        written = self._file.write(data)
        self._written += written
        pending = self._written - self._writeback_started
        if pending >= _WRITEBACK_CHUNK:
            self._file.flush()
            _sync_file_range(self._fd, self._writeback_started, pending, _SYNC_FILE_RANGE_WRITE)
            self._writeback_started = self._written
        return written

    def flush(self) -> None:
        self._file.flush()


_FREE_LATER_BYTES = 16 << 20
"""Replaced files from this size on are freed after the commit that replaced them (see `_second_name`)."""


def _second_name(path: str) -> str | None:
    """A hidden temporary name for the file at `path`, which keeps it, and the cost of freeing its blocks
    (about 1 s per GB on a disk mounted with `discard`), alive past a rename over `path`; a crash leaves
    it to the sweep of stale temporary files. None when there is no file, no hard links, or a file under
    16 MB: freeing its blocks costs less than the link and unlink would (a stat against two writes to
    the folder, for each of the small files a checkpoint set replaces)."""
    try:
        if os.stat(path).st_size < _FREE_LATER_BYTES:
            return None
        name = _tmp_name(path)
        os.link(path, name)
    except OSError:
        return None
    return name


def _tmp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}~{HOST}~{os.getpid()}~{next(_tmp_counter)}.tmp")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links here (a missing source fails the copy too)
        shutil.copyfile(source, target)
        with open(target, "rb+") as file:
            os.fsync(file.fileno())


def _remove_stale_tmp_files(folder: str) -> None:
    """Remove temporary files (and folders being removed) that a process on this host, now gone, left behind."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # the write that follows reports the real problem
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if match and match["host"] == HOST and not process_alive(int(match["pid"])):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                _unlink_quietly(entry.path)  # another process may have removed it first


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# ------------------------------------------------------------------------------------- memory
class _Bytes:
    """One file's contents; names that share it are links."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class MemoryStorage:
    """Files in a dict, for tests of the decisions made above a storage. Folders exist explicitly
    (`make_folder`, or as the parent of a written file). Every operation is also recorded in
    `operations` as (name, path), so a test can tell what was written, linked or removed."""

    def __init__(self) -> None:
        self.files: dict[str, _Bytes] = {}
        self.folders: set[str] = {"/"}
        self.operations: list[tuple[str, str]] = []
        self._locks: set[str] = set()
        self._guard = threading.RLock()

    def write(self, path: str, write_bytes: WriteBytes, *, durable: bool, sync_folder: bool) -> str | None:
        buffer = io.BytesIO()
        write_bytes(buffer)
        with self._guard:
            self._add_folder(os.path.dirname(path))
            self.files[path] = _Bytes(buffer.getvalue())
            self.operations.append(("write", path))
        return None

    def make_durable(self, paths: Iterable[str]) -> None:
        for path in paths:
            if path not in self.files:
                raise FileNotFoundError(2, "No such file or directory", path)

    def sync_folder(self, folder: str) -> None:
        pass

    def rename(self, source: str, target: str, *, keep_replaced: bool = False) -> str | None:
        with self._guard:
            if not self._exists(source):
                raise FileNotFoundError(2, "No such file or directory", source)
            if self.list(target):
                raise OSError(39, "Directory not empty", target)
            self._remove(target)
            for old, new in self._below(source, target):
                if old in self.folders:
                    self.folders.discard(old)
                    self.folders.add(new)
                else:
                    self.files[new] = self.files.pop(old)
            self.operations.append(("rename", target))
        return None

    def link(self, source: str, target: str) -> None:
        with self._guard:
            if not self._exists(source):
                raise FileNotFoundError(2, "No such file or directory", source)
            if self._exists(target):
                raise FileExistsError(17, "File exists", target)
            for old, new in self._below(source, target):
                if old in self.folders:
                    self.folders.add(new)
                else:
                    self.files[new] = self.files[old]
            self.operations.append(("link", target))

    def make_folder(self, path: str) -> None:
        with self._guard:
            if self._exists(path):
                raise FileExistsError(17, "File exists", path)
            self._add_folder(path)

    def remove(self, path: str) -> None:
        with self._guard:
            if self._exists(path):
                self.operations.append(("remove", path))
            self._remove(path)

    def list(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        with self._guard:
            names = {path[len(prefix) :].split("/", 1)[0] for path in (*self.files, *self.folders) if path.startswith(prefix)}
        return sorted(name for name in names if name)

    def exists(self, path: str) -> bool:
        with self._guard:
            return self._exists(path)

    def is_folder(self, path: str) -> bool:
        return path in self.folders

    def same_file(self, first: str, second: str) -> bool:
        with self._guard:
            return first in self.files and self.files.get(second) is self.files[first]

    def open_read(self, path: str) -> BinaryIO:
        with self._guard:
            if path not in self.files:
                raise FileNotFoundError(2, "No such file or directory", path)
            return io.BytesIO(self.files[path].data)

    def local_path(self, path: str) -> str | None:
        return None

    def lock(self, folder: str) -> Lock:
        with self._guard:
            if folder in self._locks:
                raise RunInUseError(f"{folder} is in use by this process")
            self._locks.add(folder)
        return _MemoryLock(self._locks, folder)

    def _exists(self, path: str) -> bool:
        return path in self.files or path in self.folders

    def _below(self, source: str, target: str) -> list[tuple[str, str]]:
        """(old, new) for `source` and, for a folder, everything in it."""
        inside = [path for path in (*self.files, *self.folders) if path.startswith(source + "/")]
        return [(source, target), *((path, target + path[len(source) :]) for path in inside)]

    def _remove(self, path: str) -> None:
        self.files.pop(path, None)
        self.folders.discard(path)
        for inside in [p for p in (*self.files, *self.folders) if p.startswith(path + "/")]:
            self.files.pop(inside, None)
            self.folders.discard(inside)

    def _add_folder(self, path: str) -> None:
        while path not in self.folders and path not in ("", "/"):
            self.folders.add(path)
            path = os.path.dirname(path)


class _MemoryLock:
    def __init__(self, held: set[str], folder: str) -> None:
        self._held, self._folder = held, folder

    def release(self) -> None:
        self._held.discard(self._folder)
