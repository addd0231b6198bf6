"""Initializers set a model's weights once, when a run starts (never on resume: the checkpoint has them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from noether.core.config import ConfigError, RegistryConfig, build

if TYPE_CHECKING:
    from noether.core.models.base import ModelBase


class InitializerConfig(RegistryConfig):
    """Config of any initializer, listed under a model config's `initializers`."""


class Initializer:
    def __init__(self, initializer_config: InitializerConfig, output_path: Path) -> None:
        self.config = initializer_config
        self.output_path = output_path

    def initialize(self, model: ModelBase) -> None:
        raise NotImplementedError


def apply_initializers(model: ModelBase, output_path: Path) -> None:
    """Run the initializers of the model and of each submodel, outer ones first, in the order listed.

    An initializer's error names where it is configured, like any config error.
    """
    from noether.core.models.base import ModelBase

    for module in model.modules():
        if not isinstance(module, ModelBase):
            continue
        for index, initializer_config in enumerate(module.config.initializers):
            try:
                build(initializer_config, output_path).initialize(module)
            except ConfigError as error:
                raise ConfigError(f"model '{module.name}' initializers[{index}]: {error}") from None
