"""Test-only callbacks for runs under torchrun: a failure on one rank, a signal that lands at a known
update on any rank, and random draws that differ between ranks.

Configs name them as `kind: tests.support.distributed.<Class>`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import NonNegativeInt, PositiveInt

from noether.core import distributed
from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter

WAIT_LIMIT_SECONDS = 120


class FailOnRankCallbackConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    at_update: PositiveInt
    rank: NonNegativeInt


class FailOnRankCallback(PeriodicCallback):
    """Raises RuntimeError after update `at_update` on rank `rank` alone, while the other ranks go on
    to the next collective: the failure that must not leave them hanging."""

    config: FailOnRankCallbackConfig

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update == self.config.at_update and self.context.rank == self.config.rank:
            raise RuntimeError(f"test failure on rank {self.context.rank} after update {update_counter.update}")


class WaitForSignalOnAnyRankCallbackConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    at_update: PositiveInt
    ready_file: str
    """Each rank writes its process id to `{ready_file}.{rank}` once update `at_update` is done."""


class WaitForSignalOnAnyRankCallback(PeriodicCallback):
    """After update `at_update`, every rank announces its process id and then all ranks wait together
    (asking each other in lockstep) until some rank has been asked to stop, so that a signal sent to
    torchrun or to one worker lands at a known update."""

    config: WaitForSignalOnAnyRankCallbackConfig

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update != self.config.at_update:
            return
        trainer = self.context.trainer
        _announce(Path(f"{self.config.ready_file}.{self.context.rank}"))
        deadline = time.monotonic() + WAIT_LIMIT_SECONDS
        while not distributed.any_rank(trainer.stop_requested is not None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no signal arrived within {WAIT_LIMIT_SECONDS} s")
            time.sleep(0.01)


class RankNoiseCallbackConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1


class RankNoiseCallback(PeriodicCallback):
    """Draws `rank + 1` numbers from the global torch generator after every update, so that each rank's
    random state (and hence its dropout masks) differs: a resume that gave a rank another rank's state
    would train differently."""

    def track_after_update_step(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        torch.rand(self.context.rank + 1)


class SlowRankCallbackConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    at_update: PositiveInt
    rank: NonNegativeInt
    seconds: float
    ready_file: str
    """Each rank writes its process id to `{ready_file}.{rank}` once update `at_update` is done."""


class SlowRankCallback(PeriodicCallback):
    """After update `at_update`, every rank announces its process id and rank `rank` then takes `seconds`
    more, while the others already wait for it in the stop agreement: a signal to a waiting rank lands
    after its agreement, the moment a local stop flag must not end the loop on one rank alone."""

    config: SlowRankCallbackConfig

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update != self.config.at_update:
            return
        _announce(Path(f"{self.config.ready_file}.{self.context.rank}"))
        if self.context.rank == self.config.rank:
            time.sleep(self.config.seconds)


def _announce(ready_file: Path) -> None:
    """Write this process's id to `ready_file`, which appears only complete (a test polls for it and reads it at once)."""
    staged = ready_file.with_name(ready_file.name + ".tmp")
    staged.write_text(str(os.getpid()))
    staged.replace(ready_file)
