from noether.core.initializers.base import Initializer, InitializerConfig
from noether.core.initializers.previous_run import PreviousRunInitializer, PreviousRunInitializerConfig

__all__ = ["Initializer", "InitializerConfig", "PreviousRunInitializer", "PreviousRunInitializerConfig"]
