"""Crash-safe, asynchronous checkpoint files.

A checkpoint only ever appears under its final name complete: it is written to a hidden temporary
file in the same directory, fsync'ed, and renamed over the final name. A crash (even SIGKILL) at any
moment therefore leaves either the previous file or the new one, never a torn one.

By default the training loop only pays for copying the tensors into reusable host buffers (for a
payload of at most 1 MB of CPU tensors: for serializing it); the serialization and the disk write
happen on a background thread. Where the bytes go is the writer's `Storage` (the local filesystem
unless told otherwise). Every file's content hash (xxh3-64) is computed from the bytes as they are
written, not by reading the file again: `digests` holds it by path once the write is done.

A set of files can share one durability barrier instead of one fsync each: write them with
``save(..., fsync=False)`` under names that nothing reads yet, call the storage's ``make_durable`` on
all of them, then rename them into place and sync their folder.

The files are torch.save zip archives without CRC32 checksums (computing them took half of the
write time): ``torch.load`` reads them, but tools such as ``unzip -t`` report checksum errors.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import copy
import io
import math
import mmap
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import SimpleQueue
from typing import Any, BinaryIO

import torch
import xxhash

from noether.core.storage import LocalStorage, Storage

__all__ = ["CheckpointLoadError", "CheckpointWriteError", "CheckpointWriter", "load_checkpoint"]

# How many distinct payload structures (e.g. model weights, optimizer state) keep their host
# buffers; older ones are dropped so that a payload whose shapes keep changing cannot pile up memory.
_POOL_STRUCTURES = 8

_ZIP_MAGIC = b"PK\x03\x04"

_BUFFER_ALIGNMENT = 64  # bytes: a cache line, and enough for every dtype's alignment

# A payload with at most this many bytes of CPU tensors is serialized by `save` itself and the writer
# thread only writes the bytes. torch.save pickles in Python, holding the GIL: on the writer thread
# that work runs by turns with the training loop's own Python anyway, and for small payloads (model
# and optimizer state of small models, trainer state) it costs about what the snapshot copy and its
# bookkeeping cost. Larger payloads are copied into reused buffers and serialized on the writer thread.
_SERIALIZED_HERE_BYTES = 1 << 20


class CheckpointLoadError(Exception):
    """A checkpoint file is missing, damaged, or not a plain tensor checkpoint."""


class CheckpointWriteError(Exception):
    """A checkpoint could not be written; the previous file under that name, if any, is intact."""


def load_checkpoint(path: str | os.PathLike, open_read: Callable[[str], BinaryIO] | None = None) -> dict:
    """Loads a checkpoint onto the CPU without executing pickled code (from `open_read(path)`, a
    storage's reader, when given).

    Every failure is reported as a CheckpointLoadError with a one-line message naming the file, so
    that a resume from a bad file fails with a clear reason instead of a deep torch traceback.
    """
    path = Path(path)
    open_read = open_read or _open_file
    try:
        with open_read(str(path)) as file:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointLoadError(f"checkpoint file not found: {path}") from None
    except (PermissionError, IsADirectoryError) as e:
        raise CheckpointLoadError(f"cannot read checkpoint file {path}: {e.strerror}") from e
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) or _is_unparsable(str(e)):
            raise CheckpointLoadError(_unreadable_reason(path, open_read)) from e
        raise CheckpointLoadError(
            f"refusing to load {path}: it is not a plain tensor checkpoint "
            f"(weights_only=True rejected it: {_weights_only_reason(str(e))})"
        ) from e
    except Exception as e:
        raise CheckpointLoadError(_unreadable_reason(path, open_read)) from e
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(f"refusing to load {path}: it holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _open_file(path: str) -> BinaryIO:
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def _unreadable_reason(path: Path, open_read: Callable[[str], BinaryIO]) -> str:
    """Tells a damaged checkpoint (a zip archive, possibly cut short) from a file of another kind."""
    try:
        with open_read(str(path)) as f:
            header = f.read(len(_ZIP_MAGIC))
    except OSError as e:
        return f"cannot read checkpoint file {path}: {e.strerror}"
    if _ZIP_MAGIC.startswith(header):
        return f"checkpoint file is truncated or corrupt: {path}"
    return f"corrupt or not a torch checkpoint file (no zip archive): {path}"


def _is_unparsable(message: str) -> bool:
    """Whether weights_only failed on bytes that are no valid pickle at all (damage, or another kind of file),
    rather than on a well-formed pickle that asks for code it will not run."""
    reason = _weights_only_reason(message)
    return reason.startswith(("Unsupported operand", "String is too long"))


def _weights_only_reason(message: str) -> str:
    """Picks the one sentence that says what was refused out of torch's multi-paragraph message."""
    _, marker, rest = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else message).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else "unknown reason"


class _BufferSet:
    """Host tensors that receive one snapshot; busy while a write of that snapshot is pending."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.busy = True


class CheckpointWriter:
    """Writes checkpoint payloads (nested dicts/lists/tuples of tensors and plain values) to files.

    Every file is written atomically (see the module docstring). With ``asynchronous=True``,
    ``save`` copies the tensors into host buffers that are reused by later saves of a payload with
    the same tensor structure (a small CPU payload it serializes instead, see ``_SERIALIZED_HERE_BYTES``;
    a payload that cannot be serialized then fails in ``save``), and a single background thread
    writes the files in submission order.
    At most ``max_pending_bytes`` of tensor data are in flight (a larger single payload goes alone);
    a further ``save`` waits, which bounds the host memory the buffers take. ``call_after_writes``
    queues an action behind the pending writes (e.g. renaming a complete set of files into place).

    A background write that fails is raised as CheckpointWriteError by the next ``check``, ``save``,
    ``wait`` or ``close``. Writes still pending when the interpreter exits are completed then.

    The files go to ``storage`` (see noether.core.storage; the local filesystem by default).
    """

    def __init__(self, asynchronous: bool = True, max_pending_bytes: int = 4 * 2**30, storage: Storage | None = None) -> None:
        if max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes must be positive, got {max_pending_bytes}")
        self.storage: Storage = storage or LocalStorage()
        self.asynchronous = asynchronous
        self.max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._pending = 0  # queued jobs, writes and actions
        self._pending_bytes = 0
        self._error: CheckpointWriteError | None = None
        self._closed = False
        # buffer sets by tensor structure, least recently used first; only the caller's thread
        # touches the dict, the writer thread only clears the busy flags (under self._cond)
        self._pool: OrderedDict[tuple, list[_BufferSet]] = OrderedDict()
        self._replaced: list[str] = []
        self.digests: dict[str, str] = {}
        """The xxh3-64 hex digest of every file written, by absolute path (filled on the writer thread; whoever
        commits a file takes its digest, see `pop_digest`)."""  # old files to delete once the writes that replaced them finished
        self._copy_streams: dict[torch.device, Any] = {}  # per GPU, the side stream of device-to-host copies
        if asynchronous:
            self._queue: SimpleQueue = SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def save(self, path: str | os.PathLike, payload: dict, *, sync_directory: bool = True, fsync: bool = True) -> None:
        """Writes ``payload`` to ``path``; the payload may be modified as soon as this returns.

        Blocks while too many bytes are in flight. ``sync_directory=False`` skips making the rename
        durable, for files that a later rename moves into place anyway (staged checkpoint sets).
        ``fsync=False`` skips making the contents durable, for staged files whose commit calls
        ``make_durable`` on them before moving them into place: only then is a crash harmless.
        """
        self.check()
        if self._closed:
            raise RuntimeError("CheckpointWriter is closed")
        path = os.path.abspath(path)  # the write may happen after the working directory changed
        if not self.asynchronous:
            with _crc_free_saves():
                self._write(path, payload, sync_directory, fsync)
            return
        sources = _unique_tensors(payload)
        size = sum(t.numel() * t.element_size() for t in sources.values())
        # a KeyboardInterrupt may land at any line: once counted, exactly one job is queued (the write,
        # or the release of what it took), so the count always comes back down
        counted = False
        buffers = job = None
        try:
            with self._cond:
                while self._pending_bytes and self._pending_bytes + size > self.max_pending_bytes:
                    self._cond.wait()
                # one statement without calls: no signal handler runs between counting and noting it
                self._pending, self._pending_bytes, counted = self._pending + 1, self._pending_bytes + size, True
            if size <= _SERIALIZED_HERE_BYTES and not any(tensor.is_cuda for tensor in sources.values()):
                snapshot, copied = _serialized(path, payload), []  # the file's bytes: the writer only writes them
            else:
                buffers = self._take_buffers(list(sources.values()))
                snapshot, copied = _snapshot(payload, sources, buffers.tensors, self._copy_streams)
            job = (path, snapshot, buffers, size, sync_directory, fsync, copied)
        finally:
            if counted:
                self._queue.put(job or (lambda: self._release(buffers, size),))

    def _release(self, buffers: _BufferSet | None, size: int) -> None:
        """Frees what a save that never queued its write had taken (the job itself is counted down by `_run`)."""
        with self._cond:
            if buffers is not None:
                buffers.busy = False
            self._pending_bytes -= size

    @property
    def buffer_bytes(self) -> int:
        """Host memory held by the reusable snapshot buffers (pinned for GPU tensors)."""
        return sum(
            t.numel() * t.element_size() for sets in self._pool.values() for buffer_set in sets for t in buffer_set.tensors
        )

    def call_after_writes(self, action: Callable[[], None]) -> None:
        """Runs ``action`` once every earlier save is written (at once when synchronous); an error it
        raises is reported like a failed write. ``wait`` waits for it too."""
        self.check()
        if not self.asynchronous:
            self._run_action(action)
            return
        counted = False
        try:
            with self._cond:
                self._pending, counted = self._pending + 1, True  # counted and noted in one statement
        finally:
            if counted:
                self._queue.put((action,))

    def replace(self, source: str | os.PathLike, path: str | os.PathLike) -> None:
        """The storage's rename of ``source`` over ``path`` for an action on the writer thread (a set's
        commit): the file ``path`` named is deleted only after the action, so that whoever waits for the
        commit does not wait for its blocks to be released (about 1 s per GB on a disk mounted with
        ``discard``)."""
        self._free_later(self.storage.rename(os.fspath(source), os.fspath(path), keep_replaced=True))

    def check(self) -> None:
        """Raises the first error a background write hit since the last check."""
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def wait(self) -> None:
        """Blocks until every pending checkpoint is complete and durable on disk."""
        with self._cond:
            while self._pending:
                self._cond.wait()
        self.check()

    def close(self) -> None:
        """Finishes the pending writes and stops the writer thread; safe to call twice."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._pool.clear()
            if self.asynchronous:
                self._queue.put(None)
                self._thread.join()
                atexit.unregister(self.close)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take_buffers(self, sources: list[torch.Tensor]) -> _BufferSet:
        """Returns host buffers matching ``sources`` that no pending write is reading, marked busy."""
        structure = tuple((tuple(t.shape), t.dtype, t.is_cuda) for t in sources)
        sets = self._pool.setdefault(structure, [])
        self._pool.move_to_end(structure)
        while len(self._pool) > _POOL_STRUCTURES:
            self._pool.popitem(last=False)
        with self._cond:
            for buffer_set in sets:
                if not buffer_set.busy:
                    buffer_set.busy = True
                    return buffer_set
        # as many sets as writes of this structure are in flight at once, bounded by max_pending_bytes
        if any(pinned for _, _, pinned in structure):
            buffer_set = _BufferSet([torch.empty(shape, dtype=dtype, pin_memory=pinned) for shape, dtype, pinned in structure])
        else:
            buffer_set = _BufferSet(_mapped_buffers(structure))
        sets.append(buffer_set)
        return buffer_set

    def _run(self) -> None:
        with _crc_free_saves():  # for every save of this thread's lifetime
            self._serve()

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            if len(job) == 1:
                try:
                    self._run_action(job[0])
                finally:
                    self._finish(None, 0)
            else:
                path, snapshot, buffers, size, sync_directory, fsync, copied = job
                try:
                    for event in copied:
                        event.synchronize()
                    self._write(path, snapshot, sync_directory, fsync)
                except CheckpointWriteError as e:
                    self._record(e)
                except Exception as e:  # a failed device-to-host copy
                    self._record(CheckpointWriteError(f"could not write checkpoint {path}: {e}"))
                finally:
                    del job, snapshot  # do not keep the payload alive while idle
                    self._finish(buffers, size)
            while self._replaced:
                self.storage.remove(self._replaced.pop())

    def _free_later(self, replaced: str | None) -> None:
        """Deletes a replaced file's last name after the job that replaced it has finished."""
        if replaced is None:
            return
        if self.asynchronous:
            self._replaced.append(replaced)
        else:
            self.storage.remove(replaced)

    def _run_action(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as e:
            error = e if isinstance(e, CheckpointWriteError) else CheckpointWriteError(f"checkpoint action failed: {e}")
            if not self.asynchronous:
                raise error from e
            self._record(error)

    def _record(self, error: CheckpointWriteError) -> None:
        with self._cond:
            if self._error is None:
                self._error = error

    def _finish(self, buffers: _BufferSet | None, size: int) -> None:
        """Frees a job's bytes (and its buffers) and wakes up whoever waits."""
        with self._cond:
            if buffers is not None:
                buffers.busy = False
            self._pending -= 1
            self._pending_bytes -= size
            self._cond.notify_all()

    def pop_digest(self, path: str | os.PathLike) -> str | None:
        """The digest of the file last written at `path` (None if none was), forgotten from then on. Call it
        where the write is known to be done: in an action queued with `call_after_writes`."""
        return self.digests.pop(os.path.abspath(path), None)

    def _write(self, path: str, payload: dict | memoryview, sync_directory: bool, fsync: bool) -> None:
        hashing: _Hashing | None = None

        def write_bytes(file: BinaryIO) -> None:
            nonlocal hashing
            hashing = _Hashing(file)
            if isinstance(payload, memoryview):
                hashing.write(payload)
            else:
                torch.save(payload, hashing)

        try:
            self._free_later(self.storage.write(path, write_bytes, durable=fsync, sync_folder=sync_directory))
        except Exception as e:
            raise CheckpointWriteError(f"could not write checkpoint {path}: {_os_reason(e)}") from e
        assert hashing is not None
        self.digests[path] = hashing.hexdigest()


class _Hashing:
    """The file a payload is written into, hashing every byte on its way (xxh3-64: tens of GB/s, far
    faster than any disk, so a write costs no measurable time more)."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._hash = xxhash.xxh3_64()

    def write(self, data: Any) -> int:
        self._hash.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def file_digest(read: BinaryIO) -> str:
    """The xxh3-64 hex digest of a file's bytes, read in 8 MB blocks (what `verify` and a resume compare)."""
    digest = xxhash.xxh3_64()
    while block := read.read(8 << 20):
        digest.update(block)
    return digest.hexdigest()


def _os_reason(error: BaseException) -> str:
    """The operating system's word for a failed write (e.g. "No space left on device"), which torch
    wraps in an internal message of its own."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(error)


def _crc_free_saves() -> contextlib.AbstractContextManager:
    """Turns off torch.save's CRC32 for the calling thread only, where torch's serialization config
    keeps overrides per thread (torch >= 2.10); elsewhere nothing changes, so a user's own
    torch.save in another thread is never affected."""
    try:
        from torch.utils.serialization import config

        per_thread = isinstance(config._config["save.compute_crc32"].user_override, contextvars.ContextVar)
    except (ImportError, AttributeError, KeyError):
        return contextlib.nullcontext()
    return config.patch("save.compute_crc32", False) if per_thread else contextlib.nullcontext()


def _serialized(path: str, payload: dict) -> memoryview:
    """The bytes torch.save writes for ``payload`` (without the CRC, like every file of the writer)."""
    buffer = io.BytesIO()
    try:
        with _crc_free_saves():
            torch.save(payload, buffer)
    except Exception as e:
        raise CheckpointWriteError(f"could not write checkpoint {path}: {_os_reason(e)}") from e
    return buffer.getbuffer()


def _mapped_buffers(structure: tuple) -> list[torch.Tensor]:
    """Host buffers for one snapshot, carved out of one anonymous memory map.

    Allocated one by one, buffers of up to a few MB land in malloc's heap between the training
    loop's activations; kept there for reuse, they stopped the heap from being reused in place, and
    from the first save to the end of the run every update took 2000+ fresh pages from the kernel
    instead of a few hundred (benchmarks/saving_job.py). A map of their own leaves the heap as it
    was. Each buffer is a tensor with a storage of its own, so the files torch.save writes are the
    same as from separate allocations.
    """
    counts = [math.prod(shape) for shape, _, _ in structure]
    offsets, total = [], 0
    for (_, dtype, _), count in zip(structure, counts):
        offsets.append(total)
        total += -(-count * dtype.itemsize // _BUFFER_ALIGNMENT) * _BUFFER_ALIGNMENT
    # private, as malloc maps memory: a forked data-loader worker gets copy-on-write pages, not shared ones
    region = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE)  # each tensor keeps the region alive
    return [
        torch.frombuffer(region, dtype=dtype, count=count, offset=offset).view(shape)
        if count
        else torch.empty(shape, dtype=dtype)
        for (shape, dtype, _), count, offset in zip(structure, counts, offsets)
    ]


def _unique_tensors(payload: dict) -> dict[tuple, torch.Tensor]:
    """The payload's tensors in order; tensors viewing the same memory (tied weights) count once."""
    sources: dict[tuple, torch.Tensor] = {}
    for leaf in _leaves(payload):
        if isinstance(leaf, torch.Tensor):
            sources.setdefault(_identity(leaf), leaf)
    return sources


def _snapshot(
    payload: dict, sources: dict[tuple, torch.Tensor], buffers: list[torch.Tensor], copy_streams: dict[torch.device, Any]
) -> tuple[dict, list[Any]]:
    """Copies the tensors into ``buffers`` and deep-copies everything else.

    GPU tensors are copied into pinned buffers on a side stream per device, without blocking the
    host: the side stream starts after the work queued so far (the values being saved), and work
    queued later (the next optimizer step) starts after the copies. Returns the snapshot and the
    events the writer waits for before reading the buffers.
    """
    copied = []
    with torch.inference_mode(False), torch.no_grad():
        pairs = list(zip(buffers, sources.values()))
        for buffer, source in pairs:
            if not source.is_cuda:
                buffer.copy_(source)
        for device in {source.device for _, source in pairs if source.is_cuda}:
            main = torch.cuda.current_stream(device)
            if device not in copy_streams:
                copy_streams[device] = torch.cuda.Stream(device)
            side = copy_streams[device]
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for buffer, source in pairs:
                    if source.device == device:
                        buffer.copy_(source, non_blocking=True)
                        source.record_stream(side)  # its memory is not reused before the copy
            main.wait_stream(side)
            event = torch.cuda.Event()
            event.record(side)
            copied.append(event)
    by_identity = dict(zip(sources, buffers))

    def snapshot_leaf(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return by_identity[_identity(leaf)]
        return leaf if type(leaf) in _IMMUTABLE else copy.deepcopy(leaf)

    return _map_leaves(payload, snapshot_leaf), copied


_IMMUTABLE = (int, float, bool, str, bytes, type(None))


def _identity(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _leaves(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, list) or type(obj) is tuple:
        for value in obj:
            yield from _leaves(value)
    else:
        yield obj


def _map_leaves(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuilds the containers of ``obj`` around ``fn(leaf)``.

    Dict subclasses keep their type and attributes, e.g. the ``_metadata`` of a module state_dict
    that ``load_state_dict`` relies on.
    """
    if type(obj) is dict:
        return {key: _map_leaves(value, fn) for key, value in obj.items()}
    if isinstance(obj, dict):
        out = copy.copy(obj)
        if hasattr(obj, "__dict__"):
            out.__dict__ = copy.deepcopy(obj.__dict__)
        for key, value in obj.items():
            out[key] = _map_leaves(value, fn)
        return out
    if isinstance(obj, list):
        return [_map_leaves(value, fn) for value in obj]
    if type(obj) is tuple:
        return tuple(_map_leaves(value, fn) for value in obj)
    return fn(obj)
