from noether.core.callbacks.base import CallbackBase, CallBackBaseConfig
from noether.core.callbacks.checkpoint import (
    BestCheckpointCallback,
    BestCheckpointCallbackConfig,
    CheckpointCallback,
    CheckpointCallbackConfig,
    EmaCallback,
    EmaCallbackConfig,
)
from noether.core.callbacks.early_stopping import (
    FixedEarlyStopper,
    FixedEarlyStopperConfig,
    MetricEarlyStopper,
    MetricEarlyStopperConfig,
)
from noether.core.callbacks.periodic import PeriodicCallback, PeriodicDataIteratorCallback

__all__ = [
    "BestCheckpointCallback",
    "BestCheckpointCallbackConfig",
    "CallBackBaseConfig",
    "CallbackBase",
    "CheckpointCallback",
    "CheckpointCallbackConfig",
    "EmaCallback",
    "EmaCallbackConfig",
    "FixedEarlyStopper",
    "FixedEarlyStopperConfig",
    "MetricEarlyStopper",
    "MetricEarlyStopperConfig",
    "PeriodicCallback",
    "PeriodicDataIteratorCallback",
]
