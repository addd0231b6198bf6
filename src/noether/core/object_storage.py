"""Runs kept in an object store (`s3://bucket/prefix`, or any URL fsspec knows): the checkpoint store
commits into a local cache exactly as on disk, and a `BucketMirror` copies what it commits to the
bucket in the background, and fetches what a run resumed on another machine needs.

Order is the protocol, because a bucket has no rename:
- a set's members go up before its hashes file, the hashes file before its trainer state (the file
  that makes a set resumable); a set that replaces one of the same tag first takes the old trainer
  state down. A trainer state found in the bucket therefore lists files that are all there and all
  of its save; a process killed mid-upload leaves a set without one, never one of a partial set.
- deletions and moves go in the same queue as uploads, behind them: retention never removes a set
  from the bucket before the newer sets that replace it are there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noether.core.checkpoint_store import HASHES_SUFFIX, SHARDED_SUFFIX, TAG_FIELD, CheckpointStore, Member
from noether.core.config import ConfigError
from noether.core.storage import HOST, process_alive
from noether.core.utils.background import in_background, yield_cpu
from noether.core.utils.formatting import format_bytes
from noether.core.utils.training.iteration import TrainingIteration

logger = logging.getLogger("noether.object_storage")
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "log.txt")
"""Uploaded after each set and at the end: what `noether-plot` and a resume on another machine read."""
LEASE = ".lease.json"
"""`{run}/.lease.json`: which process trains the run; the bucket's stand-in for the run lock."""
LEASE_TIMEOUT_SECONDS = 180.0
HEARTBEAT_SECONDS = 30.0
MAX_QUEUED_SETS = 2
"""More sets than this waiting for the bucket (while it is reachable) make the next commit wait."""
WAIT_NOTICE_SECONDS = 60.0
"""Training waiting for the upload queue is said at most this often."""
PARALLEL_FILES = 8
RETRY_CAP_SECONDS = 30.0
S3_PART_BYTES = 8 << 20
"""Multipart part size for S3, as boto3's default: side by side through the mirror, 8 MB parts beat
16 MB (8.8 against 11.9 s/GB for 512 MB, 10.7 against 14.7 for 1 GB) and s3fs's 50 MB (18); moto's
server on 127.0.0.1, benchmarks/README.md, "Object storage"."""
S3_PART_LOOPS = 4
"""Event loops, each with a client of its own, that upload the parts of large files (see `_ParallelParts`)."""
S3_PARTS_IN_FLIGHT = 10
"""Parts sent at once over those loops, as boto3's transfer manager does by default: on a link with a
high latency the number of requests in flight, not the CPU, sets the pace."""
DOWNLOADING = "~download"


class UploadError(Exception):
    """What could not be uploaded before the run ended: the run exits non-zero, its files are in the cache."""


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def cache_folder(url: str, cache_dir: str | Path) -> Path:
    """Where the files of `url` are cached: `{cache_dir}/{scheme}/{bucket}/{prefix}`."""
    scheme, rest = url.split("://", 1)
    return Path(cache_dir).expanduser() / scheme / rest.strip("/")


class Bucket:
    """An object-store folder (a URL) through fsspec: string paths relative to it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        try:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except ImportError as error:
            raise ConfigError(
                f"{self.url}: object storage needs its packages: pip install 'noether-trainkit[s3]' ({error})"
            ) from None
        except ValueError as error:
            raise ConfigError(f"{self.url}: {error}") from None
        self.root = self.root.rstrip("/")

    def check(self) -> None:
        """One line before training when the bucket cannot be used: missing, unreachable, no credentials."""
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.exists(bucket)
        except Exception as error:  # noqa: BLE001 - whatever the client raises, it is named
            raise ConfigError(f"cannot reach {self.url}: {_one_line(error)}") from None
        if not found:
            raise ConfigError(f"{self.url}: bucket '{bucket}' does not exist or these credentials cannot see it")

    def key(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def child(self, name: str) -> Bucket:
        child = object.__new__(Bucket)
        child.url, child.fs, child.root = f"{self.url}/{name}", self.fs, f"{self.root}/{name}"
        return child

    def files(self, folder: str = "") -> dict[str, int]:
        """Every object under `folder`, by path relative to this bucket folder, with its size."""
        try:
            found = self.fs.find(self.key(folder), detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        finally:
            self.fs.invalidate_cache()  # a cached listing would hide objects other processes add later
        prefix = len(self.root) + 1
        return {name[prefix:]: int(info.get("size") or 0) for name, info in found.items() if info.get("type") != "directory"}

    def read(self, relative: str) -> bytes:
        self.fs.invalidate_cache(self.key(relative))
        return self.fs.cat_file(self.key(relative))

    def write(self, relative: str, content: bytes) -> None:
        self.fs.pipe_file(self.key(relative), content)

    def upload(self, local: Path, relative: str) -> None:
        if "s3" in self.fs.protocol and local.stat().st_size >= 2 * S3_PART_BYTES:
            _parallel_parts(self.fs).upload(local, self.key(relative))
        else:
            self.fs.put_file(str(local), self.key(relative))

    def download(self, relative: str, local: Path) -> None:
        self.fs.invalidate_cache(self.key(relative))
        self.fs.get_file(self.key(relative), str(local))

    def remove(self, relatives: Iterable[str]) -> None:
        """Objects, or folders with everything in them; one that is gone is no error."""
        for relative in relatives:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.key(relative), recursive=True)

    def move(self, source: str, target: str) -> None:
        self.fs.copy(self.key(source), self.key(target))
        self.remove([source])


_parts_of_filesystems: dict[int, _ParallelParts] = {}
_parts_lock = threading.Lock()


def _parallel_parts(fs: Any) -> _ParallelParts:
    """One set of part uploaders per filesystem object (fsspec reuses one per set of options), made on its
    first large upload. By identity: filesystems that compare equal may still reach different endpoints
    (an endpoint from the environment is read when a client connects)."""
    with _parts_lock:
        parts = _parts_of_filesystems.get(id(fs))
        if parts is None or parts.fs is not fs:
            parts = _parts_of_filesystems[id(fs)] = _ParallelParts(fs, S3_PART_LOOPS, S3_PARTS_IN_FLIGHT)
        return parts


class _ParallelParts:
    """Multipart uploads to S3 with the parts spread over several event loops, each in a thread of its own
    with a client of its own. s3fs sends the parts of a file concurrently, but signs and checksums every
    part on its one event-loop thread (a SHA-256 of every byte over plain HTTP, a CRC32 everywhere): one
    core for the whole upload, where boto3's transfer manager hashes on every thread it sends from. The
    requests are s3fs's own (`call_s3` with its settings), as its `put_file` makes them."""

    def __init__(self, fs: Any, loops: int, parts_in_flight: int) -> None:
        self.fs = fs
        self._clients = []
        for index in range(loops):
            loop = asyncio.new_event_loop()
            threading.Thread(target=in_background(loop.run_forever), name=f"noether-s3-loop-{index}", daemon=True).start()
            self._clients.append(type(fs)(loop=loop, skip_instance_cache=True, **fs.storage_options))
        self._pool = ThreadPoolExecutor(parts_in_flight, thread_name_prefix="noether-s3-part", initializer=yield_cpu)
        self._client_of_thread = threading.local()
        self._client_numbers = itertools.count()

    def upload(self, local: Path, key: str) -> None:
        """`local` whole under `key`, or nothing: a failed part aborts the upload, and an aborted or
        unfinished multipart upload is never an object."""
        bucket, path, _ = self.fs.split_path(key)
        part_count = -(-local.stat().st_size // S3_PART_BYTES)
        checksum = self._checksum_arguments()
        upload_id = self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=path, **checksum)["UploadId"]
        try:
            with open(local, "rb") as file:

                def upload_part(number: int) -> dict[str, Any]:
                    data = os.pread(file.fileno(), S3_PART_BYTES, (number - 1) * S3_PART_BYTES)
                    response = self._client().call_s3(
                        "upload_part", Bucket=bucket, Key=path, UploadId=upload_id, PartNumber=number, Body=data, **checksum
                    )
                    part = {"PartNumber": number, "ETag": response["ETag"]}
                    if checksum:  # the completion lists what each part was checked against
                        part["ChecksumCRC32"] = response["ChecksumCRC32"]
                    return part

                futures = [self._pool.submit(upload_part, number) for number in range(1, part_count + 1)]
                try:
                    parts = [future.result() for future in futures]
                finally:  # no part still reads the file once it is closed
                    for future in futures:
                        future.cancel()
                    concurrent.futures.wait(futures)
            self.fs.call_s3(
                "complete_multipart_upload", Bucket=bucket, Key=path, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=path, UploadId=upload_id)
            raise
        finally:
            self.fs.invalidate_cache(key)

    def _checksum_arguments(self) -> dict[str, str]:
        """CRC32 of every part, declared when the upload is created, as boto3's transfer manager does unless
        the client is told to send checksums only where required (stores that reject them): the bucket
        checks each part and keeps a checksum of the object."""
        if self.fs.s3.meta.config.request_checksum_calculation == "when_required":
            return {}
        return {"ChecksumAlgorithm": "CRC32"}

    def _client(self) -> Any:
        """The client of the calling pool thread: each thread keeps to one, so the loops share the work."""
        client = getattr(self._client_of_thread, "client", None)
        if client is None:
            client = self._clients[next(self._client_numbers) % len(self._clients)]
            self._client_of_thread.client = client
        return client


# --------------------------------------------------------------------------------- checkpoint sets in a bucket
@dataclass
class RemoteSet:
    """The files of one tag in the bucket."""

    tag: str
    files: dict[str, int] = field(default_factory=dict)  # relative to checkpoints/, with sizes
    iteration: TrainingIteration | None = None
    complete: bool = False  # its hashes file and every file that names are up
    resumable: bool = False  # complete, with a trainer state


def remote_sets(checkpoints: Bucket) -> dict[str, RemoteSet]:
    """The sets under a run's `checkpoints/` in the bucket. A set is resumable there when its trainer
    state and hashes file are up and every file the hashes name is too (the upload order makes the
    trainer state the last to arrive)."""
    sets: dict[str, RemoteSet] = {}
    files = checkpoints.files()
    for relative, size in files.items():
        top = relative.split("/", 1)[0]
        tag = _tag_of(top)
        if tag is not None:
            sets.setdefault(tag, RemoteSet(tag)).files[relative] = size
    for remote in sets.values():
        hashes = next((name for name in remote.files if name.endswith(f"_cp={remote.tag}{HASHES_SUFFIX}")), None)
        has_trainer = any(name.endswith("_trainer.th") for name in remote.files)
        if hashes is None:
            continue
        try:
            content = json.loads(checkpoints.read(hashes))
            remote.iteration = TrainingIteration.from_dict(content["training_iteration"])
            listed = [name.replace(TAG_FIELD, remote.tag) for name in content["xxh3_64"]]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue
        remote.complete = all(name in remote.files for name in listed)
        remote.resumable = remote.complete and has_trainer
    return sets


def _tag_of(name: str) -> str | None:
    if name.endswith(HASHES_SUFFIX) and "_cp=" in name:
        return name[: -len(HASHES_SUFFIX)].split("_cp=", 1)[1]
    parsed = Member.parse(name)
    return None if parsed is None else parsed[1]


def fetch_set(checkpoints: Bucket, remote: RemoteSet, folder: Path) -> None:
    """Download a set into local `folder`: each file under a hidden name first, renamed into place when
    whole, the trainer state last (a stop midway leaves hidden files the next start removes)."""
    folder.mkdir(parents=True, exist_ok=True)
    ordered = sorted(remote.files, key=lambda name: (name.endswith("_trainer.th"), name.endswith(HASHES_SUFFIX), name))
    for relative in ordered:
        top, _, inner = relative.partition("/")
        temporary = folder / f".{top}{DOWNLOADING}" / inner if inner else folder / f".{top}{DOWNLOADING}"
        temporary.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.download(relative, temporary)
        if not inner:
            os.replace(temporary, folder / top)
    for staged in folder.glob(f".*{SHARDED_SUFFIX}{DOWNLOADING}"):
        final = folder / staged.name[1 : -len(DOWNLOADING)]
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)


def fetch_run(url: str, folder: Path, storage_options: dict[str, Any] | None = None, tags: Iterable[str] | None = None) -> Path:
    """A run's files downloaded into `folder` (its run files and the checkpoints of `tags`, default all),
    for the run tools, evaluation and initializers: they then read the bucket's bytes as they read a run
    on disk. Returns the run directory."""
    bucket = Bucket(url, storage_options)
    bucket.check()
    wanted = None if tags is None else set(tags)
    run_dir = Path(folder) / bucket.root.rsplit("/", 1)[-1]
    files = bucket.files()
    if not any(name in files for name in RUN_FILES):
        raise FileNotFoundError(f"{url} is not a run: it holds none of {', '.join(RUN_FILES)}")
    for relative in files:
        inside = relative.removeprefix("checkpoints/")
        if relative in RUN_FILES or (inside != relative and (wanted is None or _tag_of(inside.split("/", 1)[0]) in wanted)):
            target = run_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            bucket.download(relative, target)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


class RemoteRun:
    """A run whose home is a bucket folder (`{output_path}/{run_id}`), trained in a local run directory
    (its cache) that the checkpoint store commits into as on disk."""

    def __init__(self, url: str, run_dir: Path, storage_options: dict[str, Any], give_up_after_seconds: float) -> None:
        self.bucket = Bucket(url, storage_options)
        self.bucket.check()
        self.run_dir = run_dir
        self.run = self.bucket.child(run_dir.name)
        self.lease = Lease(self.run)
        self.give_up_after_seconds = give_up_after_seconds

    def holds_run(self) -> bool:
        return bool(self.run.files())

    def take(self, store: CheckpointStore, checkpoint: str | None) -> list[str]:
        """Hold the run's lease and download what a resume needs; returns what the run log should say
        (called before log.txt is opened, as it may be downloaded)."""
        notes = [self.lease.acquire()]
        fetched = self._fetch_for_resume(store, checkpoint)
        if fetched is not None:
            notes.append(f"downloaded checkpoint '{fetched.tag}' ({fetched.iteration}) from {self.run.url}")
        return [note for note in notes if note is not None]

    def _fetch_for_resume(self, store: CheckpointStore, checkpoint: str | None) -> RemoteSet | None:
        """Download the set a resume needs when the cache lacks it: `checkpoint`, or else the bucket's newest
        resumable set when it is newer than the cache's (the run went on on another machine), with the
        bucket's run files (the metrics the set's trainer state counts)."""
        sets = remote_sets(self.run.child("checkpoints"))
        if checkpoint is not None:
            remote = sets.get(checkpoint) if not store.info(checkpoint).files else None
        else:
            newest = store.newest_resumable()
            candidates = sorted((item for item in sets.values() if item.resumable), key=lambda item: item.iteration, reverse=True)
            remote = next(iter(candidates), None)
            if remote is not None and newest is not None and remote.iteration <= newest.iteration:
                remote = None
        if remote is not None:
            fetch_set(self.run.child("checkpoints"), remote, store.directory)
        if remote is not None or not (self.run_dir / RUN_FILES[0]).exists():
            present = self.run.files()
            for name in RUN_FILES:
                if name in present:
                    temporary = self.run_dir / f".{name}{DOWNLOADING}"
                    self.run.download(name, temporary)
                    os.replace(temporary, self.run_dir / name)
        return remote

    def mirror(self, store: CheckpointStore) -> BucketMirror:
        """The mirror of this run's store, after it has queued the sets of the cache the bucket lacks."""
        mirror = BucketMirror(self.run, self.run_dir, self.give_up_after_seconds)
        mirror.upload_new_sets(store.committed_sets())
        return mirror


# --------------------------------------------------------------------------------- the lease
class Lease:
    """Which process trains a run, in the bucket: taken at start, renewed every HEARTBEAT_SECONDS by a
    thread, removed at the end. A lease not renewed for LEASE_TIMEOUT_SECONDS, or one of a process of this
    host that is gone, is taken over (logged).
    Two starts within one heartbeat can both take it: it guards against a forgotten live run, not a race."""

    def __init__(self, run: Bucket) -> None:
        self.run = run
        self.holder = {"host": HOST, "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lease; returns the note to log when it took over another process's."""
        held = self._read()
        takeover = None
        if held is not None and {key: held.get(key) for key in self.holder} != self.holder:
            age = time.time() - float(held.get("renewed_at", 0))
            who = f"{held.get('host')} (pid {held.get('pid')})"
            gone = held.get("host") == HOST and isinstance(held.get("pid"), int) and not process_alive(held["pid"])
            if age < LEASE_TIMEOUT_SECONDS and not gone:
                raise ConfigError(
                    f"run {self.run.url} is being trained by {who}: its lease was renewed {age:.0f} s ago; "
                    f"wait for it to end, or {LEASE_TIMEOUT_SECONDS:.0f} s after it died"
                )
            reason = "which is gone" if gone else f"whose lease was last renewed {age:.0f} s ago"
            takeover = f"taking over run {self.run.url} from {who}, {reason}"
        self._renew()
        self._thread = threading.Thread(target=self._heartbeat, name="noether-lease", daemon=True)
        self._thread.start()
        return takeover

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with contextlib.suppress(Exception):
            self.run.remove([LEASE])

    def _read(self) -> dict[str, Any] | None:
        try:
            held = json.loads(self.run.read(LEASE))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return held if isinstance(held, dict) else {}

    def _renew(self) -> None:
        self.run.write(LEASE, json.dumps({**self.holder, "renewed_at": time.time()}).encode())

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # an outage: the uploader says so
                self._renew()


# --------------------------------------------------------------------------------- the uploader
@dataclass
class _Job:
    """Steps run in order, each a group of operations run in parallel and retried until they succeed."""

    what: str  # for messages: "checkpoint 'latest'", "run files"
    steps: list[list[Callable[[], None]]]
    size: int = 0
    key: str | None = None  # a queued job with the same key is replaced (a newer save of the same tag)
    is_set: bool = False
    superseded: Callable[[], bool] = lambda: False  # checked when its turn comes: then it is skipped
    done: Callable[[], None] = lambda: None  # run once it is finished, skipped or replaced


class Uploader:
    """One background thread that carries out jobs in the order they were queued, retrying each step with
    a growing pause while the bucket fails: training goes on, one warning per outage."""

    def __init__(self, url: str, give_up_after_seconds: float) -> None:
        self.url = url
        self.give_up_after_seconds = give_up_after_seconds
        self._jobs: list[_Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._outage_since: float | None = None
        self._gave_up = False
        self._said_waiting_at = -WAIT_NOTICE_SECONDS
        self._pool = ThreadPoolExecutor(PARALLEL_FILES, thread_name_prefix="noether-upload", initializer=yield_cpu)
        self._thread = threading.Thread(target=in_background(self._work), name="noether-uploader", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._condition:
            if job.key is not None:  # never the one in progress (index 0): its steps must finish
                replaced = [queued for queued in self._jobs[1:] if queued.key == job.key]
                self._jobs = [queued for queued in self._jobs if queued not in replaced]
                for queued in replaced:
                    queued.done()
            self._jobs.append(job)
            self._condition.notify_all()
            while job.is_set and self._queued_sets() > MAX_QUEUED_SETS and self._outage_since is None and not self._gave_up:
                if time.monotonic() - self._said_waiting_at >= WAIT_NOTICE_SECONDS:
                    logger.info(f"{self._queued_sets()} checkpoint sets wait for upload to {self.url}: training waits for them")
                    self._said_waiting_at = time.monotonic()
                self._condition.wait(1.0)

    def close(self) -> list[str]:
        """Wait until every job is done (a progress line every 10 s) or the bucket stayed unreachable for
        `give_up_after_seconds`; returns what was not uploaded."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
            last_report = time.monotonic()
            while self._jobs and not self._gave_up:
                self._condition.wait(1.0)
                if self._jobs and time.monotonic() - last_report >= 10:
                    left = sum(job.size for job in self._jobs)
                    logger.info(f"uploading to {self.url}: {len(self._jobs)} job(s), {format_bytes(left)} left")
                    last_report = time.monotonic()
            left = [job.what for job in self._jobs]
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return left

    def _queued_sets(self) -> int:
        return sum(job.is_set for job in self._jobs)

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._jobs and not self._closing:
                    self._condition.wait()
                if not self._jobs:
                    return
                job = self._jobs[0]
            if not self._run(job):
                return  # gave up
            job.done()
            with self._condition:
                self._jobs.remove(job)
                self._condition.notify_all()

    def _run(self, job: _Job) -> bool:
        if job.superseded():
            logger.debug(f"{job.what}: not uploaded, a newer save replaced it first")
            return True
        for step in job.steps:
            pending = list(step)
            pause = 1.0
            while pending:
                futures = [(operation, self._pool.submit(operation)) for operation in pending]
                failures = [(operation, future.exception()) for operation, future in futures if future.exception()]
                if not failures:
                    self._reachable()
                    break
                if not self._unreachable(failures[0][1], job):
                    return False
                time.sleep(pause)
                pause = min(pause * 2, RETRY_CAP_SECONDS)
                pending = [operation for operation, _ in failures]
        return True

    def _reachable(self) -> None:
        if self._outage_since is not None:
            logger.warning(f"{self.url} is reachable again after {time.monotonic() - self._outage_since:.0f} s; uploads go on")
            with self._condition:
                self._outage_since = None

    def _unreachable(self, error: BaseException, job: _Job) -> bool:
        """Record a failure; False once the run is ending and the bucket failed for too long."""
        now = time.monotonic()
        with self._condition:
            if self._outage_since is None:
                self._outage_since = now
                logger.warning(
                    f"cannot upload {job.what} to {self.url} ({_one_line(error)}): retrying in the background, training goes on"
                )
            if self._closing and now - self._outage_since >= self.give_up_after_seconds:
                self._gave_up = True
                self._condition.notify_all()
                return False
        return True


# --------------------------------------------------------------------------------- the mirror
class BucketMirror:
    """Copies a run directory's committed checkpoint sets, deletions, set-asides and run files to the
    run's folder in a bucket, in the order the checkpoint store made them (it calls this on its writer
    thread). A committed set is hard-linked into `{run_dir}/.upload/` at once: its upload reads the
    bytes of that commit even when a later save replaces the files under their names."""

    def __init__(self, run: Bucket, run_dir: Path, give_up_after_seconds: float) -> None:
        self.run = run
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        self.snapshots = run_dir / ".upload"
        shutil.rmtree(self.snapshots, ignore_errors=True)  # a stopped process's; `upload_new_sets` redoes its work
        self._snapshot_ids = itertools.count()
        self.uploader = Uploader(run.url, give_up_after_seconds)

    # ----------------------------------------------------------------------------- called by the store
    def committed(self, files: list[Path]) -> None:
        """A set whose files (its trainer state last, if it has one) are now committed locally."""
        tag = _tag_of(files[0].name) or files[0].name
        snapshot = self.snapshots / str(next(self._snapshot_ids))
        linked = [
            (original, file, snapshot / file.relative_to(self.checkpoint_dir))
            for original in files
            for file in _files_of(original)
        ]
        for _, file, link in linked:
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, link)
            except OSError:
                shutil.copy2(file, link)

        def upload(kind: Callable[[Path], bool]) -> list[Callable[[], None]]:
            return [self._upload_step(link, file) for original, file, link in linked if kind(original)]

        def is_marker(path: Path) -> bool:
            return path.name.endswith("_trainer.th")

        def is_hashes(path: Path) -> bool:
            return path.name.endswith(HASHES_SUFFIX)

        markers = [self._relative(path) for path in files if is_marker(path)]
        steps = [
            [self._remove_step(markers)],  # this tag's previous trainer state first: no mixed set is ever resumable
            upload(lambda path: not is_marker(path) and not is_hashes(path)),
            upload(is_hashes),
            self._run_files_steps(),  # before the marker: the bucket's metrics.jsonl holds every row the set counts
            upload(is_marker),
        ]
        size = sum(_size(file) for _, file, _ in linked)

        def superseded() -> bool:
            """A newer save replaced or deleted the set before its upload began: that one is queued too."""
            return any(not _same_file(file, link) for _, file, link in linked)

        job = _Job(f"checkpoint '{tag}'", steps, size, key=f"set:{tag}", is_set=True, superseded=superseded)
        job.done = lambda: shutil.rmtree(snapshot, ignore_errors=True)
        self.uploader.submit(job)

    def removed(self, files: list[Path]) -> None:
        """Files the store deleted locally (retention): deleted in the bucket once what came before is up."""
        relative = [self._relative(path) for path in files]
        self.uploader.submit(_Job(f"deletion of {files[0].name}", [[self._remove_step(relative)]]))

    def set_aside_after(self, iteration: TrainingIteration, folder: str) -> None:
        """Every set in the bucket written after `iteration` moved into `checkpoints/{folder}/`, as the store
        set the cache's aside (a branch from an earlier checkpoint); sets only the bucket holds included."""

        def move() -> None:
            checkpoints = self.run.child("checkpoints")
            for remote in remote_sets(checkpoints).values():
                if remote.iteration is not None and remote.iteration > iteration:
                    for name in remote.files:
                        checkpoints.move(name, f"{folder}/{name}")

        self.uploader.submit(_Job(f"setting aside the sets after {iteration}", [[move]]))

    # ----------------------------------------------------------------------------- called by the run
    def upload_new_sets(self, local_sets: Iterable[list[Path]]) -> None:
        """At start, with the run's lease held: sets committed in the cache that are not whole in the bucket
        (a stop cut their upload short, or the bucket was unreachable until the end) are queued, and parts
        of sets the cache no longer holds are deleted (no upload will ever complete them)."""
        checkpoints = self.run.child("checkpoints")
        in_bucket = checkpoints.files()
        local_sets = list(local_sets)
        local_tags = {_tag_of(files[0].name) for files in local_sets}
        partial = [remote for remote in remote_sets(checkpoints).values() if not remote.complete and remote.tag not in local_tags]
        if partial:
            checkpoints.remove(name for remote in partial for name in remote.files)
            logger.info(f"deleted the parts of unfinished uploads from {checkpoints.url}: {', '.join(r.tag for r in partial)}")
        for files in local_sets:
            if any(self._needs_upload(path, in_bucket) for path in files):
                self.committed(files)

    def close(self) -> None:
        """Wait for the queue (the run files as they end first); UploadError naming what stayed local."""
        self.uploader.submit(_Job("run files", [self._run_files_steps()], key="run files"))
        left = self.uploader.close()
        if left:
            raise UploadError(
                f"{self.run.url} stayed unreachable; not uploaded: {', '.join(left)}. Everything is in {self.run_dir}: "
                "a --resume of the run on this machine uploads it"
            )
        shutil.rmtree(self.snapshots, ignore_errors=True)

    # ----------------------------------------------------------------------------- steps
    def _relative(self, path: Path) -> str:
        return path.relative_to(self.run_dir).as_posix()

    def _upload_step(self, link: Path, file: Path) -> Callable[[], None]:
        relative = self._relative(file)
        return lambda: self.run.upload(link, relative)

    def _run_files_steps(self) -> list[Callable[[], None]]:
        return [self._snapshot_step(self.run_dir / name, name) for name in RUN_FILES]

    def _snapshot_step(self, path: Path, relative: str) -> Callable[[], None]:
        def upload() -> None:
            try:
                content = path.read_bytes()
            except FileNotFoundError:
                return
            if path.suffix in (".jsonl", ".txt"):
                content = content[: content.rfind(b"\n") + 1]  # whole lines: the file is being appended to
            self.run.write(relative, content)

        return upload

    def _remove_step(self, relatives: list[str]) -> Callable[[], None]:
        return lambda: self.run.remove(relatives)

    def _needs_upload(self, path: Path, in_bucket: dict[str, int]) -> bool:
        for file in _files_of(path):
            if in_bucket.get(file.relative_to(self.checkpoint_dir).as_posix()) != _size(file):
                return True
        if path.name.endswith(HASHES_SUFFIX):
            try:
                return self.run.read(self._relative(path)) != path.read_bytes()
            except FileNotFoundError:
                return True
        return False


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _files_of(path: Path) -> list[Path]:
    """A file, or the files of a folder (a `.dcp` checkpoint)."""
    if path.is_dir():
        return sorted(file for file in path.rglob("*") if file.is_file())
    return [path]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
