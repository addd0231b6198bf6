from noether.core.callbacks.default.learning_rate import LearningRateCallback, LearningRateCallbackConfig
from noether.core.callbacks.default.progress import ProgressCallback, ProgressCallbackConfig
from noether.core.callbacks.default.training_loss import TrainingLossCallback, TrainingLossCallbackConfig

__all__ = [
    "LearningRateCallback",
    "LearningRateCallbackConfig",
    "ProgressCallback",
    "ProgressCallbackConfig",
    "TrainingLossCallback",
    "TrainingLossCallbackConfig",
]
