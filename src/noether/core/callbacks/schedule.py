"""When a periodic callback fires: a value computed from its config, the only place that does this arithmetic.

It answers "is it due after this update or epoch", "would it have fired at this iteration" and "how
often does it fire between two updates" (the start-up forecast of checkpoint bytes), so the three can
never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from noether.core.utils.training.iteration import TrainingIteration


@dataclass(frozen=True)
class Schedule:
    """Exactly one of the four intervals is set (the config validates it).

    A sample interval fires after the update during which the sample count crosses a multiple of
    `every_n_samples`, so intervals that are not a multiple of the batch size still fire once per interval
    (and at most once per update, when the interval is shorter than a batch).

    A seconds interval fires after the first update at which that much training time has passed since
    it last fired. Where it fires is known only as training goes, so `fired_at` and
    `invocations_between` have no answer for it (`is_timed`).
    """

    every_n_epochs: int | None = None
    every_n_updates: int | None = None
    every_n_samples: int | None = None
    every_n_seconds: float | None = None

    @classmethod
    def of(cls, config: Any) -> Schedule:
        return cls(config.every_n_epochs, config.every_n_updates, config.every_n_samples, config.every_n_seconds)

    @property
    def is_timed(self) -> bool:
        return self.every_n_seconds is not None

    @property
    def fires_after_updates(self) -> bool:
        return self.every_n_updates is not None or self.every_n_samples is not None or self.is_timed

    def due_after_update(self, update: int, sample: int, effective_batch_size: int, seconds_since_fired: float = 0.0) -> bool:
        if self.every_n_updates is not None:
            return update % self.every_n_updates == 0
        if self.every_n_samples is not None:
            return (sample - effective_batch_size) // self.every_n_samples < sample // self.every_n_samples
        if self.every_n_seconds is not None:
            return seconds_since_fired >= self.every_n_seconds
        return False

    def due_after_epoch(self, epoch: int, is_full_epoch: bool) -> bool:
        return self.every_n_epochs is not None and is_full_epoch and epoch % self.every_n_epochs == 0

    def fired_at(self, iteration: TrainingIteration, updates_per_epoch: int, effective_batch_size: int) -> bool:
        """Whether it fired after the update that reached `iteration` (not for a seconds interval)."""
        assert not self.is_timed, "where a seconds interval fired is not a function of the iteration"
        if self.due_after_update(iteration.update, iteration.sample, effective_batch_size):
            return True
        return self.due_after_epoch(iteration.epoch, iteration.update % updates_per_epoch == 0)

    def invocations_between(self, start_update: int, end_update: int, updates_per_epoch: int, effective_batch_size: int) -> int:
        """How often it fires after updates start_update+1 .. end_update (not for a seconds interval)."""
        assert not self.is_timed, "how often a seconds interval fires is known only as training goes"
        if self.every_n_epochs is not None:
            return (
                end_update // updates_per_epoch // self.every_n_epochs - start_update // updates_per_epoch // self.every_n_epochs
            )
        if self.every_n_updates is not None:
            return end_update // self.every_n_updates - start_update // self.every_n_updates
        assert self.every_n_samples is not None
        batch = effective_batch_size
        if batch >= self.every_n_samples:  # every update crosses a multiple, and fires once
            return end_update - start_update
        return end_update * batch // self.every_n_samples - start_update * batch // self.every_n_samples
