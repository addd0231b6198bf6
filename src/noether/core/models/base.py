"""Models: a named module with its own optimizer, or a composite of such named submodels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import field_validator
from torch import nn

from noether.core.config import ConfigError, RegistryConfig, build, by_kind
from noether.core.initializers.base import InitializerConfig
from noether.core.models.optimizer import OptimizerConfig


class ModelBaseConfig(RegistryConfig):
    name: str = "model"
    is_frozen: bool = False
    optimizer: OptimizerConfig | None = None
    initializers: list[by_kind(InitializerConfig)] = []
    """Applied once when a run starts (not on resume), e.g. weights of an earlier run for fine-tuning."""

    @field_validator("name")
    @classmethod
    def _usable_in_file_names(cls, name: str) -> str:
        if not name or "/" in name or "\\" in name:
            raise ValueError(f"'{name}' cannot name checkpoint files: it must be non-empty, without '/' or '\\'")
        return name


class ModelBase(nn.Module):
    """A model the trainer can optimize, checkpoint and count; `name` appears in file names."""

    def __init__(self, model_config: ModelBaseConfig) -> None:
        super().__init__()
        self.config = model_config
        self.name = model_config.name
        self.is_frozen = model_config.is_frozen

    def train(self, mode: bool = True) -> ModelBase:
        """Frozen models stay in eval mode: their dropout is off and their normalization statistics fixed."""
        return super().train(mode and not self.is_frozen)

    def named_models(self, prefix: str | None = None) -> dict[str, Model]:
        """Every leaf model by its checkpoint name (`{model}` or `{model}.{submodel}`)."""
        raise NotImplementedError

    def initialize_optimizers(self, total_updates: int) -> None:
        for model in self.named_models().values():
            model.initialize_optimizer(total_updates)

    def set_learning_rates(self, update: int) -> None:
        for model in self.named_models().values():
            model.set_learning_rate(update)

    def optimizer_step(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        for model in self.named_models().values():
            if model.optimizer is None:
                continue
            if grad_scaler is None:
                model.optimizer.step()
            else:
                grad_scaler.step(model.optimizer)

    def optimizer_zero_grad(self) -> None:
        for model in self.named_models().values():
            if model.optimizer is not None:
                model.optimizer.zero_grad(set_to_none=True)

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}


class Model(ModelBase):
    """A single module with its own optimizer and learning-rate schedule."""

    def __init__(self, model_config: ModelBaseConfig) -> None:
        super().__init__(model_config)
        self.optimizer: torch.optim.Optimizer | None = None
        self.total_updates = 0

    def named_models(self, prefix: str | None = None) -> dict[str, Model]:
        return {prefix or self.name: self}

    def initialize_optimizer(self, total_updates: int) -> None:
        """Freeze or build the optimizer; called by the trainer once the model is complete.

        A model without optimizer is not trained, so its parameters stop requiring gradients:
        none are computed for it and it counts as frozen (gradients still flow through it).
        """
        self.total_updates = total_updates
        if self.is_frozen or self.config.optimizer is None:
            self.requires_grad_(False)
            return
        self.optimizer = self.config.optimizer.build([p for p in self.parameters() if p.requires_grad])

    def set_learning_rate(self, update: int) -> None:
        if self.optimizer is None:
            return
        factor = self.config.optimizer.schedule.factor(update, self.total_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.optimizer.lr * factor


class CompositeModel(ModelBase):
    """Named submodels (attributes that are ModelBase), each with its own optimizer or frozen."""

    def named_models(self, prefix: str | None = None) -> dict[str, Model]:
        prefix = prefix or self.name
        models: dict[str, Model] = {}
        for attribute, child in self.named_children():
            if isinstance(child, ModelBase):
                models.update(child.named_models(f"{prefix}.{attribute}"))
        if not models:
            raise TypeError(f"composite model {self.name} has no submodels (attributes that are ModelBase)")
        return models

    def initialize_optimizers(self, total_updates: int) -> None:
        if self.is_frozen:
            self.requires_grad_(False)
        for model in self.named_models().values():
            model.is_frozen = model.is_frozen or self.is_frozen
            model.initialize_optimizer(total_updates)


def select_models(model: ModelBase, model_names: list[str] | None) -> dict[str, Model]:
    """The leaf models named by `model_names` (short submodel names or full dotted names)."""
    models = model.named_models()
    if model_names is None:
        return models
    selected: dict[str, Model] = {}
    for wanted in model_names:
        matches = {name: m for name, m in models.items() if name == wanted or name.endswith(f".{wanted}")}
        if not matches:
            raise ValueError(f"no model named '{wanted}'; models are: {', '.join(models)}")
        selected.update(matches)
    return selected


def build_model(model_config: ModelBaseConfig, **kwargs: Any) -> ModelBase:
    model = build(model_config, **kwargs)
    if not isinstance(model, ModelBase):
        raise TypeError(f"{model_config.kind} does not build a ModelBase")
    return model


def apply_initializers(model: ModelBase, output_path: Path) -> None:
    """Run the initializers of the model and of each submodel, outer ones first, in the order listed.

    An initializer's error names where it is configured, like any config error.
    """
    for module in model.modules():
        if not isinstance(module, ModelBase):
            continue
        for index, initializer_config in enumerate(module.config.initializers):
            try:
                build(initializer_config, output_path).initialize(module)
            except ConfigError as error:
                raise ConfigError(f"model '{module.name}' initializers[{index}]: {error}") from None
