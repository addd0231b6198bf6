"""Sharding models with FSDP2 (`fully_shard`): each rank holds 1/N of every parameter, gradient and
optimizer state, and gathers a unit's full weights only while it runs.

Without torchrun (one process) models stay as they are: the sharded checkpoint format still applies,
so a run can move between one process and many.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from noether.core import distributed
from noether.core.config import ConfigError
from noether.core.models.base import ModelBase

PARAM_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shard_model(model: ModelBase, *, precision: str, shard_classes: list[str] | None = None) -> None:
    """`fully_shard` every (sub)model in place: its units first (the direct children holding
    parameters, or every module whose class is named in `shard_classes`), then the model itself.

    Weights are kept in float32; under bfloat16/float16 each unit computes in that type and
    reduces gradients in float32. Must run before optimizers are built (parameters are replaced).
    """
    if not distributed.is_distributed():
        return
    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[precision], reduce_dtype=torch.float32)
    for name, leaf in model.named_models().items():
        if shard_classes:
            units = [module for module in leaf.modules() if module is not leaf and type(module).__name__ in shard_classes]
            if not units:
                found = sorted({type(module).__name__ for module in leaf.modules()})
                raise ConfigError(
                    f"trainer.shard_module_classes: model '{name}' has no module of class {shard_classes} (its classes: {found})"
                )
        else:
            units = [child for child in leaf.children() if any(True for _ in child.parameters())]
        for unit in units:
            fully_shard(unit, mp_policy=policy)
        fully_shard(leaf, mp_policy=policy)


def sharded_modules(model: nn.Module) -> list[FSDPModule]:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Gradients of the micro-batches inside stay local (unsharded) until the next synced backward."""
    modules = sharded_modules(model)
    for module in modules:
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True, recurse=False)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names (sharded under FSDP), complete even before the
    first step, so that it also serves as the template a sharded checkpoint is loaded into."""
    return get_optimizer_state_dict(module, optimizer)


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(module, optimizer, state)
