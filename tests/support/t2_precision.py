"""A test-only trainer that records the dtypes its steps really compute in, for the mixed precision tests.

Configs name it as `kind: tests.support.t2_precision.DtypeRecordingTrainer`. It trains exactly as
ClassificationTrainer does; the records are kept in this module (the run is trained in-process).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from noether.training.trainers.classification import ClassificationTrainer, ClassificationTrainerConfig

RECORDS: list[dict[str, Any]] = []
"""One entry per step: which step, the output dtype of every Linear layer, the dtypes of the
parameters while it ran, the dtype of the loss."""
GRADIENT_DTYPES: list[torch.dtype] = []
"""The dtype of every gradient that reached a parameter."""


def clear() -> None:
    RECORDS.clear()
    GRADIENT_DTYPES.clear()


class DtypeRecordingTrainerConfig(ClassificationTrainerConfig):
    pass


class DtypeRecordingTrainer(ClassificationTrainer):
    config: DtypeRecordingTrainerConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hooked: set[int] = set()

    def train_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._recorded("train", super().train_step, model, batch)

    def evaluation_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._recorded("evaluation", super().evaluation_step, model, batch)

    def _recorded(self, step: str, run_step: Any, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for parameter in model.parameters():
            if parameter.requires_grad and id(parameter) not in self._hooked:
                parameter.register_hook(lambda gradient: GRADIENT_DTYPES.append(gradient.dtype))
                self._hooked.add(id(parameter))
        activations: list[torch.dtype] = []
        linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
        handles = [module.register_forward_hook(lambda _m, _i, output: activations.append(output.dtype)) for module in linears]
        try:
            losses = run_step(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        RECORDS.append(
            {
                "step": step,
                "linear_outputs": activations,
                "parameters": sorted({str(p.dtype) for p in model.parameters()}),
                "loss": losses["total"].dtype,
            }
        )
        return losses
