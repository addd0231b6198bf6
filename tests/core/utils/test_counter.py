"""UpdateCounter and TrainingIteration: where training is, when an epoch is complete, when training ends."""

import pytest

from noether.core.utils.training import TrainingIteration
from noether.core.utils.training.counter import UpdateCounter

BEGINNING = TrainingIteration()


def counter(end: TrainingIteration, start: TrainingIteration = BEGINNING, updates_per_epoch: int = 4) -> UpdateCounter:
    """Batches of 10 samples."""
    return UpdateCounter(start_iteration=start, end_iteration=end, updates_per_epoch=updates_per_epoch, effective_batch_size=10)


def run_to_end(update_counter: UpdateCounter) -> None:
    while not update_counter.is_finished:
        update_counter.add_update()


def test_iteration_string_is_the_checkpoint_tag_form():
    assert str(TrainingIteration(epoch=2, update=17, sample=1088)) == "E2_U17_S1088"


def test_iteration_round_trips_through_a_dict_and_orders_by_epoch_update_sample():
    iteration = TrainingIteration(epoch=1, update=5, sample=320)
    assert iteration.to_dict() == {"epoch": 1, "update": 5, "sample": 320}
    assert TrainingIteration.from_dict(iteration.to_dict()) == iteration
    assert TrainingIteration(1, 5, 320) < TrainingIteration(1, 6, 384) < TrainingIteration(2, 0, 0)


def test_each_update_adds_one_batch_of_samples_and_completes_epochs():
    update_counter = counter(TrainingIteration(epoch=2))
    seen = []
    for _ in range(5):
        update_counter.add_update()
        seen.append((str(update_counter.cur_iteration), update_counter.is_full_epoch))
    assert seen == [
        ("E0_U1_S10", False),
        ("E0_U2_S20", False),
        ("E0_U3_S30", False),
        ("E1_U4_S40", True),
        ("E1_U5_S50", False),
    ]


def test_fresh_counter_is_not_at_a_full_epoch():
    assert not counter(TrainingIteration(epoch=1)).is_full_epoch


def test_training_ends_after_the_epochs():
    update_counter = counter(TrainingIteration(epoch=3))
    run_to_end(update_counter)
    assert update_counter.cur_iteration == TrainingIteration(epoch=3, update=12, sample=120)
    assert update_counter.end_update == 12


def test_training_ends_after_the_updates():
    update_counter = counter(TrainingIteration(update=6))
    run_to_end(update_counter)
    assert update_counter.cur_iteration == TrainingIteration(epoch=1, update=6, sample=60)


def test_sample_limit_rounds_up_to_a_whole_update():
    update_counter = counter(TrainingIteration(sample=25))
    assert update_counter.end_update == 3
    run_to_end(update_counter)
    assert update_counter.cur_iteration == TrainingIteration(epoch=0, update=3, sample=30)


def test_resumed_counter_continues_from_its_start():
    update_counter = counter(TrainingIteration(epoch=2), start=TrainingIteration(epoch=1, update=5, sample=50))
    assert update_counter.remaining_updates == 3
    run_to_end(update_counter)
    assert update_counter.cur_iteration == TrainingIteration(epoch=2, update=8, sample=80)


def test_state_dict_restores_the_position():
    update_counter = counter(TrainingIteration(epoch=2))
    for _ in range(3):
        update_counter.add_update()
    restored = counter(TrainingIteration(epoch=2))
    restored.load_state_dict(update_counter.state_dict())
    assert restored.cur_iteration == update_counter.cur_iteration


@pytest.mark.parametrize("end", [TrainingIteration(), TrainingIteration(epoch=1, update=10)])
def test_exactly_one_limit_must_end_training(end):
    with pytest.raises(ValueError, match="exactly one of epoch, update or sample must end training"):
        counter(end)


def test_an_epoch_needs_at_least_one_update():
    with pytest.raises(ValueError, match="training set is smaller than one batch"):
        counter(TrainingIteration(epoch=1), updates_per_epoch=0)
