"""Schedule arithmetic against a step-by-step simulation of training: "due after this update/epoch", "fired
at this iteration" and the forecast of how often it fires must agree for every interval kind and size."""

from __future__ import annotations

import itertools

import pytest

from noether.core.callbacks.schedule import Schedule
from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration

UPDATES = 60


def simulate(schedule: Schedule, updates_per_epoch: int, batch: int) -> list[TrainingIteration]:
    """Iterations after which a callback with `schedule` fires, stepping a real counter the way the trainer does."""
    counter = UpdateCounter(
        start_iteration=TrainingIteration(),
        end_iteration=TrainingIteration(update=UPDATES),
        updates_per_epoch=updates_per_epoch,
        effective_batch_size=batch,
    )
    fired = []
    while not counter.is_finished:
        counter.add_update()
        after_update = schedule.due_after_update(counter.update, counter.sample, batch)
        after_epoch = schedule.due_after_epoch(counter.epoch, counter.is_full_epoch)
        if after_update or after_epoch:
            fired.append(counter.cur_iteration)
    return fired


SCHEDULES = (
    [Schedule(every_n_epochs=n) for n in (1, 2, 3)]
    + [Schedule(every_n_updates=n) for n in (1, 2, 5, 7)]
    + [Schedule(every_n_samples=n) for n in (8, 20, 33, 64)]
)
SHAPES = list(itertools.product([1, 3, 4, 10], [8, 16]))  # (updates per epoch, effective batch size)
CASES = [pytest.param(s, u, b, id=f"{s}-upe{u}-b{b}") for s in SCHEDULES for u, b in SHAPES]


@pytest.mark.parametrize(("schedule", "updates_per_epoch", "batch"), CASES)
def test_fired_at_names_exactly_the_iterations_it_fires_at(schedule, updates_per_epoch, batch):
    fired = set(simulate(schedule, updates_per_epoch, batch))
    for update in range(1, UPDATES + 1):
        iteration = TrainingIteration(epoch=update // updates_per_epoch, update=update, sample=update * batch)
        assert schedule.fired_at(iteration, updates_per_epoch, batch) == (iteration in fired)


@pytest.mark.parametrize(("schedule", "updates_per_epoch", "batch"), CASES)
def test_forecast_counts_the_invocations_between_any_two_updates(schedule, updates_per_epoch, batch):
    fired_updates = [iteration.update for iteration in simulate(schedule, updates_per_epoch, batch)]
    for start, end in [(0, UPDATES), (0, 1), (7, 31), (updates_per_epoch, UPDATES), (UPDATES - 1, UPDATES)]:
        expected = sum(start < update <= end for update in fired_updates)
        assert schedule.invocations_between(start, end, updates_per_epoch, batch) == expected


@pytest.mark.parametrize("every_n_samples", [8, 20, 33, 64])
def test_a_sample_interval_fires_once_per_interval_and_at_most_once_per_update(every_n_samples):
    fired = simulate(Schedule(every_n_samples=every_n_samples), 4, 12)
    assert len(fired) == min(UPDATES, UPDATES * 12 // every_n_samples)


def test_only_update_and_sample_intervals_fire_after_updates():
    assert Schedule(every_n_updates=3).fires_after_updates
    assert Schedule(every_n_samples=3).fires_after_updates
    assert not Schedule(every_n_epochs=3).fires_after_updates
