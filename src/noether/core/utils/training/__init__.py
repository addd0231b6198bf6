from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration

__all__ = ["TrainingIteration", "UpdateCounter"]
