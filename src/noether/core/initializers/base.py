"""Initializers set a model's weights once, when a run starts (never on resume: the checkpoint has them)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from noether.core.config import RegistryConfig


class InitializerConfig(RegistryConfig):
    """Config of any initializer, listed under a model config's `initializers`."""


class Initializer:
    def __init__(self, initializer_config: InitializerConfig, output_path: Path) -> None:
        self.config = initializer_config
        self.output_path = output_path

    def initialize(self, model: nn.Module) -> None:
        """Set the weights of `model` (a ModelBase: its `name` and `config` are there to read)."""
        raise NotImplementedError
