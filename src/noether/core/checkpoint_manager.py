"""The one path from "something wants a checkpoint" to "the store commits or reads a set".

Callbacks ask for saves through `request` at any hook; the trainer calls `flush` at the end of every
step, once every callback ran and the step's metrics were written, so that a set saved at a step
resumes exactly after it. What a step writes is decided in `flush`, in one place:

- model snapshots (a best model) first, in the order asked; their aliases (tolerance tags) are
  second names of the same files;
- then resumable sets (weights, optimizer state, the trainer state and callbacks' own members such
  as EMA weights); one whose contents equal an earlier set of the step (a periodic set and `latest`)
  becomes a second name of that set's files;
- then callbacks' own weight sets (an EMA on its own schedule), skipped under a tag a resumable set
  of the step holds (that set holds the same weights);
- a retention request runs once the set it makes room for is queued, and deletes only sets no
  retention owner keeps;
- deletions asked for in the step (a best model that dropped out of the top k) come last: the store
  does them once every set before them is committed.

Rank policy, the only one: every rank calls `request`, `flush` and the failure saves (their RNG and
callback states are gathered); rank 0 writes whole files and the trainer state, and under sharded
training every rank writes its own shards.

The trainer state is built from a registry of named parts (`register`), so what a checkpoint holds
is listed in one place and restored in the order it was registered.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from noether.core import distributed
from noether.core.checkpoint_store import NOT_RESUMABLE, CheckpointStore, Member
from noether.core.checkpointing import load_model_weights, load_trainer_state, model_members
from noether.core.models.base import ModelBase, select_models
from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError
from noether.core.writers.log_writer import LogWriter

logger = logging.getLogger("noether.checkpoints")

Members = dict[Member, dict[str, Any]]


class RetentionOwner(Protocol):
    """A callback whose periodic sets may be deleted; it says which of a run's sets it still keeps."""

    def keeps(self, tag: str) -> bool: ...


@dataclass(frozen=True)
class SaveRequest:
    """One set a callback wants written at the end of the step.

    `resumable` sets hold the trainer state and every callback's own members (a run continues from
    them); others hold `model` weights (a snapshot) or, with `own_members`, only what that function
    returns (an EMA on its own schedule)."""

    tag: str
    weights: bool = True
    optim: bool = False
    resumable: bool = False
    model_names: tuple[str, ...] | None = None
    save_frozen_weights: bool = False
    aliases: tuple[str, ...] = ()
    """Second names of the same files (tolerance tags of a best model)."""
    own_members: Callable[[], Members] | None = field(default=None, compare=False)
    prune: tuple[RetentionOwner, tuple[str, ...], int] | None = field(default=None, compare=False)
    """(owner, its periodic tags, how many of the newest to keep), run once this set is queued."""

    @property
    def contents(self) -> tuple:
        """What two resumable requests of one step must agree on to be one set under two names."""
        return self.weights, self.optim, self.model_names, self.save_frozen_weights


@dataclass
class _Part:
    save: Callable[[], Any]
    load: Callable[[Any, str], None] | None
    per_rank: bool
    check: Callable[[Any, str], None] | None
    fresh: bool


class CheckpointManager:
    """Owns the store of one run and every save and load of its checkpoints (see the module docstring)."""

    def __init__(
        self,
        store: CheckpointStore,
        model: ModelBase,
        log_writer: LogWriter,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.store = store
        self.model = model
        self.log_writer = log_writer
        self.rank = rank
        self.world_size = world_size
        self._parts: dict[str, _Part] = {}
        self._pending: list[SaveRequest] = []
        self._pending_deletions: list[str] = []
        self._retention_owners: list[RetentionOwner] = []
        self._members_of_callbacks: Callable[[str, UpdateCounter], Members] = lambda tag, counter: {}
        self._skipped_own_tags: set[str] = set()
        self.last_save_seconds: float | None = None
        """How long the last resumable set took from the save call until it was committed (on this process's
        clock; None before the first): what a save before a deadline must be given."""

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.store.sharded

    @property
    def _writes_members(self) -> bool:
        """Rank 0 writes whole files; under sharded training every rank writes its shards."""
        return self.is_main_process or self.sharded

    # ----------------------------------------------------------------------------- registry
    def register(
        self,
        name: str,
        save: Callable[[], Any],
        load: Callable[[Any, str], None] | None = None,
        *,
        check: Callable[[Any, str], None] | None = None,
        per_rank: bool = False,
        fresh: bool = False,
    ) -> None:
        """Add a named part to the trainer state. On a resume, every part's `check(saved, tag)` may refuse
        the checkpoint before anything loads; `load(saved, tag)` restores it once the weights are loaded.
        `per_rank` parts are gathered from every process and restored per rank (rank 0's on a resume with
        more processes). The part `metrics_rows` (how many rows metrics.jsonl had) is what a resume cuts
        the metrics back to. A `fresh` part's `save()` builds new objects every call, so `capture` keeps
        them without a copy (it runs before most steps' hooks)."""
        if name in self._parts:
            raise ValueError(f"a trainer-state part named '{name}' is registered already")
        self._parts[name] = _Part(save, load, per_rank, check, fresh)

    def register_members(self, members: Callable[[str, UpdateCounter], Members]) -> None:
        """Large state kept in files of its own (callbacks' EMA weights), part of every resumable set."""
        self._members_of_callbacks = members

    def add_retention_owner(self, owner: RetentionOwner) -> None:
        self._retention_owners.append(owner)

    # ----------------------------------------------------------------------------- saving
    def request(self, request: SaveRequest) -> None:
        """Queue a set for the end of the current step (see `flush`)."""
        self._pending.append(request)

    def delete(self, tag: str) -> None:
        """Delete set `tag` at the end of the current step, after that step's saves are committed (rank 0)."""
        self._pending_deletions.append(tag)

    def flush(self, counter: UpdateCounter) -> None:
        """Write the sets asked for in this step, in the order the module docstring gives."""
        if self._pending:
            self._flush_saves(counter)
        if self._pending_deletions:
            deletions, self._pending_deletions = self._pending_deletions, []
            if self.is_main_process:
                for tag in deletions:
                    self.store.delete(tag)

    def _flush_saves(self, counter: UpdateCounter) -> None:
        pending, self._pending = self._pending, []
        for request in pending:
            if not request.resumable and request.own_members is None:
                self._save_snapshot(request, counter.cur_iteration)
        written: dict[tuple, tuple[str, list[Member]]] = {}  # contents -> (tag, members) of a resumable set of this step
        for request in pending:
            if not request.resumable:
                continue
            if request.contents in written and not self.sharded:
                source_tag, members = written[request.contents]
                if self.is_main_process:
                    self.store.link(source_tag, request.tag, members)
            else:
                written[request.contents] = (request.tag, self._save_resumable(request, counter))
            if request.prune is not None:
                self.prune(*request.prune)
        resumable_tags = {request.tag for request in pending if request.resumable}
        for request in pending:
            if request.own_members is not None and request.tag not in resumable_tags:
                self._save_own_members(request, counter.cur_iteration)

    def capture(self) -> dict[str, Any]:
        """A copy of every trainer-state part as it is now (this rank's), for an interrupt or error set to hold
        in place of the parts' values then: the state before hooks that a signal or a failure may cut."""
        return {name: part.save() if part.fresh else copy.deepcopy(part.save()) for name, part in self._parts.items()}

    def discard_step(self) -> None:
        """Forget the saves and deletions asked for in this step (a step whose hooks run again on resume)."""
        self._pending, self._pending_deletions = [], []

    def save_interrupt(self, counter: UpdateCounter, captured: dict[str, Any] | None = None) -> str:
        """A resumable set of everything at the current step, written by every rank together; with `captured`
        (see `capture`), the trainer state is that one."""
        tag = f"{counter.cur_iteration}.signal_interrupt"
        self._save_resumable(SaveRequest(tag, optim=True, resumable=True), counter, captured=captured)
        return tag

    def save_on_failure(
        self,
        counter: UpdateCounter,
        error: BaseException,
        *,
        before_update: Callable[[], None] | None,
        every_rank: bool = False,
        captured: dict[str, Any] | None = None,
    ) -> None:
        """Write `{iteration}.error` (not on a forced stop by a second Ctrl-C), then wait for every write.

        Unless `every_rank` says every process raised the same error at the same step, the error may have
        hit this rank alone, so nothing here waits for the other ranks; shards are written by every rank
        together, so a sharded run with several processes then gets no error set.
        Snapshots asked for earlier in the failed step are written first: the callback states of the
        error set already count them. `before_update` undoes what a half-done update drew from the RNG.
        With `captured` (see `capture`: the state before the failed step's hooks, which a resume runs again),
        the trainer state is that one; the step's snapshots are still written (the resume writes the same),
        its deletions are left to the resume.
        """
        tag = None
        try:
            if self.sharded and distributed.is_distributed() and not every_rank:
                logger.error(f"training failed ({error!r}); no error checkpoint under sharded training with several processes")
            elif not isinstance(error, KeyboardInterrupt):
                pending, self._pending = self._pending, []
                deletions, self._pending_deletions = self._pending_deletions, []
                for request in pending:
                    if not request.resumable and request.own_members is None:
                        self._save_snapshot(request, counter.cur_iteration)
                if before_update is not None:
                    before_update()
                tag = f"{counter.cur_iteration}.error"
                request = SaveRequest(tag, optim=True, resumable=True)
                self._save_resumable(request, counter, all_ranks=every_rank, captured=captured)
                # the callbacks' states count the deletions done (a captured step asks for them again)
                if self.is_main_process and captured is None:
                    for deleted in deletions:
                        self.store.delete(deleted)
            self.store.wait()
            if tag is not None and self.is_main_process:  # said once it is written: the save may fail in the wait
                logger.error(f"training failed ({error!r}); saved checkpoint '{tag}'")
        except Exception as save_error:  # noqa: BLE001 - the original error matters more
            logger.error(f"training failed ({error!r}) and saving its checkpoint failed too: {save_error!r}")
            # files of the set queued before its save failed: wait for them here, so that their failures
            # (part of this one) cannot surface later in place of the original error
            with contextlib.suppress(Exception):
                self.store.wait()

    def check(self) -> None:
        """Raise the first failure of a background write, at a step boundary."""
        self.store.check()

    def wait(self) -> None:
        """Wait until every queued set is written and committed (raises the first write error)."""
        self.store.wait()

    def close(self) -> None:
        self.store.close()

    def _save_snapshot(self, request: SaveRequest, iteration: TrainingIteration) -> None:
        if not self._writes_members:
            return
        members = model_members(
            self.model, model_names=_names(request), save_frozen_weights=request.save_frozen_weights, sharded=self.sharded
        )
        self.store.save(request.tag, iteration, members)
        if self.is_main_process:
            for alias in request.aliases:
                self.store.link(request.tag, alias, members)

    def _save_resumable(
        self, request: SaveRequest, counter: UpdateCounter, *, all_ranks: bool = True, captured: dict[str, Any] | None = None
    ) -> list[Member]:
        """Weights, optimizer state, callbacks' members and the trainer state under `request.tag`.
        Returns the members written (none on a rank that writes nothing)."""
        started = time.monotonic()
        value_of = (lambda name, part: captured[name]) if captured is not None else (lambda name, part: part.save())
        local = {name: value_of(name, part) for name, part in self._parts.items() if part.per_rank}
        per_rank = distributed.gather_to_all(local) if all_ranks else [local]
        sharded = self.sharded and all_ranks
        if not (self.is_main_process or sharded):
            return []
        members = model_members(
            self.model,
            save_weights=request.weights,
            save_optim=request.optim,
            model_names=_names(request),
            save_frozen_weights=request.save_frozen_weights,
            sharded=self.sharded,
        )
        members.update(self._members_of_callbacks(request.tag, counter))
        trainer_state = self._trainer_state(per_rank, captured) if self.is_main_process else None
        if trainer_state is not None and not request.optim and self._has_optimizer(request):
            trainer_state[NOT_RESUMABLE] = "no optimizer state (saved without it): training cannot continue from it"
        self.store.save(request.tag, counter.cur_iteration, members, trainer_state, trainer_model_name=self.model.name)
        if self.is_main_process:
            self.store.after_commits(lambda: setattr(self, "last_save_seconds", time.monotonic() - started))
        return [*members, Member(self.model.name, "trainer")] if self.is_main_process else list(members)

    def _has_optimizer(self, request: SaveRequest) -> bool:
        return any(leaf.optimizer is not None for leaf in select_models(self.model, _names(request)).values())

    def _save_own_members(self, request: SaveRequest, iteration: TrainingIteration) -> None:
        """A callback's own weights never replace those of a tag that holds a resumable set (they must
        stay the state training continues with): the store skips such a save, said once per tag."""
        if not self._writes_members:
            return
        assert request.own_members is not None
        if not self.store.save(request.tag, iteration, request.own_members()) and request.tag not in self._skipped_own_tags:
            self._skipped_own_tags.add(request.tag)
            logger.info(
                f"weights under '{request.tag}' are saved with the trainer's checkpoint '{request.tag}' only "
                "(another save there would leave that checkpoint with weights of another iteration)"
            )

    def _trainer_state(self, per_rank: list[dict[str, Any]], captured: dict[str, Any] | None = None) -> dict[str, Any]:
        state = {}
        for name, part in self._parts.items():
            if part.per_rank:
                state[name] = [states[name] for states in per_rank]
            else:
                state[name] = captured[name] if captured is not None else part.save()
        return state

    def prune(self, owner: RetentionOwner, tags: Iterable[str], keep: int) -> None:
        """Delete `owner`'s sets older than its `keep` newest once every earlier save is committed,
        except those another retention owner keeps (rank 0)."""
        if not self.is_main_process:
            return
        tags = list(tags)
        others = [other for other in self._retention_owners if other is not owner]
        protected = [tag for tag in tags if any(other.keeps(tag) for other in others)]
        for tag in protected:
            logger.debug(f"checkpoint '{tag}' is kept by another callback")
        self.store.prune(tags, keep, protected)

    # ----------------------------------------------------------------------------- loading
    def resume(self, tag: str, check_iteration: Callable[[TrainingIteration], None]) -> TrainingIteration:
        """Restore everything saved under `tag`: every part may refuse it first (`check`), then
        `check_iteration` may refuse its iteration; the weights and optimizer states load, then the
        trainer state's parts in the order registered. Last, on rank 0, the history the checkpoint
        leaves behind is cut off: metrics logged and checkpoints written after it."""
        state = load_trainer_state(self.store, self.model.name, tag)
        iteration = TrainingIteration.from_dict(state["training_iteration"])
        for name, part in self._parts.items():
            if part.check is not None:
                part.check(state.get(name), tag)
        check_iteration(iteration)
        configured = _configured_hyperparameters(self.model)
        load_model_weights(self.model, self.store, tag, load_optim=True, expected_iteration=iteration)
        _apply_configured_hyperparameters(self.model, configured)
        saved_ranks = len(next((state[name] for name, part in self._parts.items() if part.per_rank and name in state), [None]))
        if saved_ranks != self.world_size:
            logger.warning(
                f"checkpoint '{tag}' was written by {saved_ranks} process(es), this run has {self.world_size}: "
                "random and callback states are taken from rank 0, so the run will not continue exactly"
            )
        rank = self.rank if self.rank < saved_ranks else 0
        for name, part in self._parts.items():
            if part.load is not None:
                saved = state.get(name)
                part.load(saved[rank] if part.per_rank else saved, tag)
        if self.is_main_process:
            # checkpoints first: a stop between the two steps leaves `tag` the newest checkpoint, so the
            # next start resumes from it and cuts the metrics then (the other way round, it would find the
            # abandoned history's `last` and take the run for finished, its metrics already cut)
            for moved in self.store.set_aside_after(iteration):
                logger.warning(
                    f"checkpoint '{moved}' was written after '{tag}' by the abandoned run; moved to abandoned_after_{iteration}/"
                )
            self.log_writer.keep_first_rows(state["metrics_rows"])
            self.log_writer.resumed_at(iteration.update)
        return iteration

    def load_weights(self, tag: str) -> TrainingIteration:
        """The weights saved under `tag` (for evaluation); returns the iteration they were written at."""
        iteration = self.store.iteration(tag)
        load_model_weights(self.model, self.store, tag, load_optim=False, expected_iteration=iteration)
        return iteration

    def find_member_state(
        self, member: Member, tags: Iterable[str], iteration: TrainingIteration, template: dict[str, Any]
    ) -> tuple[str, Any] | None:
        """The state dict of the first of `tags` whose `member` was written at `iteration` (a sharded one
        read into `template`'s tensors), with its tag; None when none was."""
        store = self.store
        for tag in dict.fromkeys(tags):
            if not store.exists(member, tag):
                continue
            if store.is_sharded(member, tag):
                if store.written_at(member, tag) != iteration:
                    continue  # read into the caller's tensors only when it is the one to use
                payload = store.load_into(member, tag, template)
            else:
                payload = store.load(member, tag)
            if TrainingIteration.from_dict(payload["training_iteration"]) == iteration:
                return tag, payload["state_dict"]
        return None

    def member_path(self, member: Member, tag: str) -> Any:
        return self.store.path(member, tag)

    def saved_part(self, tag: str, name: str) -> Any:
        """One part of the trainer state saved under `tag` (None when it has none), without loading the rest."""
        return load_trainer_state(self.store, self.model.name, tag).get(name)

    def link_weights(
        self, source_tag: str, tags: Iterable[str], model_names: tuple[str, ...] | None, save_frozen_weights: bool
    ) -> bool:
        """Name the model weights of set `source_tag` also `tags` (rank 0); False, and nothing written, when
        `source_tag` lacks them or the sets are sharded."""
        names = None if model_names is None else list(model_names)
        members = model_members(self.model, model_names=names, save_frozen_weights=save_frozen_weights, sharded=False)
        if self.sharded or not members or not all(self.store.exists(member, source_tag) for member in members):
            return False
        if self.is_main_process:
            for tag in tags:
                self.store.link(source_tag, tag, list(members))
        return True

    def holds(self, tag: str) -> bool:
        """Whether any file of set `tag` is on disk."""
        return bool(self.store.info(tag).files)

    def iteration(self, tag: str) -> TrainingIteration:
        """The iteration checkpoint `tag` was written at, read without loading it."""
        return self.store.iteration(tag)

    def has_finished(self, iteration: TrainingIteration) -> bool:
        """`last` is written once after_training is done: a stop before it leaves after_training to do again."""
        last = self.store.info("last")
        return last.resumable and last.iteration == iteration


def _names(request: SaveRequest) -> list[str] | None:
    return None if request.model_names is None else list(request.model_names)


def _hyperparameters(param_group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in param_group.items() if key != "params"}


def _optimizers(model: ModelBase) -> dict[str, torch.optim.Optimizer]:
    return {name: leaf.optimizer for name, leaf in model.named_models().items() if leaf.optimizer is not None}


def _configured_hyperparameters(model: ModelBase) -> dict[str, list[dict[str, Any]]]:
    return {name: [_hyperparameters(group) for group in optimizer.param_groups] for name, optimizer in _optimizers(model).items()}


def _apply_configured_hyperparameters(model: ModelBase, configured: dict[str, list[dict[str, Any]]]) -> None:
    """The config's optimizer hyperparameters over the checkpoint's, so that config.yaml says what runs.
    The learning rate follows the configured schedule at every update anyway."""
    for name, optimizer in _optimizers(model).items():
        for group, wanted in zip(optimizer.param_groups, configured[name]):
            wanted = {key: value for key, value in wanted.items() if key != "lr"}
            changed = [f"{key} {group[key]} -> {value}" for key, value in wanted.items() if group.get(key) != value]
            group.update(wanted)
            if changed:
                logger.info(f"optimizer of {name}: the config's {', '.join(changed)} replaces the checkpoint's")


__all__ = ["CheckpointLoadError", "CheckpointManager", "RetentionOwner", "SaveRequest"]
