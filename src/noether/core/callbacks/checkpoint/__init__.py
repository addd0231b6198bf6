from noether.core.callbacks.checkpoint.checkpoint import CheckpointCallback, CheckpointCallbackConfig

__all__ = ["CheckpointCallback", "CheckpointCallbackConfig"]
