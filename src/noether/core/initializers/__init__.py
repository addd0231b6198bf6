from noether.core.initializers.base import Initializer, InitializerConfig, apply_initializers
from noether.core.initializers.previous_run import PreviousRunInitializer, PreviousRunInitializerConfig

__all__ = ["Initializer", "InitializerConfig", "PreviousRunInitializer", "PreviousRunInitializerConfig", "apply_initializers"]
