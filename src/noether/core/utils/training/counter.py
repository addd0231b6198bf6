"""Where training is and where it ends."""

from __future__ import annotations

from noether.core.utils.training.iteration import TrainingIteration


class UpdateCounter:
    """Counts epochs, updates and samples; training ends at whichever limit `end` sets.

    `end` has exactly one of epoch, update or sample set to a positive value (the others 0). An
    update consumes `effective_batch_size` samples (over all ranks and accumulation steps).
    """

    def __init__(
        self,
        *,
        start_iteration: TrainingIteration,
        end_iteration: TrainingIteration,
        updates_per_epoch: int,
        effective_batch_size: int,
    ) -> None:
        if updates_per_epoch < 1:
            raise ValueError("an epoch must contain at least one update: the training set is smaller than one batch")
        if sum(value > 0 for value in (end_iteration.epoch, end_iteration.update, end_iteration.sample)) != 1:
            raise ValueError(f"exactly one of epoch, update or sample must end training, got {end_iteration!r}")
        self.start_iteration = start_iteration
        self.end_iteration = end_iteration
        self.updates_per_epoch = updates_per_epoch
        self.effective_batch_size = effective_batch_size
        self.epoch = start_iteration.epoch
        self.update = start_iteration.update
        self.sample = start_iteration.sample
        self.training_seconds = 0.0
        """Seconds of training of the run so far, over all its launches, as rank 0's clock says after the
        update (what `every_n_seconds` schedules count; the trainer sets it)."""

    @property
    def cur_iteration(self) -> TrainingIteration:
        return TrainingIteration(epoch=self.epoch, update=self.update, sample=self.sample)

    @property
    def is_full_epoch(self) -> bool:
        """True right after the last update of an epoch."""
        return self.update > 0 and self.update % self.updates_per_epoch == 0

    @property
    def update_in_epoch(self) -> int:
        return self.update % self.updates_per_epoch

    @property
    def is_finished(self) -> bool:
        end = self.end_iteration
        if end.epoch:
            return self.update >= end.epoch * self.updates_per_epoch
        if end.update:
            return self.update >= end.update
        return self.sample >= end.sample

    @property
    def end_update(self) -> int:
        """The update at which training ends (samples round up to a whole update)."""
        end = self.end_iteration
        if end.epoch:
            return end.epoch * self.updates_per_epoch
        if end.update:
            return end.update
        return -(-end.sample // self.effective_batch_size)

    @property
    def remaining_updates(self) -> int:
        return max(self.end_update - self.update, 0)

    def add_update(self) -> None:
        """Count one optimizer update; the epoch advances when the update completes it."""
        self.update += 1
        self.sample += self.effective_batch_size
        if self.is_full_epoch:
            self.epoch += 1

    def state_dict(self) -> dict[str, int]:
        return self.cur_iteration.to_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        iteration = TrainingIteration.from_dict(state)
        self.epoch, self.update, self.sample = iteration.epoch, iteration.update, iteration.sample
