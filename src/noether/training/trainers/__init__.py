from noether.training.trainers.base import BaseTrainer, BaseTrainerConfig
from noether.training.trainers.classification import ClassificationTrainer, ClassificationTrainerConfig

__all__ = ["BaseTrainer", "BaseTrainerConfig", "ClassificationTrainer", "ClassificationTrainerConfig"]
