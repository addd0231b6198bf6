from noether.core.callbacks.checkpoint.best_checkpoint import BestCheckpointCallback, BestCheckpointCallbackConfig
from noether.core.callbacks.checkpoint.checkpoint import CheckpointCallback, CheckpointCallbackConfig

__all__ = ["BestCheckpointCallback", "BestCheckpointCallbackConfig", "CheckpointCallback", "CheckpointCallbackConfig"]
