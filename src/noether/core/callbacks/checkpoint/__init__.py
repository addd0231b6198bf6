from noether.core.callbacks.checkpoint.best_checkpoint import BestCheckpointCallback, BestCheckpointCallbackConfig
from noether.core.callbacks.checkpoint.checkpoint import CheckpointCallback, CheckpointCallbackConfig
from noether.core.callbacks.checkpoint.ema import EmaCallback, EmaCallbackConfig

__all__ = [
    "BestCheckpointCallback",
    "BestCheckpointCallbackConfig",
    "CheckpointCallback",
    "CheckpointCallbackConfig",
    "EmaCallback",
    "EmaCallbackConfig",
]
