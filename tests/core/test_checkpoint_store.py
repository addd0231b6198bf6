"""CheckpointStore: sets commit whole or not at all, crashes are recovered, tags listed and deleted whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError, CheckpointWriteError, CheckpointWriter

WEIGHTS, OPTIM, EMA = Member("net", "model"), Member("net", "optim"), Member("net", "model", 0.99)
TRAINER = Member("net", "trainer")
SET = (WEIGHTS, OPTIM, EMA, TRAINER)


def at(update: int) -> TrainingIteration:
    return TrainingIteration(epoch=update // 10, update=update, sample=update * 8)


def members(value: float) -> dict[Member, dict]:
    return {
        WEIGHTS: {"state_dict": {"w": torch.full((4,), value)}},
        OPTIM: {"state_dict": {"step": value}},
        EMA: {"state_dict": {"w": torch.full((4,), -value)}},
    }


@pytest.fixture(params=[True, False], ids=["async", "sync"])
def store(request, tmp_path: Path):
    writer = CheckpointWriter(asynchronous=request.param)
    yield CheckpointStore(tmp_path, "run", writer)
    writer.close()


def save_set(store: CheckpointStore, tag: str, update: int, value: float) -> None:
    store.save(tag, at(update), members(value), {"note": value}, trainer_model_name="net")


def stage_again(directory: Path, tag: str, staged_members: tuple[Member, ...], set_id: str = "abc-1") -> None:
    """Put committed members of `tag` back under staged names, as a stop in the middle of a commit leaves them
    (the hashes file is committed after the members, before the trainer state)."""
    names = [member.file_name(tag) for member in staged_members]
    if any(member.part != "trainer" for member in staged_members):
        names.append(f"net_cp={tag}_hashes.json")
    for name in names:
        (directory / name).rename(directory / f".{name}~{set_id}.staged")


def test_a_set_is_stamped_listed_and_resumable(store):
    save_set(store, "E0_U3_S24", 3, 1.0)
    save_set(store, "latest", 5, 2.0)
    store.wait()

    assert sorted(p.name for p in store.directory.iterdir() if p.name != ".lock") == sorted(
        [
            *(
                f"net{ema}_cp={tag}_{part}.th"
                for tag in ("E0_U3_S24", "latest")
                for ema, part in (("", "model"), ("", "optim"), ("_ema=0.99", "model"), ("", "trainer"))
            ),
            *(f"net_cp={tag}_hashes.json" for tag in ("E0_U3_S24", "latest")),
        ]
    )
    weights = store.load(WEIGHTS, "latest")
    assert torch.equal(weights["state_dict"]["w"], torch.full((4,), 2.0))
    assert (weights["checkpoint_tag"], weights["training_iteration"], weights["run_id"]) == ("latest", at(5).to_dict(), "run")
    assert [(info.tag, info.iteration, info.resumable) for info in store.tags()] == [
        ("E0_U3_S24", at(3), True),
        ("latest", at(5), True),
    ]
    assert store.newest_resumable().tag == "latest"


def test_a_set_whose_member_cannot_be_written_is_aborted_and_the_previous_set_stays(store, monkeypatch):
    save_set(store, "latest", 3, 1.0)
    store.wait()
    unpicklable = members(2.0)
    unpicklable[OPTIM] = {"state_dict": {"step": lambda: None}}  # torch.save cannot pickle it

    with pytest.raises(CheckpointWriteError, match=r"net_cp=latest_optim\.th"):
        store.save("latest", at(5), unpicklable, {"note": 2.0}, trainer_model_name="net")
        store.wait()
    store.wait()  # whichever way the error surfaced, the abort is done on the writer thread
    assert store.staged_leftovers() == []
    assert store.iteration("latest") == at(3)
    for member in (WEIGHTS, OPTIM, EMA):
        assert store.load(member, "latest")["training_iteration"] == at(3).to_dict()


def test_a_weights_only_save_never_replaces_members_of_a_trainer_set(store):
    save_set(store, "latest", 3, 1.0)
    assert not store.save("latest", at(7), {EMA: {"state_dict": {"w": torch.zeros(4)}}})
    assert store.save("E0_U7_S56", at(7), {EMA: {"state_dict": {"w": torch.zeros(4)}}})
    store.wait()
    assert store.load(EMA, "latest")["training_iteration"] == at(3).to_dict()
    assert not store.info("E0_U7_S56").resumable  # weights only: nothing to resume from


def test_the_bytes_of_one_iteration_are_written_once_and_linked_under_later_tags(store):
    weights, ema = torch.full((4,), 1.0), torch.full((4,), -1.0)
    payloads = {WEIGHTS: {"state_dict": {"w": weights}}, OPTIM: {"state_dict": {"step": 5.0}}, EMA: {"state_dict": {"w": ema}}}
    store.save("E0_U5_S40", at(5), payloads, {"note": 1}, trainer_model_name="net")
    store.save("latest", at(5), payloads, {"note": 1}, trainer_model_name="net")
    store.wait()

    for member in (WEIGHTS, OPTIM, EMA):
        linked = store.path(member, "latest")
        assert linked.samefile(store.path(member, "E0_U5_S40"))
        assert store.load(member, "latest")["checkpoint_tag"] == "E0_U5_S40"  # stamped where first written
    assert not store.path(TRAINER, "latest").samefile(store.path(TRAINER, "E0_U5_S40"))
    assert store.info("latest").resumable and store.staged_leftovers() == []

    weights.add_(1.0)  # changed in place at the same iteration: new bytes
    store.save("latest", at(5), payloads, {"note": 2}, trainer_model_name="net")
    store.save("E0_U6_S48", at(6), {EMA: payloads[EMA]})  # another iteration: written anew
    store.wait()
    assert not store.path(WEIGHTS, "latest").samefile(store.path(WEIGHTS, "E0_U5_S40"))
    assert torch.equal(store.load(WEIGHTS, "latest")["state_dict"]["w"], torch.full((4,), 2.0))
    assert store.path(EMA, "latest").samefile(store.path(EMA, "E0_U5_S40"))  # unchanged: still one file
    assert store.load(EMA, "E0_U6_S48")["checkpoint_tag"] == "E0_U6_S48"
    assert store.staged_leftovers() == []


def test_a_linked_set_is_resumable_under_its_own_name_and_outlives_its_source(store):
    save_set(store, "latest", 3, 1.0)
    save_set(store, "E0_U5_S40", 5, 2.0)
    store.link("E0_U5_S40", "latest", SET)  # e.g. the periodic checkpoint and `latest` of one step
    store.wait()

    for member in SET:
        assert store.path(member, "latest").samefile(store.path(member, "E0_U5_S40"))
    assert (store.info("latest").iteration, store.info("latest").resumable) == (at(5), True)
    assert store.newest_resumable().tag == "E0_U5_S40"  # a tie: the tag named by its iteration

    store.delete("E0_U5_S40")  # e.g. pruned by keep_last_n
    store.wait()
    assert [(info.tag, info.iteration, info.resumable) for info in store.tags()] == [("latest", at(5), True)]
    assert torch.equal(store.load(WEIGHTS, "latest", expected_iteration=at(5))["state_dict"]["w"], torch.full((4,), 2.0))
    assert store.staged_leftovers() == []


def test_a_link_to_a_set_that_was_not_written_fails_with_its_name_and_keeps_the_previous_set(store):
    save_set(store, "latest", 3, 1.0)
    with pytest.raises(
        CheckpointWriteError, match=r"could not write net_cp=latest_model\.th as a link to net_cp=E0_U5_S40_model\.th"
    ):
        store.link("E0_U5_S40", "latest", SET)
        store.wait()
    store.wait()
    assert store.staged_leftovers() == []
    assert (store.info("latest").iteration, store.info("latest").resumable) == (at(3), True)


def test_recovery_completes_a_linked_set_under_the_tag_it_was_staged_for(tmp_path):
    with CheckpointWriter(asynchronous=False) as writer:
        store = CheckpointStore(tmp_path, "run", writer)
        save_set(store, "E0_U5_S40", 5, 2.0)
        store.link("E0_U5_S40", "latest", SET)
    # a stop in the middle of the commit of `latest`: its weights moved, the rest still staged
    stage_again(tmp_path, "latest", (OPTIM, EMA, TRAINER))

    actions = CheckpointStore(tmp_path, "run").recover()

    assert "completed checkpoint set 'latest' of E0_U5_S40, whose commit a stop had interrupted" in actions
    store = CheckpointStore(tmp_path, "run")
    assert [(info.tag, info.resumable) for info in store.tags()] == [("E0_U5_S40", True), ("latest", True)]
    assert store.load(TRAINER, "latest")["checkpoint_tag"] == "E0_U5_S40"  # the same file: stamped where written


def test_a_linked_weights_file_survives_the_replacement_of_its_source(store):
    store.save("best_model.loss", at(3), {WEIGHTS: {"state_dict": {"w": torch.ones(4)}}})
    store.link("best_model.loss", "best_model.loss.tolerance=2", [WEIGHTS])
    store.save("best_model.loss", at(5), {WEIGHTS: {"state_dict": {"w": torch.zeros(4)}}})  # a later best: a new file
    store.wait()

    tolerance = store.load(WEIGHTS, "best_model.loss.tolerance=2")
    assert tolerance["training_iteration"] == at(3).to_dict() and torch.equal(tolerance["state_dict"]["w"], torch.ones(4))
    assert store.load(WEIGHTS, "best_model.loss")["training_iteration"] == at(5).to_dict()
    assert store.staged_leftovers() == []  # (the replaced file's hidden name goes a moment after finish, off the commit's path)


def test_a_payload_with_values_that_cannot_be_compared_is_written_again(store):
    weights = torch.ones(4)
    payload = {
        WEIGHTS: {"state_dict": {"w": weights}, "note": [1, 2]},
        EMA: {"state_dict": {"w": weights}, "note": weights.numpy()},
    }
    store.save("E0_U5_S40", at(5), payload)
    payload[EMA] = {**payload[EMA], "note": weights.numpy().copy()}  # equal values: comparing them would raise
    store.save("E0_U5_S40.copy", at(5), payload)
    store.wait()
    assert store.path(WEIGHTS, "E0_U5_S40.copy").samefile(store.path(WEIGHTS, "E0_U5_S40"))
    assert not store.path(EMA, "E0_U5_S40.copy").samefile(store.path(EMA, "E0_U5_S40"))  # an array is not compared


def test_a_save_that_would_link_to_a_failed_set_fails_too_and_keeps_the_previous_set(store):
    save_set(store, "latest", 3, 1.0)
    store.wait()
    weights = torch.full((4,), 2.0)
    failing = {WEIGHTS: {"state_dict": {"w": weights}}, OPTIM: {"state_dict": {"step": lambda: None}}}  # cannot be pickled
    with pytest.raises(CheckpointWriteError):
        store.save("E0_U5_S40", at(5), failing, {"note": 2}, trainer_model_name="net")
        store.wait()
    store.wait()

    with pytest.raises(CheckpointWriteError, match="which was not saved"):
        store.save("latest", at(5), {WEIGHTS: {"state_dict": {"w": weights}}}, {"note": 2}, trainer_model_name="net")
        store.wait()
    store.wait()
    assert store.staged_leftovers() == []
    assert [info.tag for info in store.tags()] == ["latest"]
    assert store.iteration("latest") == at(3)


def test_recovery_completes_a_set_whose_linked_member_was_already_moved(tmp_path):
    with CheckpointWriter(asynchronous=False) as writer:
        store = CheckpointStore(tmp_path, "run", writer)
        payloads = members(2.0)
        store.save("E0_U5_S40", at(5), payloads, {"note": 2}, trainer_model_name="net")
        store.save("latest", at(5), payloads, {"note": 2}, trainer_model_name="net")
    # a stop in the middle of the commit of `latest`: its linked weights moved, the rest still staged
    stage_again(tmp_path, "latest", (OPTIM, EMA, TRAINER))

    actions = CheckpointStore(tmp_path, "run").recover()

    assert "completed checkpoint set 'latest' of E0_U5_S40, whose commit a stop had interrupted" in actions
    store = CheckpointStore(tmp_path, "run")
    assert [(info.tag, info.resumable) for info in store.tags()] == [("E0_U5_S40", True), ("latest", True)]
    assert store.staged_leftovers() == []


def test_recovery_completes_a_set_whose_commit_had_begun_and_discards_one_not_yet_committed(tmp_path):
    with CheckpointWriter(asynchronous=False) as writer:
        store = CheckpointStore(tmp_path, "run", writer)
        save_set(store, "latest", 3, 1.0)
        save_set(store, "E0_U5_S40", 5, 2.0)
    # a stop in the middle of the commit of `latest`: its weights already moved, the rest still staged
    stage_again(tmp_path, "latest", (OPTIM, EMA, TRAINER))
    # and one of E0_U5_S40 written completely but not committed (not yet made durable)
    stage_again(tmp_path, "E0_U5_S40", SET, set_id="abc-2")

    actions = CheckpointStore(tmp_path, "run").recover()

    assert "completed checkpoint set 'latest' of E0_U3_S24, whose commit a stop had interrupted" in actions
    assert "discarded checkpoint set 'E0_U5_S40' of E0_U5_S40: its commit had not begun" in actions
    store = CheckpointStore(tmp_path, "run")
    assert [(info.tag, info.resumable) for info in store.tags()] == [("latest", True)]
    assert store.staged_leftovers() == []


def test_recovery_refuses_a_member_left_by_an_older_save(tmp_path):
    """The disk-full case: the optimizer state of the new set was never staged; the final name still holds
    the old set's. Recovery must not mix them."""
    with CheckpointWriter(asynchronous=False) as writer:
        store = CheckpointStore(tmp_path, "run", writer)
        save_set(store, "latest", 3, 1.0)
        save_set(store, "E0_U5_S40", 5, 2.0)
    new = {m: tmp_path / m.file_name("E0_U5_S40") for m in (WEIGHTS, EMA, TRAINER)}
    trainer_state = torch.load(new[TRAINER], weights_only=True)
    trainer_state.update(checkpoint_tag="latest", files=[m.file_name("latest") for m in (WEIGHTS, OPTIM, EMA)])
    torch.save(trainer_state, tmp_path / f".{TRAINER.file_name('latest')}~abc-3.staged")
    for member in (WEIGHTS, EMA):
        new[member].rename(tmp_path / f".{member.file_name('latest')}~abc-3.staged")

    actions = CheckpointStore(tmp_path, "run").recover()

    assert any(
        "discarded checkpoint set 'latest'" in action and "net_cp=latest_optim.th was never completely written" in action
        for action in actions
    )
    store = CheckpointStore(tmp_path, "run")
    assert store.staged_leftovers() == []
    for member in (WEIGHTS, OPTIM, EMA):
        assert store.load(member, "latest")["training_iteration"] == at(3).to_dict()


def test_prune_keeps_the_newest_sets_and_deletes_older_ones_whole(store):
    tags = [str(at(update)) for update in (2, 4, 6, 8)]
    for update, tag in zip((2, 4, 6, 8), tags):
        save_set(store, tag, update, float(update))
    save_set(store, "latest", 8, 8.0)
    store.prune(tags, keep=2)
    store.wait()
    assert [info.tag for info in store.tags()] == [tags[2], tags[3], "latest"]


def test_prune_does_not_count_a_set_that_failed(store):
    tags = [str(at(2)), str(at(4))]
    save_set(store, tags[0], 2, 2.0)
    broken = members(4.0)
    broken[OPTIM] = {"state_dict": {"step": lambda: None}}
    with pytest.raises(CheckpointWriteError):
        store.save(tags[1], at(4), broken, {"note": 4.0}, trainer_model_name="net")
        store.prune(tags, keep=1)
        store.wait()
    store.prune(tags, keep=1)
    store.wait()
    assert [info.tag for info in store.tags()] == [tags[0]]


def test_a_deletion_interrupted_by_a_crash_is_finished_by_recovery(tmp_path):
    with CheckpointWriter(asynchronous=False) as writer:
        store = CheckpointStore(tmp_path, "run", writer)
        save_set(store, "E0_U2_S16", 2, 1.0)
        save_set(store, "E0_U4_S32", 4, 2.0)
    # the first step of a deletion: its trainer state renamed to the marker; then the crash
    trainer = tmp_path / TRAINER.file_name("E0_U2_S16")
    trainer.rename(tmp_path / f".{trainer.name}.deleting")
    assert not CheckpointStore(tmp_path, "run").info("E0_U2_S16").resumable

    CheckpointStore(tmp_path, "run").recover()

    assert [info.tag for info in CheckpointStore(tmp_path, "run").tags()] == ["E0_U4_S32"]
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())


def test_tags_written_after_an_iteration_are_set_aside(store):
    save_set(store, "E0_U2_S16", 2, 1.0)
    save_set(store, "E0_U4_S32", 4, 2.0)
    store.save("best_model.loss", at(4), {WEIGHTS: {"state_dict": {"w": torch.zeros(4)}}})
    store.wait()

    assert store.set_aside_after(at(2)) == ["E0_U4_S32", "best_model.loss"]

    assert [info.tag for info in store.tags()] == ["E0_U2_S16"]
    assert (store.directory / f"abandoned_after_{at(2)}" / WEIGHTS.file_name("best_model.loss")).exists()


def test_a_member_of_the_wrong_kind_is_named(store, tmp_path):
    save_set(store, "latest", 3, 1.0)
    store.wait()
    (tmp_path / OPTIM.file_name("latest")).replace(tmp_path / EMA.file_name("latest"))
    torch.save({"training_iteration": at(3).to_dict()}, tmp_path / EMA.file_name("latest"))
    with pytest.raises(
        CheckpointLoadError,
        match=r"net_ema=0\.99_cp=latest_model\.th is not the EMA 0\.99 weights of net written by noether \(no 'state_dict'\)",
    ):
        store.load(EMA, "latest")
