"""What goes into checkpoint files, how a set of them is written, and how it comes back.

A checkpoint of the trainer is a set of files under one tag: each (sub)model's weights and
optimizer state and the trainer state. Every file is written atomically by the CheckpointWriter,
but a crash between two files of a set would still leave an old and a new file under the same tag
(fatal for `latest`, which is overwritten at every save). So the trainer stages a set under hidden
names first and moves it under the final names only once all of it is written, the trainer state
last; `recover_checkpoint_sets` finishes that move after a crash.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noether.core.models.base import Model, ModelBase, select_models
from noether.core.providers.path import PathProvider
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError, CheckpointWriteError, CheckpointWriter, load_checkpoint

STAGED_SUFFIX = ".staged"
TRAINER_STATE_KEYS = ("training_iteration", "callbacks", "rng_states", "grad_scaler", "metrics_file_size")


def model_checkpoint_payloads(
    paths: PathProvider,
    model: ModelBase,
    tag: str,
    iteration: TrainingIteration,
    *,
    save_weights: bool = True,
    save_optim: bool = False,
    model_names: list[str] | None = None,
    save_frozen_weights: bool = False,
) -> dict[Path, dict[str, Any]]:
    """`{model}_cp={tag}_model.th` / `_optim.th` of each selected (sub)model and what goes into it.

    Frozen models carry no optimizer and are rebuilt identically from config, so their weights are
    written only when asked.
    """
    payloads = {}
    for name, leaf in select_models(model, model_names).items():
        if save_weights and (save_frozen_weights or not leaf.is_frozen):
            payloads[paths.checkpoint_file(name, tag, "model")] = model_payload(leaf, leaf.state_dict(), tag, iteration, paths.run_id)
        if save_optim and leaf.optimizer is not None:
            payloads[paths.checkpoint_file(name, tag, "optim")] = {
                **stamp(tag, iteration, paths.run_id),
                "state_dict": leaf.optimizer.state_dict(),
            }
    return payloads


def model_payload(
    model: Model, state_dict: dict[str, torch.Tensor], tag: str, iteration: TrainingIteration, run_id: str
) -> dict[str, Any]:
    return {"state_dict": state_dict, **stamp(tag, iteration, run_id), "model_config": model.config.model_dump(mode="json")}


def stamp(tag: str, iteration: TrainingIteration, run_id: str) -> dict[str, Any]:
    """What every checkpoint file records about itself, so a set of files can be checked for consistency."""
    return {"checkpoint_tag": tag, "training_iteration": iteration.to_dict(), "run_id": run_id}


# --------------------------------------------------------------------------------- checkpoint sets
def staged_path(path: Path) -> Path:
    """The hidden name under which a file of a checkpoint set waits until the whole set is written."""
    return path.with_name(f".{path.name}{STAGED_SUFFIX}")


class CheckpointSetWriter:
    """Writes checkpoint sets so that the files under a tag always belong to one complete set.

    The files of a set are staged under hidden names, the trainer state last, and the writer
    thread, once it has written them all, moves them under the final names (trainer state last).
    Until then the previous set under that tag stays untouched; the training loop never waits.
    """

    def __init__(self, writer: CheckpointWriter) -> None:
        self.writer = writer

    def save(self, files: dict[Path, dict[str, Any]], trainer_file: Path, trainer_state: dict[str, Any]) -> None:
        # the commit's renames and directory sync make the set durable, not each staged file's
        for path, payload in files.items():
            self.writer.save(staged_path(path), payload, sync_directory=False)
        self.writer.save(staged_path(trainer_file), {**trainer_state, "files": [path.name for path in files]}, sync_directory=False)
        self.writer.call_after_writes(lambda: _commit_complete(trainer_file, list(files)))

    def finish(self) -> None:
        """Wait until every set is written and under its final names."""
        self.writer.wait()


def _commit_complete(trainer_file: Path, files: list[Path]) -> None:
    """Move a staged set into place if every file of it was written; a failed write was reported already."""
    missing = [path.name for path in [*files, trainer_file] if not staged_path(path).exists()]
    if missing:
        raise CheckpointWriteError(f"checkpoint set of {trainer_file.name} left incomplete (no {', '.join(missing)}); not moved into place")
    _commit(trainer_file, files)


def recover_checkpoint_sets(checkpoint_dir: Path) -> None:
    """After a crash: move every completely staged set under its final names, delete incomplete ones.

    Only for a run directory that no other process is writing to (the start of a resume).
    """
    for staged_trainer in sorted(checkpoint_dir.glob(f".*_trainer.th{STAGED_SUFFIX}")):
        trainer_file = checkpoint_dir / staged_trainer.name[1 : -len(STAGED_SUFFIX)]
        files = load_checkpoint(staged_trainer).get("files", [])
        _commit(trainer_file, [checkpoint_dir / name for name in files])
    for leftover in checkpoint_dir.glob(f".*{STAGED_SUFFIX}"):
        leftover.unlink()


def _commit(trainer_file: Path, files: list[Path]) -> None:
    for path in files:
        staged = staged_path(path)
        if staged.exists():  # else an interrupted commit already moved it
            os.replace(staged, path)
    os.replace(staged_path(trainer_file), trainer_file)
    directory = os.open(trainer_file.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the renames durable
    finally:
        os.close(directory)


# --------------------------------------------------------------------------------- loading
def load_trainer_state(path: Path) -> dict[str, Any]:
    payload = load_checkpoint(path)
    missing = [key for key in TRAINER_STATE_KEYS if key not in payload]
    if missing:
        raise CheckpointLoadError(f"{path} is not a trainer state written by noether (no {', '.join(missing)})")
    return payload


def checkpoint_iteration(model: ModelBase, paths: PathProvider, tag: str) -> TrainingIteration:
    """The training iteration at which checkpoint `tag` was written: from its trainer state, else its first weights file."""
    trainer_file = paths.checkpoint_file(model.name, tag, "trainer")
    if trainer_file.exists():
        return TrainingIteration.from_dict(load_trainer_state(trainer_file)["training_iteration"])
    for name in model.named_models():
        weights_file = paths.checkpoint_file(name, tag, "model")
        if weights_file.exists():
            return TrainingIteration.from_dict(_load_stamped(weights_file, None)["training_iteration"])
    raise CheckpointLoadError(f"no checkpoint '{tag}' in {paths.checkpoint_dir} (missing {trainer_file.name})")


def load_model_weights(
    model: ModelBase, paths: PathProvider, tag: str, *, load_optim: bool, expected_iteration: TrainingIteration | None = None
) -> None:
    """Load every (sub)model saved under `tag`; frozen ones without a file keep their built weights.

    With `expected_iteration`, every file must have been written at that iteration: a set of files
    of different checkpoints under one tag cannot be resumed exactly and is refused.
    """
    for name, leaf in model.named_models().items():
        weights_file = paths.checkpoint_file(name, tag, "model")
        if weights_file.exists() or not leaf.is_frozen:
            _load_into(leaf, _load_stamped(weights_file, expected_iteration)["state_dict"], weights_file)
        if load_optim and leaf.optimizer is not None:
            optim_file = paths.checkpoint_file(name, tag, "optim")
            _load_into(leaf.optimizer, _load_stamped(optim_file, expected_iteration)["state_dict"], optim_file)


def _load_into(target: torch.nn.Module | torch.optim.Optimizer, state_dict: Any, path: Path) -> None:
    """`target.load_state_dict`, with a mismatch reported as a CheckpointLoadError naming the file."""
    try:
        target.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = " ".join(str(error).split())
        raise CheckpointLoadError(f"{path} does not fit this {type(target).__name__}: {reason}") from None


def _load_stamped(path: Path, expected_iteration: TrainingIteration | None) -> dict[str, Any]:
    payload = load_checkpoint(path)
    if "state_dict" not in payload or "training_iteration" not in payload:
        raise CheckpointLoadError(f"{path} is not a checkpoint written by noether (no 'state_dict'/'training_iteration')")
    iteration = TrainingIteration.from_dict(payload["training_iteration"])
    if expected_iteration is not None and iteration != expected_iteration:
        raise CheckpointLoadError(
            f"{path} was written at {iteration} but the rest of checkpoint '{payload.get('checkpoint_tag')}' at "
            f"{expected_iteration}; resume from another checkpoint"
        )
    return payload


# --------------------------------------------------------------------------------- RNG
def capture_rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states; the long integer states as tensors, cheap to snapshot."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_name, numpy_keys, *numpy_rest = np.random.get_state()
    states = {
        "python": [python_version, torch.tensor(python_state, dtype=torch.int64), python_gauss],
        "numpy": [numpy_name, torch.from_numpy(numpy_keys.astype(np.int64)), *numpy_rest],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    python_version, python_state, python_gauss = states["python"]
    random.setstate((python_version, tuple(python_state.tolist()), python_gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
