from noether.training.callbacks.accuracy import AccuracyCallback, AccuracyCallbackConfig
from noether.training.callbacks.offline_loss import OfflineLossCallback, OfflineLossCallbackConfig

__all__ = ["AccuracyCallback", "AccuracyCallbackConfig", "OfflineLossCallback", "OfflineLossCallbackConfig"]
