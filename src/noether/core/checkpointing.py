"""What goes into checkpoint files, and how it comes back: model weights, optimizer state, trainer state."""

from __future__ import annotations

import random
from pathlib import Path
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
            writer.save(path, {**stamp(tag, iteration, paths.run_id), "state_dict": leaf.optimizer.state_dict()})
            written.append(path.name)
    return written


def model_payload(
    model: Model, state_dict: dict[str, torch.Tensor], tag: str, iteration: TrainingIteration, run_id: str
) -> dict[str, Any]:
    return {"state_dict": state_dict, **stamp(tag, iteration, run_id), "model_config": model.config.model_dump(mode="json")}


def stamp(tag: str, iteration: TrainingIteration, run_id: str) -> dict[str, Any]:
    """What every checkpoint file records about itself, so a set of files can be checked for consistency."""
    return {"checkpoint_tag": tag, "training_iteration": iteration.to_dict(), "run_id": run_id}


def load_model_weights(
    model: ModelBase, paths: PathProvider, tag: str, *, load_optim: bool, expected_iteration: TrainingIteration | None = None
) -> None:
    """Load every (sub)model saved under `tag`; frozen ones without a file keep their built weights.

    With `expected_iteration`, every file must have been written at that iteration: a set of files
    of which only some were replaced (a crash while `latest` was being overwritten) is refused.
    """
    for name, leaf in model.named_models().items():
        weights_file = paths.checkpoint_file(name, tag, "model")
        if weights_file.exists() or not leaf.is_frozen:
            leaf.load_state_dict(_load_stamped(weights_file, expected_iteration)["state_dict"])
        if load_optim and leaf.optimizer is not None:
            leaf.optimizer.load_state_dict(_load_stamped(paths.checkpoint_file(name, tag, "optim"), expected_iteration)["state_dict"])


def _load_stamped(path: Path, expected_iteration: TrainingIteration | None) -> dict[str, Any]:
    payload = load_checkpoint(path)
    if "state_dict" not in payload or "training_iteration" not in payload:
        raise CheckpointLoadError(f"{path} is not a checkpoint written by this trainer (no 'state_dict'/'training_iteration')")
    iteration = TrainingIteration.from_dict(payload["training_iteration"])
    if expected_iteration is not None and iteration != expected_iteration:
        raise CheckpointLoadError(
            f"{path} was written at {iteration} but the trainer state of the same checkpoint at {expected_iteration}: "
            "the set was only partly replaced (the process died while overwriting it); resume from another checkpoint"
        )
    return payload


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
