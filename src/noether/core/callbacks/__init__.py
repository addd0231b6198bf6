from noether.core.callbacks.base import CallbackBase, CallBackBaseConfig
from noether.core.callbacks.checkpoint import CheckpointCallback, CheckpointCallbackConfig
from noether.core.callbacks.periodic import PeriodicCallback, PeriodicDataIteratorCallback

__all__ = [
    "CallBackBaseConfig",
    "CallbackBase",
    "CheckpointCallback",
    "CheckpointCallbackConfig",
    "PeriodicCallback",
    "PeriodicDataIteratorCallback",
]
