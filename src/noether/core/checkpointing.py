"""What goes into a checkpoint of a model and how it comes back; where it lies on disk is the
CheckpointStore's business (core/checkpoint_store.py)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from noether.core import fsdp
from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.models.base import Model, ModelBase, select_models
from noether.core.utils.formatting import one_line
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError

TRAINER_STATE_KEYS = ("training_iteration", "callbacks", "rng_states", "grad_scaler", "metrics_rows")


def model_members(
    model: ModelBase,
    *,
    save_weights: bool = True,
    save_optim: bool = False,
    model_names: list[str] | None = None,
    save_frozen_weights: bool = False,
    sharded: bool = False,
) -> dict[Member, dict[str, Any]]:
    """Weights and optimizer state of each selected (sub)model, as checkpoint members.

    Frozen models carry no optimizer and are rebuilt identically from config, so their weights are
    written only when asked. `sharded` optimizer states are keyed by parameter name (what a sharded
    checkpoint needs to load into another number of processes).
    """
    members = {}
    for name, leaf in select_models(model, model_names).items():
        if save_weights and (save_frozen_weights or not leaf.is_frozen):
            members[Member(name, "model")] = weights_payload(leaf, leaf.state_dict())
        if save_optim and leaf.optimizer is not None:
            state = fsdp.optimizer_state(leaf, leaf.optimizer) if sharded else leaf.optimizer.state_dict()
            members[Member(name, "optim")] = {"state_dict": state}
    return members


def weights_payload(model: Model | ModelBase, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"state_dict": state_dict, "model_config": model.config.model_dump(mode="json")}


def load_trainer_state(store: CheckpointStore, model_name: str, tag: str) -> dict[str, Any]:
    member = Member(model_name, "trainer")
    if not store.exists(member, tag):
        raise CheckpointLoadError(f"no checkpoint '{tag}' to resume from: {store.path(member, tag)} does not exist")
    payload = store.load(member, tag)
    missing = [key for key in TRAINER_STATE_KEYS if key not in payload]
    if missing:
        raise CheckpointLoadError(
            f"{store.path(member, tag)} is not {member.describe()} written by noether (no {', '.join(missing)})"
        )
    return payload


def load_model_weights(
    model: ModelBase, store: CheckpointStore, tag: str, *, load_optim: bool, expected_iteration: TrainingIteration | None = None
) -> None:
    """Load every (sub)model saved under `tag`; frozen ones without a file keep their built weights.

    With `expected_iteration`, every file must have been written at that iteration: a set of files
    of different checkpoints under one tag cannot be resumed exactly and is refused.
    """
    for name, leaf in model.named_models().items():
        weights = Member(name, "model")
        payload = None
        if store.is_sharded(weights, tag) and (store.exists(weights, tag) or not leaf.is_frozen):
            payload = store.load_into(weights, tag, leaf.state_dict(), expected_iteration=expected_iteration)
            _load_into(leaf, payload["state_dict"], store.path(weights, tag))
        elif store.exists(weights, tag) or not leaf.is_frozen:
            payload = store.load(weights, tag, expected_iteration=expected_iteration)
            if fsdp.sharded_modules(leaf):  # a whole state dict into a sharded model: each rank keeps its part
                set_model_state_dict(leaf, payload["state_dict"], options=StateDictOptions(full_state_dict=True))
            else:
                _load_into(leaf, payload["state_dict"], store.path(weights, tag))
        if load_optim and leaf.optimizer is not None:
            _check_optimizer_class(name, leaf, payload, tag)
            optim = Member(name, "optim")
            if not store.exists(optim, tag):
                raise CheckpointLoadError(
                    f"checkpoint '{tag}' holds no optimizer state of {name} ({store.path(optim, tag).name}), so training "
                    "cannot continue from it; resume from a checkpoint saved with optimizer state "
                    "(CheckpointCallback save_optim / save_latest_optim)"
                )
            if store.is_sharded(optim, tag):
                template = fsdp.optimizer_state(leaf, leaf.optimizer)
                fsdp.load_optimizer_state(
                    leaf,
                    leaf.optimizer,
                    store.load_into(optim, tag, template, expected_iteration=expected_iteration)["state_dict"],
                )
            elif fsdp.sharded_modules(leaf):
                raise CheckpointLoadError(
                    f"{store.path(optim, tag)} is a whole optimizer state, written without trainer.parallelism=fsdp; "
                    "a sharded run resumes from sharded (.dcp) optimizer states only"
                )
            else:
                _load_into(
                    leaf.optimizer,
                    store.load(optim, tag, expected_iteration=expected_iteration)["state_dict"],
                    store.path(optim, tag),
                )


def _check_optimizer_class(name: str, leaf: Model, weights_payload: dict[str, Any] | None, tag: str) -> None:
    """Optimizer state carries over only to an optimizer of the class that wrote it."""
    saved = ((weights_payload or {}).get("model_config") or {}).get("optimizer") or {}
    configured = leaf.config.optimizer.kind if leaf.config.optimizer is not None else None
    if saved.get("kind") is not None and configured is not None and saved["kind"] != configured:
        raise CheckpointLoadError(
            f"checkpoint '{tag}' holds the optimizer state of {saved['kind']} for {name}, but the config's optimizer "
            f"is {configured}: resume with {saved['kind']}, or start a new run from these weights (PreviousRunInitializer)"
        )


def _load_into(target: torch.nn.Module | torch.optim.Optimizer, state_dict: Any, path: Any) -> None:
    """`target.load_state_dict`, with a mismatch reported as a CheckpointLoadError naming the file."""
    try:
        target.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = one_line(error)
        raise CheckpointLoadError(f"{path} does not fit this {type(target).__name__}: {reason}") from None


# --------------------------------------------------------------------------------- RNG
def capture_rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states; the long integer states as tensors, cheap to snapshot."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_name, numpy_keys, *numpy_rest = np.random.get_state()
    states = {
        # through NumPy: a third of torch.tensor's time on the 625-integer tuple (this runs before most steps' hooks)
        "python": [python_version, torch.from_numpy(np.array(python_state, dtype=np.int64)), python_gauss],
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
