from noether.core.models.base import CompositeModel, Model, ModelBase, ModelBaseConfig, select_models
from noether.core.models.optimizer import OptimizerConfig, ScheduleConfig

__all__ = ["CompositeModel", "Model", "ModelBase", "ModelBaseConfig", "OptimizerConfig", "ScheduleConfig", "select_models"]
