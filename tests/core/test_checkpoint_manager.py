"""CheckpointManager decisions, against a real store with a synchronous writer and a small real model: what a
step's requests become in storage (order, aliases, links, skips), retention between owners, the rank policy, and
what a resume restores and refuses. Every test runs over the in-memory storage and over a local folder, and
takes milliseconds; the end-to-end runs live in tests/training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from noether.core.checkpoint_manager import CheckpointManager, SaveRequest
from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.models.optimizer import OptimizerConfig
from noether.core.storage import LocalStorage, MemoryStorage, Storage
from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError, CheckpointWriter, load_checkpoint
from noether.core.writers.log_writer import LogWriter
from tests.support.models import LinearBlock, LinearBlockConfig

UPDATES_PER_EPOCH, BATCH = 4, 8


def make_model(seed: int = 0) -> LinearBlock:
    torch.manual_seed(seed)
    model = LinearBlock(LinearBlockConfig(name="net", in_dim=3, out_dim=2, optimizer=OptimizerConfig(lr=0.1)))
    model.initialize_optimizers(100)
    return model


def step(model: LinearBlock) -> None:
    """One real optimizer update, so that weights and optimizer state change."""
    model(torch.ones(2, 3)).sum().backward()
    model.optimizer_step()
    model.optimizer_zero_grad()


def counter_at(update: int) -> UpdateCounter:
    counter = UpdateCounter(
        start_iteration=TrainingIteration(),
        end_iteration=TrainingIteration(update=1000),
        updates_per_epoch=UPDATES_PER_EPOCH,
        effective_batch_size=BATCH,
    )
    for _ in range(update):
        counter.add_update()
    return counter


class Harness:
    """A manager of one run directory with the trainer-state parts a trainer registers."""

    def __init__(
        self, directory: Path, storage: Storage, *, rank: int = 0, world_size: int = 1, model: LinearBlock | None = None
    ) -> None:
        self.directory = directory
        self.storage = storage
        self.model = model or make_model()
        if not storage.is_folder(str(directory / "checkpoints")):
            storage.make_folder(str(directory / "checkpoints"))
        self.store = CheckpointStore(directory / "checkpoints", "run", CheckpointWriter(asynchronous=False, storage=storage))
        self.log = LogWriter(directory / "metrics.jsonl", directory / "summary.json", is_main_process=rank == 0)
        self.manager = CheckpointManager(self.store, self.model, self.log, rank=rank, world_size=world_size)
        self.callback_state = {"count": 0}
        self.loaded: list[tuple[str, object]] = []
        self.manager.register("callbacks", lambda: dict(self.callback_state), self._load_callbacks, per_rank=True)
        self.manager.register("rng_states", lambda: {"seed": 1}, lambda saved, tag: None, per_rank=True)
        self.manager.register("grad_scaler", dict)
        self.manager.register("metrics_rows", lambda: self.log.rows_written)
        self.manager.register("effective_batch_size", lambda: BATCH, check=self._check_batch)

    def _load_callbacks(self, saved: dict, tag: str) -> None:
        self.loaded.append((tag, saved))
        self.callback_state = dict(saved)

    def _check_batch(self, saved: int | None, tag: str) -> None:
        if saved is not None and saved != BATCH:
            raise CheckpointLoadError(f"'{tag}' has batch {saved}")

    def file(self, tag: str, part: str = "model", ema: float | None = None) -> Path:
        return self.store.directory / Member("net", part, ema).file_name(tag)

    def exists(self, tag: str, part: str = "model", ema: float | None = None) -> bool:
        return self.storage.exists(str(self.file(tag, part, ema)))

    def same_file(self, tag: str, other_tag: str, part: str = "model") -> bool:
        return self.storage.same_file(str(self.file(tag, part)), str(self.file(other_tag, part)))

    def load(self, tag: str, part: str = "model", ema: float | None = None) -> dict:
        return load_checkpoint(self.file(tag, part, ema), self.storage.open_read)

    def names(self) -> list[str]:
        return self.storage.list(str(self.store.directory))

    def stamped_tag(self, tag: str, part: str = "model") -> str:
        return self.load(tag, part)["checkpoint_tag"]

    def tags(self) -> set[str]:
        return {info.tag for info in self.store.tags()}

    def close(self) -> None:
        self.store.close()
        self.log.close()


@pytest.fixture
def logs(caplog, monkeypatch):
    """What the manager logs at INFO and above (an in-process run elsewhere may have stopped propagation)."""
    monkeypatch.setattr(logging.getLogger("noether"), "propagate", True)
    caplog.set_level(logging.INFO, logger="noether")
    return caplog


@pytest.fixture(params=["memory", "local"])
def new_run(request, tmp_path: Path):
    """Makes managers of one run directory (a second one resumes what the first saved), in one storage."""
    storage = MemoryStorage() if request.param == "memory" else LocalStorage()
    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        made.append(Harness(tmp_path, storage, **kwargs))
        return made[-1]

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def run(new_run) -> Harness:
    return new_run()


def periodic(update: int, **kwargs) -> SaveRequest:
    return SaveRequest(str(counter_at(update).cur_iteration), optim=True, resumable=True, **kwargs)


# --------------------------------------------------------------------------------- what one step writes
def test_nothing_requested_writes_nothing(run):
    run.manager.flush(counter_at(1))
    assert not run.names()


def test_requests_wait_for_the_end_of_the_step(run):
    run.manager.request(periodic(4))
    assert run.tags() == set()
    run.manager.flush(counter_at(4))
    assert run.tags() == {"E1_U4_S32"}
    assert run.store.info("E1_U4_S32").resumable


@pytest.mark.parametrize("order", ["periodic-first", "latest-first"])
def test_latest_with_the_periodic_contents_is_a_second_name_of_its_files(run, order):
    requests = [periodic(4), SaveRequest("latest", optim=True, resumable=True)]
    for request in requests if order == "periodic-first" else requests[::-1]:
        run.manager.request(request)
    run.manager.flush(counter_at(4))
    first = requests[0 if order == "periodic-first" else 1].tag
    second = "latest" if first != "latest" else "E1_U4_S32"
    for part in ("model", "optim", "trainer"):
        assert run.same_file(first, second, part)
    assert run.store.info("latest").resumable and run.store.info("E1_U4_S32").resumable


def test_latest_with_other_contents_is_written_on_its_own(run):
    run.manager.request(periodic(4))
    run.manager.request(SaveRequest("latest", optim=False, resumable=True))
    run.manager.flush(counter_at(4))
    assert not run.exists("latest", "optim")
    assert run.exists("latest", "trainer") and run.exists("E1_U4_S32", "optim")


@pytest.mark.parametrize("snapshot_first", [True, False])
def test_a_snapshot_is_written_before_the_resumable_sets_of_its_step(run, snapshot_first):
    """Whatever order callbacks asked in, the best model's file is the one written and the periodic set links
    it: its stamp names the best tag."""
    requests = [SaveRequest("best_model.loss"), periodic(4)]
    for request in requests if snapshot_first else requests[::-1]:
        run.manager.request(request)
    run.manager.flush(counter_at(4))
    assert run.stamped_tag("best_model.loss") == "best_model.loss"
    assert run.same_file("best_model.loss", "E1_U4_S32")
    assert not run.exists("best_model.loss", "trainer")


def test_snapshot_aliases_name_the_same_files(run):
    run.manager.request(SaveRequest("best_model.loss", aliases=("best_model.loss.tolerance=1", "best_model.loss.tolerance=3")))
    run.manager.flush(counter_at(4))
    for alias in ("best_model.loss.tolerance=1", "best_model.loss.tolerance=3"):
        assert run.same_file("best_model.loss", alias)
        assert run.stamped_tag(alias) == "best_model.loss"


def test_a_snapshot_after_an_update_holds_the_new_weights(run):
    run.manager.request(SaveRequest("best_model.loss"))
    run.manager.flush(counter_at(4))
    step(run.model)
    run.manager.request(SaveRequest("best_model.loss"))
    run.manager.flush(counter_at(5))
    saved = run.load("best_model.loss")
    assert torch.equal(saved["state_dict"]["linear.weight"], run.model.linear.weight)
    assert saved["training_iteration"]["update"] == 5


def ema_members(value: float):
    return lambda: {Member("net", "model", 0.9): {"state_dict": {"w": torch.full((2,), value)}}}


def test_own_members_under_a_tag_a_resumable_set_of_the_step_holds_are_skipped(run):
    run.manager.request(SaveRequest("latest", weights=False, own_members=ema_members(7.0)))
    run.manager.request(SaveRequest("latest", optim=True, resumable=True))
    run.manager.flush(counter_at(4))
    assert not run.exists("latest", ema=0.9)  # the resumable set had no member of that EMA: nothing added
    assert run.store.info("latest").resumable


def test_own_members_under_other_tags_are_written_after_the_resumable_sets(run):
    run.manager.request(SaveRequest("E1_U4_S32", weights=False, own_members=ema_members(7.0)))
    run.manager.request(SaveRequest("latest", optim=True, resumable=True))
    run.manager.flush(counter_at(4))
    assert torch.equal(run.load("E1_U4_S32", ema=0.9)["state_dict"]["w"], torch.full((2,), 7.0))


def test_own_members_never_replace_those_of_a_resumable_tag_of_an_earlier_step(run, logs):
    run.manager.request(SaveRequest("latest", optim=True, resumable=True))
    run.manager.flush(counter_at(4))
    for update in (5, 6):
        run.manager.request(SaveRequest("latest", weights=False, own_members=ema_members(float(update))))
        run.manager.flush(counter_at(update))
    assert not run.exists("latest", ema=0.9)
    assert logs.text.count("are saved with the trainer's checkpoint 'latest' only") == 1


def test_callbacks_members_are_part_of_every_resumable_set(run):
    run.manager.register_members(
        lambda tag, counter: {Member("net", "model", 0.5): {"state_dict": {"tag": torch.tensor(len(tag))}}}
    )
    run.manager.request(periodic(4))
    run.manager.flush(counter_at(4))
    trainer_state = run.load("E1_U4_S32", "trainer")
    assert "net_ema=0.5_cp={tag}_model.th" in trainer_state["files"]
    assert run.exists("E1_U4_S32", ema=0.5)


def test_trainer_state_holds_every_registered_part_in_order(run):
    run.callback_state = {"count": 3}
    run.manager.request(periodic(4))
    run.manager.flush(counter_at(4))
    state = run.load("E1_U4_S32", "trainer")
    assert list(state)[:5] == ["callbacks", "rng_states", "grad_scaler", "metrics_rows", "effective_batch_size"]
    assert state["callbacks"] == [{"count": 3}] and state["effective_batch_size"] == BATCH


def test_a_part_name_is_registered_once(run):
    with pytest.raises(ValueError, match="'callbacks' is registered already"):
        run.manager.register("callbacks", dict)


# --------------------------------------------------------------------------------- failures and interrupts
def test_interrupt_set_is_resumable_and_named_by_its_iteration(run):
    assert run.manager.save_interrupt(counter_at(6)) == "E1_U6_S48.signal_interrupt"
    run.manager.wait()
    assert run.store.info("E1_U6_S48.signal_interrupt").resumable


def test_failure_writes_the_snapshots_of_the_failed_step_then_an_error_set(run):
    run.manager.request(SaveRequest("best_model.loss"))
    run.manager.request(periodic(4))  # the step did not complete: its periodic set is not written
    undone = []
    run.manager.save_on_failure(counter_at(4), RuntimeError("boom"), before_update=lambda: undone.append(True))
    assert run.tags() == {"best_model.loss", "E1_U4_S32.error"}
    assert run.store.info("E1_U4_S32.error").resumable and undone == [True]


def test_a_forced_stop_writes_no_error_set(run):
    run.manager.save_on_failure(counter_at(4), KeyboardInterrupt(), before_update=None)
    assert run.tags() == set()


# --------------------------------------------------------------------------------- rank policy
def test_other_ranks_write_nothing_of_a_whole_file_run(new_run):
    harness = new_run(rank=1, world_size=2)
    harness.manager.request(SaveRequest("best_model.loss", aliases=("best_model.loss.tolerance=1",)))
    harness.manager.request(SaveRequest("latest", weights=False, own_members=ema_members(1.0)))
    harness.manager.save_on_failure(counter_at(4), RuntimeError("boom"), before_update=None)
    assert not harness.names()


# --------------------------------------------------------------------------------- retention
class Owner:
    def __init__(self, kept: set[str]) -> None:
        self.kept = kept

    def keeps(self, tag: str) -> bool:
        return tag in self.kept


def save_periodic_sets(run: Harness, updates: list[int]) -> list[str]:
    tags = []
    for update in updates:
        run.manager.request(periodic(update))
        run.manager.flush(counter_at(update))
        tags.append(str(counter_at(update).cur_iteration))
    return tags


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_prune_keeps_the_newest_sets(run, keep):
    tags = save_periodic_sets(run, [2, 4, 6, 8])
    owner = Owner(set(tags[-keep:]))
    run.manager.add_retention_owner(owner)
    run.manager.prune(owner, tags, keep)
    assert run.tags() == set(tags[-keep:])


def test_prune_never_deletes_a_set_another_owner_keeps(run):
    tags = save_periodic_sets(run, [2, 4, 6, 8])
    rolling, keep_all = Owner(set(tags[-1:])), Owner({tags[1]})
    run.manager.add_retention_owner(rolling)
    run.manager.add_retention_owner(keep_all)
    run.manager.prune(rolling, tags, 1)
    assert run.tags() == {tags[1], tags[-1]}


def test_prune_on_other_ranks_deletes_nothing(run):
    tags = save_periodic_sets(run, [2, 4])
    other_rank = CheckpointManager(run.store, run.model, run.log, rank=1, world_size=2)
    other_rank.prune(Owner(set()), tags, 1)
    assert run.tags() == set(tags)


def test_a_retention_request_runs_once_its_set_is_queued(run):
    owner = Owner(set())
    run.manager.add_retention_owner(owner)
    tags = save_periodic_sets(run, [2, 4])
    owner.kept = {tags[-1]}
    newest = periodic(6, prune=(owner, (*tags, "E1_U6_S48"), 2))
    run.manager.request(newest)
    run.manager.flush(counter_at(6))
    assert run.tags() == {"E1_U4_S32", "E1_U6_S48"}


# --------------------------------------------------------------------------------- resume
def saved_run(new_run) -> tuple[Harness, dict[str, torch.Tensor]]:
    harness = new_run()
    step(harness.model)
    harness.callback_state = {"count": 5}
    harness.manager.request(periodic(4))
    harness.manager.flush(counter_at(4))
    weights = {key: value.clone() for key, value in harness.model.state_dict().items()}
    return harness, weights


def test_resume_restores_weights_optimizer_and_parts(new_run):
    first, weights = saved_run(new_run)
    first.close()
    second = new_run(model=make_model(seed=1))
    iteration = second.manager.resume("E1_U4_S32", lambda iteration: None)
    assert iteration == counter_at(4).cur_iteration
    assert all(torch.equal(second.model.state_dict()[key], value) for key, value in weights.items())
    assert second.model.optimizer.state_dict()["state"][0]["step"] == 1
    assert second.loaded == [("E1_U4_S32", {"count": 5})]


def test_a_check_refuses_before_anything_loads(new_run):
    first, _ = saved_run(new_run)
    first.close()
    second = new_run(model=make_model(seed=1))
    second._check_batch = lambda saved, tag: (_ for _ in ()).throw(CheckpointLoadError(f"refused {tag}"))  # noqa: SLF001
    second.manager._parts["effective_batch_size"].check = second._check_batch  # noqa: SLF001
    before = {key: value.clone() for key, value in second.model.state_dict().items()}
    with pytest.raises(CheckpointLoadError, match="refused E1_U4_S32"):
        second.manager.resume("E1_U4_S32", lambda iteration: None)
    assert all(torch.equal(second.model.state_dict()[key], value) for key, value in before.items())
    assert second.loaded == []


def test_check_iteration_refuses_before_the_weights_load(new_run):
    first, _ = saved_run(new_run)
    first.close()
    second = new_run(model=make_model(seed=1))
    before = second.model.linear.weight.clone()

    def refuse(iteration: TrainingIteration) -> None:
        raise CheckpointLoadError(f"past the end at {iteration}")

    with pytest.raises(CheckpointLoadError, match="past the end at E1_U4_S32"):
        second.manager.resume("E1_U4_S32", refuse)
    assert torch.equal(second.model.linear.weight, before)


def test_resume_cuts_metrics_back_and_sets_later_checkpoints_aside(new_run, tmp_path):
    run = new_run()
    for update in (4, 8):
        run.log.add_scalar("loss", float(update))
        run.log.flush(counter_at(update))
        run.manager.request(periodic(update))
        run.manager.flush(counter_at(update))
    run.close()
    resumed = new_run()
    resumed.manager.resume("E1_U4_S32", lambda iteration: None)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert resumed.tags() == {"E1_U4_S32"}
    assert resumed.storage.exists(str(resumed.store.directory / "abandoned_after_E1_U4_S32" / resumed.file("E2_U8_S64").name))


def test_resume_with_another_number_of_processes_warns_and_takes_rank_0(new_run, logs):
    first, _ = saved_run(new_run)
    first.close()
    second = new_run(rank=1, world_size=2)
    second.manager.resume("E1_U4_S32", lambda iteration: None)
    assert "written by 1 process(es), this run has 2" in logs.text
    assert second.loaded == [("E1_U4_S32", {"count": 5})]


def test_config_hyperparameters_win_over_the_checkpoint(new_run, logs):
    first, _ = saved_run(new_run)
    first.close()
    model = make_model()
    model.optimizer.param_groups[0]["weight_decay"] = 0.5
    second = new_run(model=model)
    second.manager.resume("E1_U4_S32", lambda iteration: None)
    assert model.optimizer.param_groups[0]["weight_decay"] == 0.5
    assert "the config's weight_decay 0.01 -> 0.5 replaces the checkpoint's" in logs.text


def test_has_finished_only_with_a_resumable_last_at_that_iteration(run):
    assert not run.manager.has_finished(counter_at(4).cur_iteration)
    run.manager.request(SaveRequest("last", optim=True, resumable=True))
    run.manager.flush(counter_at(4))
    assert run.manager.has_finished(counter_at(4).cur_iteration)
    assert not run.manager.has_finished(counter_at(5).cur_iteration)


def test_find_member_state_takes_only_the_asked_iteration(run):
    run.manager.request(SaveRequest("E1_U4_S32", weights=False, own_members=ema_members(4.0)))
    run.manager.flush(counter_at(4))
    run.manager.request(SaveRequest("latest", weights=False, own_members=ema_members(5.0)))
    run.manager.flush(counter_at(5))
    member = Member("net", "model", 0.9)
    found = run.manager.find_member_state(member, ["latest", "E1_U4_S32"], counter_at(4).cur_iteration, {})
    assert found is not None and found[0] == "E1_U4_S32" and torch.equal(found[1]["w"], torch.full((2,), 4.0))
    assert run.manager.find_member_state(member, ["latest"], counter_at(6).cur_iteration, {}) is None
