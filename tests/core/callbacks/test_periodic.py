"""When a periodic callback runs: every n epochs, updates, samples or seconds of training."""

import json

import torch

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.utils.training import TrainingIteration
from noether.core.utils.training.counter import UpdateCounter
from noether.training.run import train
from tests.conftest import tiny_config
from tests.support.checkpoints import checkpoint_path
from tests.support.timed import read_record

RECORDER = "tests.support.callbacks.FiringRecorder"
FORWARDING = "tests.support.callbacks.ForwardingCallback"


def due_updates(schedule: dict, *, updates_per_epoch: int, batch: int, epochs: int) -> tuple[list[int], list[int]]:
    """Updates after which the callback is due (after_update, after_epoch) over a whole training run."""
    callback = PeriodicCallback(CallBackBaseConfig(**schedule, batch_size=batch), context=None)
    counter = UpdateCounter(
        start_iteration=TrainingIteration(),
        end_iteration=TrainingIteration(epoch=epochs),
        updates_per_epoch=updates_per_epoch,
        effective_batch_size=batch,
    )
    after_update, after_epoch = [], []
    while not counter.is_finished:
        counter.add_update()
        if callback.is_due_after_update(counter):
            after_update.append(counter.update)
        if callback.is_due_after_epoch(counter):
            after_epoch.append(counter.update)
    return after_update, after_epoch


def test_epoch_interval_is_due_at_the_end_of_every_nth_epoch():
    assert due_updates({"every_n_epochs": 2}, updates_per_epoch=3, batch=8, epochs=6) == ([], [6, 12, 18])


def test_update_interval_is_due_after_every_nth_update():
    assert due_updates({"every_n_updates": 4}, updates_per_epoch=3, batch=8, epochs=4) == ([4, 8, 12], [])


def test_sample_interval_that_is_a_multiple_of_the_batch_size():
    assert due_updates({"every_n_samples": 24}, updates_per_epoch=5, batch=8, epochs=2) == ([3, 6, 9], [])


def test_sample_interval_not_a_multiple_of_the_batch_size_is_due_once_per_crossing():
    """Multiples of 20 (20, 40, 60, 80) are passed during updates 3 (24), 5 (40), 8 (64) and 10 (80)."""
    assert due_updates({"every_n_samples": 20}, updates_per_epoch=5, batch=8, epochs=2) == ([3, 5, 8, 10], [])


def test_sample_interval_smaller_than_a_batch_is_due_once_per_update():
    assert due_updates({"every_n_samples": 3}, updates_per_epoch=2, batch=8, epochs=2) == ([1, 2, 3, 4], [])


def test_sample_interval_continues_across_a_resume():
    callback = PeriodicCallback(CallBackBaseConfig(every_n_samples=20, batch_size=8), context=None)
    counter = UpdateCounter(
        start_iteration=TrainingIteration(epoch=0, update=4, sample=32),
        end_iteration=TrainingIteration(update=10),
        updates_per_epoch=5,
        effective_batch_size=8,
    )
    due = []
    while not counter.is_finished:
        counter.add_update()
        if callback.is_due_after_update(counter):
            due.append(counter.update)
    assert due == [5, 8, 10]


def test_callbacks_fire_at_their_intervals_in_a_real_run(tmp_path):
    """The digits training set has 1259 samples: 9 updates of 128 per epoch, 18 in two epochs."""
    recorders = [
        {"kind": RECORDER, "every_n_epochs": 1, "metric": "per_epoch"},
        {"kind": RECORDER, "every_n_updates": 4, "metric": "per_4_updates"},
        {"kind": RECORDER, "every_n_samples": 300, "batch_size": 64, "metric": "per_300_samples"},
        {"kind": FORWARDING, "every_n_epochs": 2, "eval_callbacks": [{"kind": RECORDER, "every_n_updates": 1, "metric": "in"}]},
    ]
    paths = train(tiny_config(tmp_path, max_epochs=2, effective_batch_size=128, callbacks=recorders))
    records = [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]

    def fired(key: str) -> list[str]:
        return [str(TrainingIteration.from_dict(record)) for record in records if key in record]

    assert fired("per_epoch/epoch") == ["E1_U9_S1152", "E2_U18_S2304"]
    assert fired("per_4_updates/update") == ["E0_U4_S512", "E0_U8_S1024", "E1_U12_S1536", "E1_U16_S2048"]
    # the multiples of 300 up to 2304 (300, 600, ..., 2100) are each passed once
    assert fired("per_300_samples/sample") == [
        "E0_U3_S384",
        "E0_U5_S640",
        "E0_U8_S1024",
        "E1_U10_S1280",
        "E1_U12_S1536",
        "E1_U15_S1920",
        "E1_U17_S2176",
    ]
    # a nested callback runs (as `at_eval`) when its parent does, whatever its own schedule
    assert fired("forwarded/in/eval") == ["E2_U18_S2304"]


# --------------------------------------------------------------------------------- every_n_seconds
TIMED = "tests.support.timed"


def test_a_seconds_interval_is_due_after_the_first_update_at_which_it_has_passed_since_it_last_fired():
    fired = []

    class Recording(PeriodicCallback):
        def periodic_callback(self, *, interval_type, update_counter, **kwargs):
            fired.append((interval_type, update_counter.update))

    callback = Recording(CallBackBaseConfig(every_n_seconds=1.0), context=None)
    counter = UpdateCounter(
        start_iteration=TrainingIteration(),
        end_iteration=TrainingIteration(update=8),
        updates_per_epoch=4,
        effective_batch_size=8,
    )
    # training seconds after updates 1..8: fires at 3 (1.2 s), then 6 (2.3 s >= 1.2 + 1), then not at 8 (3.1 < 3.3)
    for seconds in (0.4, 0.9, 1.2, 1.5, 2.1, 2.3, 2.9, 3.1):
        counter.add_update()
        counter.training_seconds = seconds
        callback.after_update(update_counter=counter)
        callback.after_epoch(update_counter=counter)
    assert fired == [("update", 3), ("update", 6)]


def timed_tree(tmp_path, interval: float, **trainer) -> dict:
    """A run whose updates take at least 30 ms (a sleep), with the training clock recorded after every
    update, a timed recorder and a timed validation loss (a pass with a loader of its own)."""
    callbacks = [
        {"kind": f"{TIMED}.SlowUpdates", "seconds_by_rank": [0.03]},
        {"kind": f"{TIMED}.ClockRecord", "every_n_updates": 1, "file": str(tmp_path / "clock")},
        {"kind": f"{TIMED}.ClockRecord", "id": "timed", "every_n_seconds": interval, "file": str(tmp_path / "fired")},
        {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_seconds": interval, "dataset_key": "val"},
        {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1},
        *trainer.pop("callbacks", []),
    ]
    return tiny_config(tmp_path / "outputs", callbacks=callbacks, **trainer)


def assert_fired_by_the_clock(clock: list[dict], fired: list[dict], interval: float) -> None:
    """Each firing is at the first update whose clock is `interval` past the previous firing (0 at first)."""
    seconds_at = {line["update"]: line["seconds"] for line in clock}
    expected, last = [], 0.0
    for update in sorted(seconds_at):
        if seconds_at[update] - last >= interval:
            expected.append(update)
            last = seconds_at[update]
    assert [line["update"] for line in fired] == expected
    assert len(expected) >= 3, "too few firings to show anything"


def test_a_timed_callback_and_a_timed_evaluation_fire_by_the_training_clock(tmp_path):
    paths = train(timed_tree(tmp_path, 0.12))

    clock, fired = read_record(tmp_path / "clock.0"), read_record(tmp_path / "fired.0")
    seconds = [line["seconds"] for line in clock]
    assert seconds == sorted(seconds) and seconds[-1] >= 18 * 0.03
    assert_fired_by_the_clock(clock, fired, 0.12)
    rows = [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]
    assert [row["update"] for row in rows if "loss/val/total" in row] == [line["update"] for line in fired]


def test_the_training_clock_and_the_last_firing_carry_over_a_resume(tmp_path):
    stop = {"kind": "tests.support.scripted_metric.Interrupt", "every_n_updates": 10, "how": "sigterm"}
    tree = timed_tree(tmp_path, 0.12, callbacks=[stop])
    interrupted = train(tree)
    resumed = train(timed_tree(tmp_path, 0.12), resume=str(interrupted.run_dir), checkpoint="E1_U10_S1280.signal_interrupt")

    clock, fired = read_record(tmp_path / "clock.0"), read_record(tmp_path / "fired.0")
    assert [line["update"] for line in clock] == list(range(1, 19))  # one launch after the other, no update twice
    seconds = [line["seconds"] for line in clock]
    assert seconds == sorted(seconds)  # the second launch's clock starts where the first one's stopped
    assert_fired_by_the_clock(clock, fired, 0.12)
    # the timed passes fell on other updates than in a run never stopped, and read their own loader: the
    # weights still end exactly as that run's
    uninterrupted = train(timed_tree(tmp_path / "uninterrupted", 0.12))
    for part in ("model", "optim"):
        expected = torch.load(checkpoint_path(uninterrupted, "classifier", "last", part), weights_only=True)["state_dict"]
        actual = torch.load(checkpoint_path(resumed, "classifier", "last", part), weights_only=True)["state_dict"]
        assert all(torch.equal(actual[key], value) for key, value in expected.items() if isinstance(value, torch.Tensor)), part
