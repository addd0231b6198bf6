"""A callback that makes every host-device synchronization an error during a window of updates, but the
one the non-finite-loss check makes by design (it must know before the optimizer step)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import PositiveInt

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter


class ForbidSyncsConfig(CallBackBaseConfig):
    from_update: PositiveInt
    """Synchronizations raise from the end of this update on (after the first updates' lazy set-up)..."""
    until_update: PositiveInt
    """...until the end of this one (before the epoch's logging and checkpoints, which read values back)."""


class ForbidSyncs(PeriodicCallback):
    config: ForbidSyncsConfig

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        guard = self.context.trainer.nonfinite
        check = guard.update_is_finite

        def allowed_read(counter: UpdateCounter) -> bool:
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("default")
            try:
                return check(counter)
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        guard.update_is_finite = allowed_read

    def track_after_update_step(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update == self.config.from_update:
            torch.cuda.set_sync_debug_mode("error")
        elif update_counter.update == self.config.until_update:
            torch.cuda.set_sync_debug_mode("default")
