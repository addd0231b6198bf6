"""Experiment trackers: every metrics row of a run also goes to TensorBoard, W&B or MLflow."""

from noether.core.trackers.active import ActiveTrackers
from noether.core.trackers.base import Tracker, TrackerConfig
from noether.core.trackers.mlflow import MlflowTracker, MlflowTrackerConfig
from noether.core.trackers.tensorboard import TensorBoardTracker, TensorBoardTrackerConfig
from noether.core.trackers.wandb import WandbTracker, WandbTrackerConfig

__all__ = [
    "ActiveTrackers",
    "MlflowTracker",
    "MlflowTrackerConfig",
    "TensorBoardTracker",
    "TensorBoardTrackerConfig",
    "Tracker",
    "TrackerConfig",
    "WandbTracker",
    "WandbTrackerConfig",
]
