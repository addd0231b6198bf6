"""A run from a config: build everything, train or evaluate, write the run directory."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict

from noether.core import distributed
from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.context import CallbackContext
from noether.core.callbacks.periodic import PeriodicDataIteratorCallbackConfig
from noether.core.config import ConfigError, build, by_kind, validate_config
from noether.core.models.base import ModelBaseConfig, build_model
from noether.core.providers.metric_property import MetricPropertyProvider
from noether.core.providers.path import PathProvider
from noether.core.writers.checkpoint_writer import CheckpointWriter
from noether.core.writers.log_writer import LogWriter
from noether.data.base import DatasetBaseConfig
from noether.data.container import DataContainer
from noether.data.samplers.interleaved import TRAIN_KEY
from noether.training.trainers.base import BaseTrainer, BaseTrainerConfig


class RunConfig(BaseModel):
    """The whole config file."""

    model_config = ConfigDict(extra="forbid")

    output_path: Path = Path("outputs")
    run_id: str | None = None
    seed: int = 0
    device: str = "cpu"
    async_checkpoints: bool = True
    metric_higher_is_better: dict[str, bool] = {}
    datasets: dict[str, by_kind(DatasetBaseConfig)]
    model: by_kind(ModelBaseConfig)
    trainer: by_kind(BaseTrainerConfig)


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
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)


def build_trainer(
    config: RunConfig, paths: PathProvider, log_writer: LogWriter, setup: distributed.DistributedSetup | None = None
) -> BaseTrainer:
    setup = setup or distributed.DistributedSetup(rank=0, world_size=1, device=config.device)
    seed_everything(config.seed)
    data = DataContainer({key: build(dataset_config) for key, dataset_config in config.datasets.items()})
    context = CallbackContext(
        trainer=None,  # set by the trainer itself
        model=build_model(config.model),
        data=data,
        paths=paths,
        log_writer=log_writer,
        metric_properties=MetricPropertyProvider(config.metric_higher_is_better),
        checkpoint_writer=CheckpointWriter(asynchronous=config.async_checkpoints),
        rank=setup.rank,
        world_size=setup.world_size,
    )
    trainer_class = type(config.trainer).configured_class()
    return trainer_class(config.trainer, context, seed=config.seed, device=setup.device)


def train(tree: dict[str, Any], *, resume: str | None = None, checkpoint: str = "latest") -> PathProvider:
    """Train a new run, or continue run `resume` (an id or a directory) from `checkpoint`.

    Under torchrun every process calls this; rank 0 alone writes the run directory.
    """
    config = parse_run_config(tree)
    setup = distributed.setup(config.device)
    try:
        return _train(config, setup, resume, checkpoint)
    finally:
        distributed.teardown()


def _train(config: RunConfig, setup: distributed.DistributedSetup, resume: str | None, checkpoint: str) -> PathProvider:
    is_main = setup.rank == 0
    if resume is None:
        paths = PathProvider(config.output_path, config.run_id or distributed.broadcast_from_main(PathProvider.new_run_id()))
        if paths.metrics_file.exists() or any(paths.checkpoint_dir.glob("*.th")):
            # a directory left by a start that failed on a config error holds nothing to protect
            raise ConfigError(f"run directory {paths.run_dir} already holds a run; use --resume to continue it")
    else:
        paths = PathProvider.for_existing_run(resume, config.output_path)
    if is_main:
        paths.create()
    configure_logging(paths.log_file, is_main)
    log_writer = LogWriter(paths.metrics_file, paths.summary_file, is_main_process=is_main)
    trainer = build_trainer(config, paths, log_writer, setup)

    def write_config() -> None:
        """Once a resume's checkpoint loaded: a refused resume leaves the run's config.yaml as it was."""
        if is_main:
            resolved = config.model_copy(update={"output_path": paths.output_path, "run_id": paths.run_id})
            paths.config_file.write_text(yaml.safe_dump(resolved.model_dump(mode="json", serialize_as_any=True), sort_keys=False))

    try:
        trainer.train(resume_tag=checkpoint if resume is not None else None, on_start=write_config)
    finally:
        trainer.context.checkpoint_writer.close()
    return paths


def evaluate(tree: dict[str, Any], *, run: str, checkpoint: str) -> dict[str, float]:
    """Load `checkpoint` of `run` and run every callback's `at_eval`; metrics go to `eval/{checkpoint}.jsonl`."""
    config = parse_run_config(tree)
    paths = PathProvider.for_existing_run(run, config.output_path)
    setup = distributed.setup(config.device)
    try:
        eval_dir = paths.run_dir / "eval"
        eval_dir.mkdir(exist_ok=True)
        configure_logging(None, setup.rank == 0)
        log_writer = LogWriter(eval_dir / f"{checkpoint}.jsonl", eval_dir / f"{checkpoint}.summary.json", setup.rank == 0)
        trainer = build_trainer(config, paths, log_writer, setup)
        try:
            trainer.evaluate(checkpoint)
        finally:
            trainer.context.checkpoint_writer.close()
        return log_writer.summary
    finally:
        distributed.teardown()
