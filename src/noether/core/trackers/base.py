"""What every experiment tracker is: a config entry under `trackers:` and a receiver of metrics rows."""

from __future__ import annotations

import importlib
from typing import Any

from noether.core.config import RegistryConfig
from noether.core.providers.path import PathProvider


class TrackerConfig(RegistryConfig):
    """Base of the configs listed under the top-level `trackers` key."""


class Tracker:
    """Shows a run's metrics in an external tool. Only rank 0 has trackers.

    `metrics.jsonl` stays the record of the run; a tracker mirrors it. Building one touches nothing:
    `start` opens the tool's run (after a resume: drops or notes what follows `resumed_update`) and,
    when it starts fresh, records `run_config`, the resolved config of the run; `log` gets every
    row with the update number as its step; `close` ends the tool's run.
    """

    def __init__(self, config: TrackerConfig, paths: PathProvider, run_config: dict[str, Any]) -> None:
        self.config = config
        self.paths = paths
        self.run_config = run_config

    @property
    def name(self) -> str:
        return type(self).__name__

    def start(self, resumed_update: int | None) -> None:
        """Open the tool's run; `resumed_update` is the update of the checkpoint a resume continues from."""
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """End the tool's run; also called after a failed `start` or `log`."""
        raise NotImplementedError


def require_extra(module: str, extra: str) -> None:
    """Fail at config time, not mid-run, when a tracker's optional package cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"needs the optional package '{module}' ({error}): pip install noether-trainkit[{extra}]") from None
