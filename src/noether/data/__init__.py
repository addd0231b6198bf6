from noether.data.base import DatasetBase, DatasetBaseConfig
from noether.data.container import DataContainer

__all__ = ["DataContainer", "DatasetBase", "DatasetBaseConfig"]
