"""Optimizer and learning-rate schedule of a model, built from config."""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from noether.core.config import import_object
from noether.core.utils.formatting import one_line


class ScheduleConfig(BaseModel):
    """Learning rate as a function of the update: linear warm-up, then constant, cosine or linear decay."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    decay: Literal["constant", "cosine", "linear"] = "constant"
    end_factor: float = Field(0.0, ge=0.0, le=1.0)

    def factor(self, update: int, total_updates: int) -> float:
        """Multiplier of the base learning rate for the step that produces update `update + 1`."""
        warmup_updates = int(self.warmup_fraction * total_updates)
        if update < warmup_updates:
            return (update + 1) / warmup_updates
        if self.decay == "constant":
            return 1.0
        progress = min((update - warmup_updates) / max(total_updates - warmup_updates, 1), 1.0)
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.end_factor + (1.0 - self.end_factor) * shape


class OptimizerConfig(BaseModel):
    """`kind` is a torch optimizer class; other keys are its keyword arguments (checked by name)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    kind: str = "torch.optim.AdamW"
    lr: PositiveFloat
    schedule: ScheduleConfig = ScheduleConfig()

    @field_validator("kind")
    @classmethod
    def _is_optimizer(cls, kind: str) -> str:
        optimizer_class(kind)
        return kind

    @model_validator(mode="after")
    def _known_arguments(self) -> OptimizerConfig:
        accepted = set(inspect.signature(optimizer_class(self.kind)).parameters)
        unknown = sorted(set(self.model_extra or {}) - accepted)
        if unknown:
            message = "{kind} has no argument '{name}'"
            errors = [
                InitErrorDetails(
                    type=PydanticCustomError("optimizer_argument", message, {"kind": self.kind, "name": name}),
                    loc=(name,),
                    input=self.model_extra[name],
                )
                for name in unknown
            ]
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    @model_validator(mode="after")
    def _values_the_optimizer_accepts(self) -> OptimizerConfig:
        """Checked now by building the optimizer on a stand-in parameter, not when training starts."""
        message = "must be a finite number, got {value}"
        errors = [
            InitErrorDetails(type=PydanticCustomError("finite", message, {"value": value}), loc=(name,), input=value)
            for name, value in (self.model_extra or {}).items()
            if not _is_finite(value)
        ]
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        try:
            self.build([torch.nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.kind} rejects these settings: {one_line(error)}") from None
        return self

    def build(self, parameters: Any) -> torch.optim.Optimizer:
        return optimizer_class(self.kind)(parameters, lr=self.lr, **(self.model_extra or {}))


def _is_finite(value: Any) -> bool:
    """False for an infinite or NaN float, also inside a list or tuple (e.g. `betas`)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_finite(item) for item in value)
    return True


def optimizer_class(kind: str) -> type[torch.optim.Optimizer]:
    """The torch optimizer class named by `kind`; ValueError when it is not one."""
    target = import_object(kind)
    if not (isinstance(target, type) and issubclass(target, torch.optim.Optimizer)):
        raise ValueError(f"'{kind}' is not a torch.optim.Optimizer")
    return target
