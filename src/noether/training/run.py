"""A run from a config: build everything, train or evaluate, write the run directory."""

from __future__ import annotations

import logging
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from noether.core import distributed
from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.context import CallbackContext
from noether.core.callbacks.periodic import PeriodicDataIteratorCallbackConfig
from noether.core.checkpoint_manager import CheckpointManager
from noether.core.checkpoint_store import CheckpointInfo, CheckpointStore
from noether.core.config import ConfigError, Seed, build, by_kind, validate_config
from noether.core.models.base import ModelBaseConfig, build_model
from noether.core.object_storage import Bucket, BucketMirror, RemoteRun, UploadError, cache_folder, fetch_run, is_url
from noether.core.providers.metric_property import MetricPropertyProvider
from noether.core.providers.path import PathProvider
from noether.core.run_lock import RunInUseError, RunLock
from noether.core.trackers.base import TrackerConfig
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError, CheckpointWriteError, CheckpointWriter
from noether.core.writers.log_writer import LogFileHandler, LogWriter
from noether.data.base import DatasetBaseConfig
from noether.data.container import DataContainer
from noether.data.samplers.interleaved import TRAIN_KEY
from noether.training.trainers.base import BaseTrainer, BaseTrainerConfig

logger = logging.getLogger("noether.run")
AUTO = "auto"
USER_ERRORS = (ConfigError, CheckpointLoadError, FileNotFoundError)


class RunConfig(BaseModel):
    """The whole config file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    output_path: Path | str = Path("outputs")
    """A folder, or an object-store URL (`s3://bucket/prefix`): runs then live in the bucket, staged in `cache_dir`."""
    cache_dir: Path = Path("~/.cache/noether/runs")
    storage_options: dict[str, Any] = {}
    """Passed to fsspec for an object-store output_path (endpoint, credentials); default: the AWS chain."""
    upload_give_up_seconds: float = Field(default=300.0, gt=0)
    """At the end of a run, how long an unreachable bucket is retried before the run exits naming what stayed local."""
    run_id: str | None = None
    seed: Seed = 0
    device: str = "cpu"
    async_checkpoints: bool = True
    metric_higher_is_better: dict[str, bool] = {}
    datasets: dict[str, by_kind(DatasetBaseConfig)]
    model: by_kind(ModelBaseConfig)
    trainer: by_kind(BaseTrainerConfig)
    trackers: list[by_kind(TrackerConfig)] = []

    @field_validator("run_id")
    @classmethod
    def _one_directory_name(cls, run_id: str | None) -> str | None:
        if run_id is not None and (Path(run_id).name != run_id or run_id in (".", "..")):
            raise ValueError(f"'{run_id}' is not a directory name (it is placed under output_path)")
        return run_id

    @field_validator("output_path", mode="before")
    @classmethod
    def _folder_or_url(cls, output_path: Any) -> Any:
        return output_path.rstrip("/") if isinstance(output_path, str) and is_url(output_path) else output_path

    @field_validator("device")
    @classmethod
    def _usable_device(cls, device: str) -> str:
        try:
            device_type = torch.device(device).type
        except RuntimeError:
            raise ValueError(f"'{device}' is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"'{device}': CUDA is not available on this machine")
        return device


def parse_run_config(tree: dict[str, Any]) -> RunConfig:
    """Validate a config tree, including what pydantic alone cannot see (dataset keys of callbacks)."""
    config = validate_config(RunConfig, tree)
    if TRAIN_KEY not in config.datasets:
        raise ConfigError(f"datasets.{TRAIN_KEY}: field required (the training set)")
    problems = [
        f"{path}.dataset_key: unknown dataset key '{callback.dataset_key}'; known keys: {', '.join(sorted(config.datasets))}"
        for path, callback in _callback_configs(config.trainer.callbacks, "trainer.callbacks")
        if isinstance(callback, PeriodicDataIteratorCallbackConfig) and callback.dataset_key not in config.datasets
    ]
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def _callback_configs(callbacks: list[CallBackBaseConfig], path: str) -> list[tuple[str, CallBackBaseConfig]]:
    """Every callback config with its path, nested ones (e.g. `eval_callbacks`) included."""
    found = []
    for index, callback in enumerate(callbacks):
        callback_path = f"{path}[{index}]"
        found.append((callback_path, callback))
        for field_name in type(callback).model_fields:
            value = getattr(callback, field_name)
            if isinstance(value, list) and value and all(isinstance(item, CallBackBaseConfig) for item in value):
                found += _callback_configs(value, f"{callback_path}.{field_name}")
    return found


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_logging(log_file: Path | None, is_main_process: bool = True) -> None:
    """Print to stdout and, for a run, append the same lines to its log.txt; other ranks print only warnings."""
    root = logging.getLogger("noether")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO if is_main_process else logging.WARNING)
    if not is_main_process:
        log_file = None
    root.propagate = False
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(LogFileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)


def build_trainer(
    config: RunConfig,
    paths: PathProvider,
    log_writer: LogWriter,
    setup: distributed.DistributedSetup | None = None,
    mirror: BucketMirror | None = None,
) -> BaseTrainer:
    setup = setup or distributed.DistributedSetup(rank=0, world_size=1, device=config.device)
    seed_everything(config.seed)
    data = DataContainer({key: build(dataset_config) for key, dataset_config in config.datasets.items()})
    model = build_model(config.model)
    writer = CheckpointWriter(asynchronous=config.async_checkpoints)
    store = CheckpointStore(
        paths.checkpoint_dir, paths.run_id, writer, sharded=config.trainer.parallelism == "fsdp", mirror=mirror
    )
    context = CallbackContext(
        trainer=None,  # set by the trainer itself
        model=model,
        data=data,
        paths=paths,
        log_writer=log_writer,
        metric_properties=MetricPropertyProvider(config.metric_higher_is_better),
        checkpoints=CheckpointManager(store, model, log_writer, rank=setup.rank, world_size=setup.world_size),
        rank=setup.rank,
        world_size=setup.world_size,
    )
    trainer_class = type(config.trainer).configured_class()
    return trainer_class(config.trainer, context, seed=config.seed, device=setup.device)


def train(tree: dict[str, Any], *, resume: str | None = None, checkpoint: str | None = None) -> PathProvider:
    """Train a new run, or continue run `resume` (an id or a directory, or `auto`: the config's run_id
    if it has a checkpoint, else a fresh start) from `checkpoint` (default: its newest complete one).

    Under torchrun every process calls this; rank 0 alone writes the run directory.
    """
    config = parse_run_config(tree)
    _check_batch_fits_training_set(config)
    setup = distributed.setup(config.device)
    try:
        return _train(config, setup, resume, checkpoint)
    finally:
        distributed.teardown()


def _check_batch_fits_training_set(config: RunConfig) -> None:
    """Refuse, before the run directory exists, a batch that no epoch could fill (builds the training set once more)."""
    size = len(build(config.datasets[TRAIN_KEY]))
    if config.trainer.effective_batch_size > size:
        raise ConfigError(
            f"trainer.effective_batch_size: {config.trainer.effective_batch_size} is larger than the training set ({size} samples)"
        )


def _train(config: RunConfig, setup: distributed.DistributedSetup, resume: str | None, checkpoint: str | None) -> PathProvider:
    is_main = setup.rank == 0
    paths = _run_paths(config, resume)
    lock = RunLock(paths.run_dir)
    log_writer = None
    remote: RemoteRun | None = None
    mirror: BucketMirror | None = None

    store = CheckpointStore(paths.checkpoint_dir, paths.run_id)
    remote_notes: list[str] = []

    def claim() -> None:
        """On main: the run directory (and the bucket's run) held, and whatever a resume needs from the bucket
        downloaded before log.txt is opened (the bucket's log.txt may replace the cache's)."""
        nonlocal remote
        if paths.remote_url is not None:
            remote = _open_remote(config, paths, resume)
        _claim(paths, lock)
        if remote is not None:
            remote_notes.extend(remote.take(store, checkpoint if resume is not None else None))

    try:
        _on_main(is_main, claim)
        configure_logging(paths.log_file, is_main)
        for note in remote_notes:
            logger.info(note)
        if remote is not None:
            mirror = remote.mirror(store)
            store.mirror = mirror
        resume_tag = _on_main(is_main, lambda: _choose_checkpoint(store, resume, checkpoint))
        if isinstance(resume_tag, _Finished):
            return paths
        output_path = config.output_path if paths.remote_url is not None else paths.output_path
        resolved = config.model_copy(update={"output_path": output_path, "run_id": paths.run_id})
        resolved_tree = resolved.model_dump(mode="json", serialize_as_any=True)
        trackers = [build(tracker_config, paths, resolved_tree) for tracker_config in config.trackers] if is_main else []

        def write_config() -> None:
            """Once a resume's checkpoint loaded: a refused resume leaves the run's config.yaml as it was."""
            if is_main:
                paths.config_file.write_text(yaml.safe_dump(resolved_tree, sort_keys=False))

        log_writer = LogWriter(paths.metrics_file, paths.summary_file, is_main_process=is_main, trackers=trackers)
        if is_main and resume_tag is None and resume == AUTO:
            # what a start killed before its first checkpoint logged
            log_writer.keep_first_rows(0)
            log_writer.resumed_at(0)
        trainer = build_trainer(config, paths, log_writer, setup, mirror)
        try:
            trainer.train(resume_tag=resume_tag, skip_if_finished=checkpoint is None, on_start=write_config)
        except CheckpointWriteError as error:
            newest = store.newest_resumable()
            where = f"'{newest.tag}' ({newest.iteration})" if newest else "none (no complete checkpoint)"
            raise CheckpointWriteError(f"{error}; the checkpoint the run can resume from: {where}") from None
        finally:
            _close_checkpoints(trainer.context.checkpoints)
    finally:
        if log_writer is not None:
            log_writer.close()
        try:
            if mirror is not None:
                _finish_uploads(mirror)
        finally:
            if remote is not None:
                remote.lease.release()
            lock.release()
    return paths


def _close_checkpoints(checkpoints: CheckpointManager) -> None:
    """Wait for the queued writes; while training fails, a failure here is logged instead of taking the place
    of the first one (the one reported, with the checkpoint to resume from)."""
    failing = sys.exc_info()[1] is not None
    try:
        checkpoints.close()
    except CheckpointWriteError as error:
        if not failing:
            raise
        logger.error(f"a queued checkpoint write failed too: {error}")


def _finish_uploads(mirror: BucketMirror) -> None:
    """Wait for the bucket; what could not be uploaded is an error, unless the run already failed (then logged)."""
    failing = sys.exc_info()[1] is not None
    try:
        mirror.close()
    except UploadError as error:
        if not failing:
            raise
        logger.error(str(error))


def _run_paths(config: RunConfig, resume: str | None) -> PathProvider:
    if is_url(config.output_path):
        return _remote_run_paths(config, resume)
    if resume == AUTO:
        if config.run_id is None:
            raise ConfigError("--resume auto needs the run's id: add run_id=ID, the same in every launch of the job")
        return PathProvider(config.output_path, config.run_id)
    if resume is not None:
        return PathProvider.for_existing_run(resume, config.output_path)
    return PathProvider(config.output_path, config.run_id or distributed.broadcast_from_main(PathProvider.new_run_id()))


def _remote_run_paths(config: RunConfig, resume: str | None) -> PathProvider:
    """A run in a bucket: its id names it there, and its cache folder here."""
    url = str(config.output_path)
    if resume == AUTO and config.run_id is None:
        raise ConfigError("--resume auto needs the run's id: add run_id=ID, the same in every launch of the job")
    if resume not in (None, AUTO) and (Path(resume).name != resume or is_url(resume)):
        raise ConfigError(f"--resume {resume}: with output_path {url}, name the run by its id (its folder in the bucket)")
    run_id = config.run_id if resume in (None, AUTO) else resume
    run_id = run_id or distributed.broadcast_from_main(PathProvider.new_run_id())
    paths = PathProvider(cache_folder(url, config.cache_dir), run_id)
    paths.remote_url = f"{url}/{run_id}"
    return paths


def _open_remote(config: RunConfig, paths: PathProvider, resume: str | None) -> RemoteRun:
    """The run's bucket folder, checked before anything is written: a new run must not exist there, a
    resumed one must exist in the bucket or in the cache."""
    remote = RemoteRun(str(config.output_path), paths.run_dir, config.storage_options, config.upload_give_up_seconds)
    if resume is None and remote.holds_run():
        raise ConfigError(f"{paths.remote_url} already holds a run; use --resume {paths.run_id} to continue it")
    if resume not in (None, AUTO) and not remote.holds_run() and not paths.config_file.exists():
        raise FileNotFoundError(f"unknown run '{resume}': no such run in {config.output_path}")
    return remote


def _claim(paths: PathProvider, lock: RunLock) -> None:
    """Create the run directory and take its lock before anything in it is read or written."""
    try:
        paths.create()
    except OSError as error:
        raise ConfigError(f"output_path: cannot create the run directory {paths.run_dir}: {error.strerror or error}") from None
    try:
        lock.acquire()
    except RunInUseError as error:
        raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class _Finished:
    """The run has finished and holds no checkpoint training could continue from: nothing to do."""


def _choose_checkpoint(store: CheckpointStore, resume: str | None, checkpoint: str | None) -> str | _Finished | None:
    """Finish what a stopped run left half done, then pick the checkpoint to resume from (None: start fresh)."""
    for action in store.recover():
        logger.info(action)
    newest = store.newest_resumable()
    if resume is not None and checkpoint is None and _ends_after(store.info("last"), newest):
        logger.info(
            f"run {store.run_id} has finished: its checkpoint 'last' holds no optimizer state to continue from; nothing left to do"
        )
        return _Finished()
    if resume is None or (resume == AUTO and newest is None):
        leftovers = store.tags()
        if resume is None and (leftovers or store.directory.parent.joinpath("metrics.jsonl").exists()):
            raise ConfigError(f"run directory {store.directory.parent} already holds a run; use --resume to continue it")
        if leftovers:
            store.set_aside_after(TrainingIteration(-1, -1, -1))
            logger.warning(f"run {store.run_id} has no complete checkpoint; starting it afresh (its files are set aside)")
        return None
    if checkpoint is not None:
        store.refuse_if_changed(checkpoint)
        return checkpoint
    if newest is None:
        raise ConfigError(f"run {store.directory.parent} has no complete checkpoint to resume from")
    return _newest_sound(store)


def _newest_sound(store: CheckpointStore) -> str:
    """The newest resumable checkpoint whose files are those written; each damaged one skipped is logged."""
    for info in store.resumable_newest_first():
        changed = store.content_check(info.tag).changed
        if changed:
            logger.warning(
                f"checkpoint '{info.tag}' ({info.iteration}) is skipped: {', '.join(changed)} changed since it was "
                "written (content hash); trying the next newest"
            )
            continue
        logger.info(f"resuming from the newest complete checkpoint '{info.tag}' ({info.iteration})")
        return info.tag
    raise CheckpointLoadError(f"run {store.directory.parent} has no undamaged checkpoint to resume from (see the log)")


def _ends_after(last: CheckpointInfo, newest: CheckpointInfo | None) -> bool:
    """`last` (written once training ended) that cannot be resumed, and no resumable checkpoint as new as it."""
    if not last.files or last.resumable or last.iteration is None:
        return False
    return newest is None or newest.iteration < last.iteration


def _on_main(is_main: bool, step: Callable[[], Any]) -> Any:
    """Run `step` on rank 0 and hand its result, or its user error, to every rank."""
    result, problem = None, None
    if is_main:
        try:
            result = step()
        except USER_ERRORS as error:
            problem = error
    result, problem = distributed.broadcast_from_main((result, problem))
    if problem is not None:
        raise problem
    return result


def evaluate(tree: dict[str, Any], *, run: str, checkpoint: str) -> dict[str, float]:
    """Load `checkpoint` of `run` and run every callback's `at_eval`; metrics go to `eval/{checkpoint}.jsonl`
    (printed only, when the run directory is read-only)."""
    config = parse_run_config(tree)
    remote_url = run if is_url(run) else f"{config.output_path}/{run}" if is_url(config.output_path) else None
    setup = distributed.setup(config.device)
    is_main = setup.rank == 0
    configure_logging(None, is_main)
    download = None
    if remote_url is not None:  # the run's files and this checkpoint's, in a folder of their own
        download = Path(_on_main(is_main, lambda: tempfile.mkdtemp(prefix=".eval-", dir=_made(config.cache_dir))))
        run = str(_on_main(is_main, lambda: fetch_run(remote_url, download, config.storage_options, tags=[checkpoint])))
    paths = PathProvider.for_existing_run(run, config.output_path)
    lock = RunLock(paths.run_dir)
    try:
        eval_dir = Path(_on_main(is_main, lambda: _prepare_evaluation(paths, lock, checkpoint)))
        log_writer = LogWriter(eval_dir / f"{checkpoint}.jsonl", eval_dir / f"{checkpoint}.summary.json", is_main)
        trainer = build_trainer(config, paths, log_writer, setup)
        try:
            trainer.evaluate(checkpoint)
        finally:
            trainer.context.checkpoints.close()
            log_writer.close()
        if remote_url is not None and is_main:
            results = Bucket(remote_url, config.storage_options)
            for path in (log_writer.metrics_file, log_writer.summary_file):
                results.upload(path, f"eval/{path.name}")
        return log_writer.summary
    finally:
        lock.release()
        if download is not None and is_main:
            shutil.rmtree(download, ignore_errors=True)
        distributed.teardown()


def _made(folder: Path) -> Path:
    folder = folder.expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _prepare_evaluation(paths: PathProvider, lock: RunLock, checkpoint: str) -> str:
    """Finish what a crashed run left half done, unless a live process owns the run (then its unfinished
    saves are its own) or the directory is read-only (then they are reported); refuse a damaged `checkpoint`.
    Returns where eval results go."""
    store = CheckpointStore(paths.checkpoint_dir, paths.run_id)
    try:
        lock.acquire()
    except RunInUseError:
        logger.info(f"run {paths.run_id} is being trained; checkpoints it is writing now are left alone")
    except OSError:
        for leftover in store.staged_leftovers():
            logger.warning(f"{leftover.name} is left from an unfinished save (read-only run directory: not cleaned up)")
        logger.warning(f"{paths.run_dir} is read-only: evaluation results are printed, not saved")
        store.refuse_if_changed(checkpoint)
        return tempfile.mkdtemp(prefix="noether-eval-")
    else:
        for action in store.recover():
            logger.info(action)
    store.refuse_if_changed(checkpoint)
    eval_dir = paths.run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    return str(eval_dir)
