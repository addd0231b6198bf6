"""What goes into checkpoint files, and how it comes back: model weights, optimizer state, trainer state."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from noether.core.models.base import Model, ModelBase, select_models
from noether.core.providers.path import PathProvider
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError, CheckpointWriter, load_checkpoint


def save_model_checkpoint(
    writer: CheckpointWriter,
    paths: PathProvider,
    model: ModelBase,
    tag: str,
    iteration: TrainingIteration,
    *,
    save_weights: bool = True,
    save_optim: bool = False,
    model_names: list[str] | None = None,
    save_frozen_weights: bool = False,
) -> list[str]:
    """Write `{model}_cp={tag}_model.th` / `_optim.th` for each selected (sub)model; returns their names.

    Frozen models carry no optimizer and are rebuilt identically from config, so their weights are
    written only when asked.
    """
    written = []
    for name, leaf in select_models(model, model_names).items():
        if save_weights and (save_frozen_weights or not leaf.is_frozen):
            path = paths.checkpoint_file(name, tag, "model")
            writer.save(path, model_payload(leaf, leaf.state_dict(), tag, iteration, paths.run_id))
            written.append(path.name)
        if save_optim and leaf.optimizer is not None:
            path = paths.checkpoint_file(name, tag, "optim")
            writer.save(path, leaf.optimizer.state_dict())
            written.append(path.name)
    return written


def model_payload(
    model: Model, state_dict: dict[str, torch.Tensor], tag: str, iteration: TrainingIteration, run_id: str
) -> dict[str, Any]:
    return {
        "state_dict": state_dict,
        "checkpoint_tag": tag,
        "training_iteration": iteration.to_dict(),
        "run_id": run_id,
        "model_config": model.config.model_dump(mode="json"),
    }


def load_model_weights(model: ModelBase, paths: PathProvider, tag: str, *, load_optim: bool) -> None:
    """Load every (sub)model saved under `tag`; frozen ones without a file keep their built weights."""
    for name, leaf in model.named_models().items():
        weights_file = paths.checkpoint_file(name, tag, "model")
        if weights_file.exists() or not leaf.is_frozen:
            payload = load_checkpoint(weights_file)
            if "state_dict" not in payload:
                raise CheckpointLoadError(f"{weights_file} is not a model checkpoint (no 'state_dict')")
            leaf.load_state_dict(payload["state_dict"])
        if load_optim and leaf.optimizer is not None:
            leaf.optimizer.load_state_dict(load_checkpoint(paths.checkpoint_file(name, tag, "optim")))


def capture_rng_states() -> dict[str, Any]:
    python_version, python_state, python_gauss = random.getstate()
    numpy_state = np.random.get_state()
    states = {
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    python_version, python_state, python_gauss = states["python"]
    random.setstate((python_version, tuple(python_state), python_gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
