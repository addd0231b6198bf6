"""How checkpoints lie on disk: the one place that names, stages, commits, lists, loads and deletes them.

A checkpoint is a *set* of members under one tag: each (sub)model's weights and optimizer state,
EMA weights, and (for checkpoints the trainer can resume from) the trainer state. Callers hand
over payloads and say "save these under that tag"; the store

- stamps every payload with its tag, training iteration and run id, so that a set can be checked;
- stages the members under hidden names (`.{name}~{set id}.staged`), and once every member is
  written moves them under their final names, the trainer state last: a tag never holds members
  of two different saves, and a crash at any moment leaves every committed set whole;
- aborts a set whose member could not be written (its staged files are removed, the previous set
  under the tag stays as it was);
- after a crash (`recover`), completes a set only when every member was staged by the same save,
  and removes everything else that was left half done;
- writes the bytes of a member once per training iteration: a later save of the same member with
  the same tensors (same memory, not changed in place since) at the same iteration, under another
  tag, becomes a hard link to the committed file (a new best at a checkpoint step); `link` names a
  whole set again, trainer state included (`latest` and the periodic set of one step); such a file
  keeps the tag it was first written under in its stamp, and the trainer state lists its set's
  files by a name pattern (`{tag}`), so that it serves every tag it lies under;
- lists tags with their iteration and whether they can be resumed, and deletes a tag as a whole
  (a crash during a deletion is finished by the next `recover`).

Members are files (`{model}[_ema={factor}]_cp={tag}_{part}.th`) written by a CheckpointWriter into its
storage (noether.core.storage), through which the store also lists, reads, renames and deletes.
Under sharded training (`sharded=True`, FSDP) weights and optimizer states are folders instead
(`..._{part}.dcp/`): every rank writes its shards with torch.distributed.checkpoint into the staged
folder, rank 0 adds the payload's other fields (`noether.th`) and commits the set once every rank's
shards and the metadata are written. A folder loads with any number of processes, one included. Sharded sets need a local storage
(torch.distributed.checkpoint writes the folders itself).
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from noether.core import distributed
from noether.core.storage import LocalStorage, Storage
from noether.core.utils.formatting import one_line, path_size
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import (
    CheckpointLoadError,
    CheckpointWriteError,
    CheckpointWriter,
    file_digest,
    load_checkpoint,
)

Part = Literal["model", "optim", "trainer"]
SUFFIX = ".th"
SHARDED_SUFFIX = ".dcp"
SHARDED_FIELDS = "noether.th"  # inside a .dcp folder: the payload without its state_dict
REPLACED = ".replaced"
STAGED = ".staged"
DELETING = ".deleting"
PERIODIC_TAG = re.compile(r"^E(?P<epoch>\d+)_U(?P<update>\d+)_S(?P<sample>\d+)$")
_MEMBER_NAME = re.compile(
    r"^(?P<model>.+?)(?:_ema=(?P<ema>[0-9.eE+-]+))?_cp=(?P<tag>.+)_(?P<part>model|optim|trainer)(?P<suffix>\.th|\.dcp)$"
)
_STAGED_NAME = re.compile(r"^\.(?P<name>.+)~(?P<set_id>[0-9a-f]+-\d+)(?:" + re.escape(STAGED) + "|" + re.escape(REPLACED) + ")$")
_set_ids = itertools.count()
TAG_FIELD = "{tag}"  # in the file names a trainer state lists: the tag the state lies under
HASHES_SUFFIX = "_hashes.json"  # `{model}_cp={tag}_hashes.json`: the content hash of every file of a set
NOT_RESUMABLE = "not_resumable"  # in a trainer state whose set training cannot continue from: why not


class Mirror(Protocol):
    """A copy of the run elsewhere (an object store), told of each change once the store has made it durable."""

    def committed(self, files: list[Path]) -> None:
        """A set's files, in commit order: members, hashes file, trainer state (if any)."""

    def removed(self, files: list[Path]) -> None: ...

    def set_aside_after(self, iteration: TrainingIteration, folder: str) -> None:
        """Every set written after `iteration` moved into `folder` (see `CheckpointStore.set_aside_after`)."""


@dataclass(frozen=True)
class Member:
    """One file of a checkpoint set."""

    model_name: str
    part: Part
    ema_factor: float | None = None

    def file_name(self, tag: str, sharded: bool = False) -> str:
        """The file (or, `sharded`, the folder; never for the trainer state) that holds this member."""
        ema = "" if self.ema_factor is None else f"_ema={self.ema_factor}"
        suffix = SHARDED_SUFFIX if sharded and self.part != "trainer" else SUFFIX
        return f"{self.model_name}{ema}_cp={tag}_{self.part}{suffix}"

    @staticmethod
    def parse(file_name: str) -> tuple[Member, str] | None:
        """The member and tag a final file name stands for; None for any other file."""
        match = _MEMBER_NAME.match(file_name)
        if match is None:
            return None
        ema = float(match["ema"]) if match["ema"] is not None else None
        return Member(match["model"], match["part"], ema), match["tag"]  # type: ignore[arg-type]

    def describe(self) -> str:
        """`the EMA 0.999 weights of classifier`."""
        kind = {"model": "weights", "optim": "optimizer state", "trainer": "trainer state"}[self.part]
        ema = "" if self.ema_factor is None else f"EMA {self.ema_factor} "
        return f"the {ema}{kind} of {self.model_name}"


@dataclass
class CheckpointInfo:
    """What a tag holds on disk."""

    tag: str
    files: dict[Member, Path] = field(default_factory=dict)
    iteration: TrainingIteration | None = None
    resumable: bool = False
    complete: bool = False
    """A trainer set with every file it lists (resumable unless it was saved without what a resume needs)."""
    problem: str | None = None
    """Why the tag cannot be used (None when it can, also when it holds weights only)."""

    @property
    def size(self) -> int:
        return sum(path_size(path) for path in self.files.values())


@dataclass
class ContentCheck:
    """What reading a set's files back found."""

    changed: list[str] = field(default_factory=list)
    """Files whose bytes are not those written (their content hash differs): damaged on disk or in transfer."""
    unhashed: list[str] = field(default_factory=list)
    """Files with no recorded hash (written before hashes were recorded): they load, nothing more is known."""


@dataclass(frozen=True)
class StagedSet:
    """A set whose trainer state a stop left staged: what `recover` decides on."""

    tag: str
    iteration: TrainingIteration
    files: list[tuple[Path, Path]]
    """(final, staged) name of every file of the set, the trainer state last."""
    still_staged: list[Path]
    moved: list[Path]
    """Files already under their final names, stamped with the set's iteration."""
    missing: list[Path]
    """Files neither staged nor moved: the set was never completely written."""

    @property
    def commit_begun(self) -> bool:
        """Every file staged or moved, at least one moved: the commit had begun, so every file was durable."""
        return bool(self.moved) and not self.missing


def stamp(tag: str, iteration: TrainingIteration, run_id: str) -> dict[str, Any]:
    """What every checkpoint file records about itself, so that a set of files can be checked."""
    return {"checkpoint_tag": tag, "training_iteration": iteration.to_dict(), "run_id": run_id}


def iteration_of_tag(tag: str) -> TrainingIteration | None:
    """The iteration a periodic, interrupt or error tag names (`E2_U38_S2432[.signal_interrupt]`)."""
    match = PERIODIC_TAG.match(tag.split(".", 1)[0])
    return None if match is None else TrainingIteration(int(match["epoch"]), int(match["update"]), int(match["sample"]))


class CheckpointStore:
    """Checkpoint sets of one run's `checkpoints/` directory (see the module docstring).

    Without a writer the store only reads (run tools, evaluation of a read-only run) from `storage`
    (the local filesystem by default); with one, it works in the writer's storage. A `sharded` store
    writes weights and optimizer states as `.dcp` folders; every rank calls `save` then.
    """

    def __init__(
        self,
        directory: Path,
        run_id: str,
        writer: CheckpointWriter | None = None,
        *,
        sharded: bool = False,
        storage: Storage | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.mirror = mirror
        self.run_id = run_id
        self._writer = writer
        self.storage: Storage = writer.storage if writer is not None else storage or LocalStorage()
        if sharded and self.storage.local_path(str(self.directory)) is None:
            raise ValueError(
                f"sharded checkpoints are written with torch.distributed.checkpoint, which needs {directory} on a local filesystem"
            )
        self.sharded = sharded
        self._trainer_tags: set[str] = set()  # tags this process saved (or will save) a trainer set under
        self._trainer_tags_on_disk: set[str] | None = None  # from one listing, until the directory changes
        self._written: dict[Member, _Written] = {}  # each member's latest bytes, for saves of the same bytes to link

    # ----------------------------------------------------------------------------- names
    def path(self, member: Member, tag: str) -> Path:
        """Where `member` of `tag` lies: its folder or file on disk, else where this store writes it."""
        folder = self.directory / member.file_name(tag, sharded=True)
        single = self.directory / member.file_name(tag)
        if member.part != "trainer" and self.storage.is_folder(str(folder)):
            return folder
        return folder if self.sharded and not self._exists(single) else single

    def is_sharded(self, member: Member, tag: str) -> bool:
        return self.path(member, tag).suffix == SHARDED_SUFFIX

    # ----------------------------------------------------------------------------- writing
    def save(
        self,
        tag: str,
        iteration: TrainingIteration,
        members: dict[Member, dict[str, Any]],
        trainer_state: dict[str, Any] | None = None,
        *,
        trainer_model_name: str | None = None,
    ) -> bool:
        """Stage `members` (payloads with a `state_dict`) and, with `trainer_state`, the trainer state
        of `trainer_model_name`; commit them under `tag` once all are written.

        A set without trainer state (a best model, EMA weights on their own schedule) never replaces
        members of a tag that holds a trainer set: those must stay the state the trainer resumes
        with. Such a save is skipped (returns False).
        """
        writer = self._require_writer()
        skip = trainer_state is None and self.holds_trainer_set(tag)
        outcome = _SetOutcome()
        set_id = f"{os.getpid():x}-{next(_set_ids)}"
        if self.sharded:  # every rank writes into the same staged folders, as rank 0 decides
            skip, set_id = distributed.broadcast_from_main((skip, set_id))
        if skip:
            return False
        if trainer_state is not None:
            self._trainer_tags.add(tag)
        is_main = distributed.rank() == 0
        writer.check()  # an earlier write's failure is reported before anything of this set is staged
        staged: list[tuple[Path, Path]] = []
        listed: list[str] = []  # the set's files, named for any tag (see TAG_FIELD)
        try:
            for member, payload in members.items():
                final = self.directory / member.file_name(tag, sharded=self.sharded)
                staged.append((final, _staged_path(final, set_id)))
                listed.append(member.file_name(TAG_FIELD, sharded=self.sharded))
                if final.suffix == SHARDED_SUFFIX:
                    self._write_sharded(staged[-1][1], {**payload, **stamp(tag, iteration, self.run_id)}, is_main)
                elif is_main:
                    self._write_or_link(member, tag, iteration, payload, staged[-1], outcome)
            if not is_main:
                return True  # rank 0 commits once every rank's shards are written
            hashes_model = trainer_model_name or min((member.model_name for member in members), default="model")
            hashes = self.directory / _hashes_name(hashes_model, tag)
            listed.append(_hashes_name(hashes_model, TAG_FIELD))
            if trainer_state is not None:
                final = self.path(Member(trainer_model_name or "model", "trainer"), tag)
                staged.append((final, _staged_path(final, set_id)))
                payload = {**trainer_state, **stamp(tag, iteration, self.run_id), "files": listed}
                writer.save(staged[-1][1], payload, sync_directory=False, fsync=False)
            # an earlier write's failure reported here leaves this set to the discard below
            hashed = _Hashes(iteration, hashes, _staged_path(hashes, set_id))
            writer.call_after_writes(lambda: self._commit_or_abort(tag, staged, outcome, hashed))
        except BaseException:
            if not is_main:
                raise  # rank 0 removes what was staged
            if not writer.asynchronous:
                self._discard(staged)
                raise
            # behind the members already queued; a later write failure reported while queueing is
            # dropped (this set's own error is the one raised)
            while True:
                with contextlib.suppress(CheckpointWriteError):
                    writer.call_after_writes(lambda: self._discard(staged))
                    break
            raise
        return True

    def _write_or_link(
        self,
        member: Member,
        tag: str,
        iteration: TrainingIteration,
        payload: dict[str, Any],
        paths: tuple[Path, Path],
        outcome: _SetOutcome,
    ) -> None:
        """Stage `member` at `paths` (final, staged): a hard link to the file this store wrote with the same
        bytes at this iteration, else a write of `payload` (made durable by the commit, one barrier for the
        whole set, not one per file)."""
        writer = self._require_writer()
        final, staged = paths
        fingerprint = _fingerprint(payload)
        written = self._written.get(member)
        if written is not None and written.iteration == iteration and written.fingerprint == fingerprint:
            writer.call_after_writes(lambda: self._link_staged(written, staged, outcome))
            outcome.linked.add(staged)
            return
        writer.save(staged, {**payload, **stamp(tag, iteration, self.run_id)}, sync_directory=False, fsync=False)
        self._written[member] = _Written(iteration, fingerprint, final, outcome)

    def link(self, source_tag: str, tag: str, members: Iterable[Member]) -> None:
        """Make `tag` a second name of `source_tag`'s `members` once they are committed: the same bytes,
        written once (their stamped tag stays `source_tag`), staged and committed as one set like a save
        (the trainer state last, one directory sync). With the trainer state, `tag` is a resumable set:
        `latest` and the periodic checkpoint of one step, for one write."""
        writer = self._require_writer()
        set_id = f"{os.getpid():x}-{next(_set_ids)}"
        sources, staged = [], []
        for member in sorted(members, key=lambda member: member.part == "trainer"):
            if member.part == "trainer":
                self._trainer_tags.add(tag)
            sources.append(self.directory / member.file_name(source_tag, sharded=self.sharded))
            final = self.directory / member.file_name(tag, sharded=self.sharded)
            staged.append((final, _staged_path(final, set_id)))
        outcome = _SetOutcome()

        def stage_and_commit() -> None:
            for hashes in self._hashes_of(source_tag):  # the same digests: they name the files by pattern
                renamed = self.directory / hashes.name.replace(f"_cp={source_tag}{HASHES_SUFFIX}", f"_cp={tag}{HASHES_SUFFIX}")
                sources.insert(len(sources) - has_trainer, hashes)
                staged.insert(len(staged) - has_trainer, (renamed, _staged_path(renamed, set_id)))
            outcome.linked.update(staged_path for _, staged_path in staged)  # links share their source's durable bytes
            for source, (final, staged_path) in zip(sources, staged):
                try:
                    self.storage.link(str(source), str(staged_path))
                except OSError as error:
                    self._discard(staged)
                    reason = error.strerror or error
                    raise CheckpointWriteError(f"could not write {final.name} as a link to {source.name}: {reason}") from error
            self._commit_or_abort(tag, staged, outcome)

        has_trainer = int(any(member.part == "trainer" for member in members))
        writer.call_after_writes(stage_and_commit)

    def delete(self, tag: str) -> None:
        """Remove every file of `tag` once every earlier save is committed (so never before a newer set
        is durable). The first file is renamed to a marker first: a crash midway leaves the marker,
        and `recover` finishes the deletion, so no partial set is ever left to be resumed."""
        self._written = {
            member: written for member, written in self._written.items() if written.path != self.directory / member.file_name(tag)
        }
        self._require_writer().call_after_writes(lambda: self._delete_now(tag))

    def prune(self, tags: list[str], keep: int, protected: Iterable[str] = ()) -> None:
        """Once every earlier save is committed, delete those of `tags` older than the `keep` newest
        complete ones, except `protected` tags. Decided on the writer thread: a set whose write failed
        is not on disk, so it never counts towards `keep`, and the sets it would have replaced stay."""
        protected = frozenset(protected)

        def prune_now() -> None:
            infos = [info for info in map(self.info, tags) if info.files and info.iteration is not None]
            kept = sorted((info for info in infos if info.complete), key=lambda info: info.iteration)[-keep:]
            if len(kept) < keep:
                return
            for info in infos:
                if info.iteration < kept[0].iteration and info.tag not in protected:
                    self._delete_now(info.tag)

        self._require_writer().call_after_writes(prune_now)

    def after_commits(self, action: Callable[[], None]) -> None:
        """Run `action` once every earlier save is committed (on the writer thread; at once when synchronous)."""
        self._require_writer().call_after_writes(action)

    def check(self) -> None:
        """Raise the first failure of a background write, if any, without waiting."""
        self._require_writer().check()

    def wait(self) -> None:
        """Wait until every set is written and committed (raises the first write error)."""
        self._require_writer().wait()

    def close(self) -> None:
        """Wait for every write and stop the writer (a read-only store has none to stop)."""
        if self._writer is not None:
            self._writer.close()

    def holds_trainer_set(self, tag: str) -> bool:
        if self._trainer_tags_on_disk is None:
            parsed = filter(None, (Member.parse(path.name) for path in self._listing()))
            self._trainer_tags_on_disk = {on_disk for member, on_disk in parsed if member.part == "trainer"}
        return tag in self._trainer_tags or tag in self._trainer_tags_on_disk

    def _require_writer(self) -> CheckpointWriter:
        if self._writer is None:
            raise RuntimeError("this CheckpointStore was opened for reading only")
        return self._writer

    def _delete_now(self, tag: str) -> None:
        self._trainer_tags_on_disk = None
        files = sorted(self._members_on_disk(tag).items(), key=lambda item: item[0].part != "trainer")
        if not files:
            return
        marker = files[0][1].with_name(f".{files[0][1].name}{DELETING}")
        self.storage.rename(str(files[0][1]), str(marker))
        self.storage.sync_folder(str(self.directory))
        others = [*(path for _, path in files[1:]), *self._hashes_of(tag)]
        for path in others:
            self.storage.remove(str(path))
        self.storage.remove(str(marker))
        self.storage.sync_folder(str(self.directory))
        if self.mirror is not None:
            self.mirror.removed([files[0][1], *others])

    # ----------------------------------------------------------------------------- recovery
    def recover(self) -> list[str]:
        """After a crash: commit every set whose members were all staged by one save, finish
        interrupted deletions, remove every other leftover. Returns one line per action, for the log.

        Only for a run directory that no other process writes to (the run lock guarantees that).
        """
        actions: list[str] = []
        self._trainer_tags_on_disk = None
        if not self.storage.is_folder(str(self.directory)):
            return actions
        for marker in self._hidden(f".*{DELETING}"):
            parsed = Member.parse(marker.name[1 : -len(DELETING)])
            if parsed is not None:
                for path in [*self._members_on_disk(parsed[1]).values(), *self._hashes_of(parsed[1])]:
                    self.storage.remove(str(path))
                actions.append(f"finished deleting checkpoint '{parsed[1]}'")
            self.storage.remove(str(marker))
        for staged_trainer in self._hidden(f".*_trainer{SUFFIX}~*{STAGED}"):
            actions.append(self._recover_set(staged_trainer))
        for leftover in self._hidden(f".*{STAGED}"):
            self.storage.remove(str(leftover))
        for replaced in self._hidden(f".*{REPLACED}"):
            # a folder moved aside by a commit that stopped before its successor took its name
            match = _STAGED_NAME.match(replaced.name)
            final = self.directory / match["name"] if match else None
            if final is not None and not self._exists(final):
                self.storage.rename(str(replaced), str(final))
                actions.append(f"restored {final.name}, whose replacement was never committed")
            else:
                self.storage.remove(str(replaced))
        return actions

    def _hidden(self, pattern: str) -> list[Path]:
        """The hidden files (staged, being deleted, moved aside) whose names match `pattern`, sorted."""
        return sorted(path for path in self._listing(hidden=True) if fnmatch.fnmatchcase(path.name, pattern))

    def _recover_set(self, staged_trainer: Path) -> str:
        try:
            staged = self._staged_set(staged_trainer)
        except CheckpointLoadError as error:
            self.storage.remove(str(staged_trainer))
            return f"discarded a damaged staged checkpoint set ({staged_trainer.name}: {error})"
        if not staged.commit_begun:
            # never completely written, or written but not yet made durable (its commit had not begun:
            # after a power loss its files may hold holes); the previous set under the tag stays
            self._discard(staged.files)
            reason = f"{staged.missing[0].name} was never completely written" if staged.missing else "its commit had not begun"
            return f"discarded checkpoint set '{staged.tag}' of {staged.iteration}: {reason}"
        self._commit(staged.files, self.storage.rename)  # its files were made durable before the first move
        return f"completed checkpoint set '{staged.tag}' of {staged.iteration}, whose commit a stop had interrupted"

    def interrupted_commits(self) -> list[StagedSet]:
        """The staged sets whose commit a stop interrupted, which the next `recover` completes (read only)."""
        found = []
        for staged_trainer in self._hidden(f".*_trainer{SUFFIX}~*{STAGED}"):
            with contextlib.suppress(CheckpointLoadError):
                staged = self._staged_set(staged_trainer)
                if staged.commit_begun:
                    found.append(staged)
        return found

    def _staged_set(self, staged_trainer: Path) -> StagedSet:
        """What a staged trainer state says of its set; CheckpointLoadError when it cannot be read."""
        match = _STAGED_NAME.match(staged_trainer.name)
        parsed = Member.parse(match["name"]) if match else None
        if parsed is None:
            raise CheckpointLoadError("not a staged trainer state")
        tag = parsed[1]  # the stamp may name another tag: the state may be a link
        try:
            state = self._read(staged_trainer)
            iteration = TrainingIteration.from_dict(state["training_iteration"])
            members = [self.directory / name for name in _set_files(state, tag)]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointLoadError(f"{staged_trainer.name} lacks {error}") from None
        pairs = [(path, _staged_path(path, match["set_id"])) for path in members]
        still_staged = [staged for _, staged in pairs if self._exists(staged)]
        moved = [final for final, staged in pairs if staged not in still_staged and self._stamped_at(final, iteration)]
        missing = [final for final, staged in pairs if staged not in still_staged and final not in moved]
        files = [*pairs, (self.directory / match["name"], staged_trainer)]
        return StagedSet(tag, iteration, files, [*still_staged, staged_trainer], moved, missing)

    def _stamped_at(self, path: Path, iteration: TrainingIteration) -> bool:
        try:
            payload = self._read_hashes(path) if path.name.endswith(HASHES_SUFFIX) else self._read(path)
        except CheckpointLoadError:
            return False
        # the iteration, not the tag: a member may be a link to the same bytes written under another tag
        return payload.get("training_iteration") == iteration.to_dict()

    def set_aside_after(self, iteration: TrainingIteration) -> list[str]:
        """Move every tag written after `iteration` (another history, abandoned by a resume from an
        earlier checkpoint) into `abandoned_after_{iteration}/` (`.2`, `.3`, ... when a branch from the
        same checkpoint was set aside before: an abandoned history is never overwritten), so that none is
        taken for this run's best, latest or newest checkpoint. Returns the tags moved."""
        moved = []
        self._trainer_tags_on_disk = None
        target = None
        for info in self.tags():
            if info.iteration is None or info.iteration <= iteration:
                continue
            if target is None:
                target = self._new_folder(f"abandoned_after_{iteration}")
            for path in [*info.files.values(), *self._hashes_of(info.tag)]:
                self.storage.rename(str(path), str(target / path.name))
            moved.append(info.tag)
        if moved:
            self.storage.sync_folder(str(self.directory))
        if self.mirror is not None:
            self.mirror.set_aside_after(iteration, target.name if target is not None else f"abandoned_after_{iteration}")
        return moved

    def _new_folder(self, name: str) -> Path:
        for attempt in itertools.count(1):
            folder = self.directory / (name if attempt == 1 else f"{name}.{attempt}")
            try:
                self.storage.make_folder(str(folder))
                return folder
            except FileExistsError:
                continue
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------------------- commit (writer thread)
    def _link_staged(self, written: _Written, staged: Path, outcome: _SetOutcome) -> None:
        """Stage a second name of a committed file (a copy where there are no hard links)."""
        if not written.outcome.committed:
            raise CheckpointWriteError(
                f"could not write {staged.name}: its bytes were to be linked from {written.path.name}, which was not saved"
            )
        try:
            self.storage.link(str(written.path), str(staged))
        except OSError as error:
            self.storage.remove(str(staged))
            raise CheckpointWriteError(
                f"could not write {staged.name} as a link to {written.path.name}: {error.strerror or error}"
            ) from error
        outcome.digests[staged] = written.outcome.digests.get(written.path)

    def _commit_or_abort(
        self, tag: str, staged: list[tuple[Path, Path]], outcome: _SetOutcome, hashes: _Hashes | None = None
    ) -> None:
        """After every member's write: record the set's content hashes (`hashes`; a linked set brings its
        source's), make the set durable (one barrier for all its files) and move it into place, or, if a
        member is missing (its write failed and was reported), remove what was staged and keep the previous set."""
        missing = [final.name for final, staged_path in staged if not self._exists(staged_path)]
        if missing:
            self._discard(staged)
            raise CheckpointWriteError(f"checkpoint '{tag}' not saved ({', '.join(missing)} could not be written)")
        if hashes is not None:
            try:
                self._stage_hashes(tag, staged, outcome, hashes)
            except OSError as error:
                self._discard(staged)
                raise CheckpointWriteError(
                    f"checkpoint '{tag}' not saved ({hashes.final.name}: {error.strerror or error})"
                ) from error
        self.storage.make_durable([str(staged_path) for _, staged_path in staged if staged_path not in outcome.linked])
        self._commit(staged)
        outcome.committed = True
        if self.mirror is not None:
            self.mirror.committed([final for final, _ in staged])

    def _stage_hashes(self, tag: str, staged: list[tuple[Path, Path]], outcome: _SetOutcome, hashes: _Hashes) -> None:
        """Write the digest of every staged file (as the writer computed it while writing; a linked file's from
        its source; the files of a `.dcp` folder read once) into the set's hashes file, staged before the
        trainer state so that it is committed with the set."""
        writer = self._require_writer()
        digests: dict[str, str] = {}
        for final, staged_path in staged:
            key = _pattern(final.name, tag)
            if self.storage.is_folder(str(staged_path)):
                for name in self.storage.list(str(staged_path)):
                    with self.storage.open_read(str(staged_path / name)) as file:
                        digests[f"{key}/{name}"] = file_digest(file)
                continue
            digest = outcome.digests.pop(staged_path, None) or writer.pop_digest(staged_path)
            if digest is not None:
                digests[key] = digest
                outcome.digests[final] = digest
        content = json.dumps({"training_iteration": hashes.iteration.to_dict(), "xxh3_64": digests}, indent=1).encode()
        self.storage.write(str(hashes.staged), lambda file: file.write(content), durable=False, sync_folder=False)
        trainer_last = staged[-1][0].name.endswith(f"_trainer{SUFFIX}")
        staged.insert(len(staged) - trainer_last, (hashes.final, hashes.staged))

    def _discard(self, staged: list[tuple[Path, Path]]) -> None:
        for _, staged_path in staged:
            self.storage.remove(str(staged_path))

    def _commit(self, staged: list[tuple[Path, Path]], rename: Callable[[str, str], object] | None = None) -> None:
        """Rename the durable staged members over their final names in order (the trainer state last),
        then make the renames durable. `rename` is the writer's by default, which frees a replaced file
        after the commit."""
        rename = rename or self._require_writer().replace
        for final, staged_path in staged:
            if not self._exists(staged_path):  # an interrupted commit already moved it
                continue
            if self.storage.is_folder(str(staged_path)):
                self._replace_folder(staged_path, final)
            elif self.storage.same_file(str(staged_path), str(final)):
                self.storage.remove(str(staged_path))  # a link to the bytes already in place (a rename would leave both names)
            else:
                rename(str(staged_path), str(final))
        self.storage.sync_folder(str(staged[-1][0].parent))

    def _replace_folder(self, source: Path, final: Path) -> None:
        """A rename of folder `source` over `final`: a folder in the way is moved aside first (`recover`
        puts it back if the process stops before `source` takes its name) and removed after."""
        if not self._exists(final):
            self.storage.rename(str(source), str(final))
            return
        aside = source.with_name(source.name.removesuffix(STAGED) + REPLACED)
        self.storage.rename(str(final), str(aside))
        self.storage.rename(str(source), str(final))
        self.storage.sync_folder(str(final.parent))
        self.storage.remove(str(aside))

    def _write_sharded(self, folder: Path, payload: dict[str, Any], is_main: bool) -> None:
        """Every rank writes its shards of the state dict into `folder` (DCP returns once all shards and
        the metadata are written); then rank 0 adds the payload's other fields, which mark it complete."""
        dcp.save({"state_dict": payload["state_dict"]}, checkpoint_id=folder, no_dist=not distributed.is_distributed())
        if is_main:
            fields = {key: value for key, value in payload.items() if key != "state_dict"}
            self.storage.write(
                str(folder / SHARDED_FIELDS), lambda file: torch.save(fields, file), durable=True, sync_folder=True
            )

    # ----------------------------------------------------------------------------- reading
    def exists(self, member: Member, tag: str) -> bool:
        return self._exists(self.path(member, tag))

    def _exists(self, path: Path) -> bool:
        return self.storage.exists(str(path))

    def load(self, member: Member, tag: str, *, expected_iteration: TrainingIteration | None = None) -> dict[str, Any]:
        """The payload of one member, checked to be a checkpoint of this kind (and of `expected_iteration`).

        A `.dcp` folder is read whole (unsharded, on CPU): for one process without a process group.
        """
        path = self.path(member, tag)
        if path.suffix == SHARDED_SUFFIX:
            payload = self._read(path)
            payload["state_dict"] = _read_sharded(path)
        else:
            payload = load_checkpoint(path, self.storage.open_read)
        return self._checked(payload, path, member, tag, expected_iteration)

    def load_into(
        self, member: Member, tag: str, state_dict: dict[str, Any], *, expected_iteration: TrainingIteration | None = None
    ) -> dict[str, Any]:
        """The payload of one `.dcp` member, its state dict loaded in place into `state_dict` (whose
        tensors, sharded or not, say which part this process reads: any number of processes reads any
        folder). Every rank calls it."""
        path = self.path(member, tag)
        payload = self._read(path)
        try:
            dcp.load({"state_dict": state_dict}, checkpoint_id=path, no_dist=not distributed.is_distributed())
        except Exception as error:  # noqa: BLE001 - named as the checkpoint it concerns
            reason = one_line(error, 500)
            raise CheckpointLoadError(f"{path} does not fit this model: {reason}") from None
        payload["state_dict"] = state_dict
        return self._checked(payload, path, member, tag, expected_iteration)

    def _checked(
        self, payload: dict[str, Any], path: Path, member: Member, tag: str, expected_iteration: TrainingIteration | None
    ) -> dict[str, Any]:
        required = ("training_iteration",) if member.part == "trainer" else ("state_dict", "training_iteration")
        missing = [key for key in required if key not in payload]
        if missing:
            raise CheckpointLoadError(
                f"{path} is not {member.describe()} written by noether (no {', '.join(repr(k) for k in missing)})"
            )
        written_at = TrainingIteration.from_dict(payload["training_iteration"])
        if expected_iteration is not None and written_at != expected_iteration:
            raise CheckpointLoadError(
                f"{path} was written at {written_at} but the rest of checkpoint '{tag}' at {expected_iteration}; "
                "resume from another checkpoint"
            )
        return payload

    def written_at(self, member: Member, tag: str) -> TrainingIteration | None:
        """The training iteration stamped on one member, without reading its tensors."""
        with contextlib.suppress(CheckpointLoadError, KeyError, TypeError):
            return TrainingIteration.from_dict(self._read(self.path(member, tag))["training_iteration"])
        return None

    def iteration(self, tag: str) -> TrainingIteration:
        """The training iteration `tag` was written at (from its trainer state, else from any of its files)."""
        info = self.info(tag)
        if not info.files:
            known = ", ".join(other.tag for other in self.tags()) or "none"
            raise CheckpointLoadError(f"no checkpoint '{tag}' in {self.directory}; its checkpoints: {known}")
        if info.iteration is None:
            raise CheckpointLoadError(f"checkpoint '{tag}' in {self.directory} cannot be read: {info.problem}")
        return info.iteration

    def tags(self) -> list[CheckpointInfo]:
        """Every tag on disk, oldest iteration first (tags whose iteration cannot be read last)."""
        by_tag: dict[str, dict[Member, Path]] = {}
        for path in self._listing():
            parsed = Member.parse(path.name)
            if parsed is not None:
                by_tag.setdefault(parsed[1], {})[parsed[0]] = path
        infos = [self._describe(tag, files) for tag, files in by_tag.items()]
        return sorted(infos, key=lambda info: (info.iteration is None, info.iteration or TrainingIteration(), info.tag))

    def info(self, tag: str) -> CheckpointInfo:
        return self._describe(tag, self._members_on_disk(tag))

    def committed_sets(self) -> list[list[Path]]:
        """The files of every whole set on disk, each in commit order (members, hashes file, trainer state)."""
        sets = []
        for info in self.tags():
            has_trainer = any(member.part == "trainer" for member in info.files)
            if info.files and (info.complete or not has_trainer):
                ordered = sorted(info.files.items(), key=lambda item: item[0].part == "trainer")
                members = [path for member, path in ordered if member.part != "trainer"]
                trainer = [path for member, path in ordered if member.part == "trainer"]
                sets.append([*members, *self._hashes_of(info.tag), *trainer])
        return sets

    def content_check(self, tag: str) -> ContentCheck:
        """Every file of `tag` read once and hashed, against the digests recorded when the set was written."""
        check = ContentCheck()
        recorded, recorded_at = {}, None
        for hashes in self._hashes_of(tag)[:1]:
            try:
                content = self._read_hashes(hashes)
                recorded, recorded_at = dict(content["xxh3_64"]), TrainingIteration.from_dict(content["training_iteration"])
            except (CheckpointLoadError, KeyError, TypeError, ValueError):
                check.changed.append(f"{hashes.name} (unreadable)")
        for member, path in sorted(self._members_on_disk(tag).items(), key=lambda item: item[1].name):
            key = member.file_name(TAG_FIELD, sharded=path.suffix == SHARDED_SUFFIX)
            if self.storage.is_folder(str(path)):
                files = [(f"{key}/{name}", path / name) for name in self.storage.list(str(path))]
            else:
                files = [(key, path)]
            for key_of_file, file_path in files:
                expected = recorded.get(key_of_file)
                shown = str(file_path.relative_to(self.directory))
                if expected is None:
                    check.unhashed.append(shown)
                    continue
                with self.storage.open_read(str(file_path)) as file:
                    actual = file_digest(file)
                # a file that cannot be read or belongs to another save than the hashes is left to the loader and
                # the stamp checks, which say what is wrong with it (a weights-only set whose commit was cut short
                # holds files of two saves, each sound)
                if actual != expected and self.written_at(member, tag) == recorded_at:
                    check.changed.append(shown)
        return check

    def newest_resumable(self) -> CheckpointInfo | None:
        """The resumable tag of the latest training iteration (see `resumable_newest_first`)."""
        return next(iter(self.resumable_newest_first()), None)

    def resumable_newest_first(self) -> list[CheckpointInfo]:
        """The resumable tags, latest training iteration first. On a tie, a tag named by its iteration
        (periodic, interrupt, error) before `last` (saved after `after_training` logged its final values,
        which a continued run would log again) before `latest`."""
        preference = {"latest": 0, "last": 1}
        resumable = [info for info in self.tags() if info.resumable]
        return sorted(resumable, key=lambda info: (info.iteration, preference.get(info.tag, 2)), reverse=True)

    def refuse_if_changed(self, tag: str) -> None:
        """CheckpointLoadError naming the first file of `tag` whose bytes are not those written."""
        changed = self.content_check(tag).changed
        if changed:
            raise CheckpointLoadError(
                f"checkpoint '{tag}' is damaged: {self.directory / changed[0]} is not the file that was written (its content hash "
                "differs); use another checkpoint"
            )

    def staged_leftovers(self) -> list[Path]:
        """Files of sets that were being written or deleted when a process stopped."""
        return sorted(path for path in self._listing(hidden=True) if path.name.endswith((STAGED, DELETING)))

    def _describe(self, tag: str, files: dict[Member, Path]) -> CheckpointInfo:
        info = CheckpointInfo(tag=tag, files=files)
        if not files:
            info.problem = "no files"
            return info
        trainer = next((path for member, path in files.items() if member.part == "trainer"), None)
        if trainer is None:
            info.iteration = iteration_of_tag(tag)
            if info.iteration is None:
                with contextlib.suppress(CheckpointLoadError, KeyError, TypeError):
                    info.iteration = TrainingIteration.from_dict(self._read(next(iter(files.values())))["training_iteration"])
            return info
        try:
            state = self._read(trainer)
            info.iteration = TrainingIteration.from_dict(state["training_iteration"])
            listed = _set_files(state, tag)
        except (CheckpointLoadError, KeyError, TypeError) as error:
            info.problem = f"unreadable trainer state: {error}"
            return info
        missing = [name for name in listed if not self._exists(self.directory / name)]
        info.complete = not missing
        info.problem = f"missing {', '.join(missing)}" if missing else None
        info.resumable = info.complete and not state.get(NOT_RESUMABLE)
        return info

    def _read_hashes(self, path: Path) -> dict[str, Any]:
        try:
            with self.storage.open_read(str(path)) as file:
                content = json.load(file)
        except (OSError, ValueError) as error:
            raise CheckpointLoadError(f"cannot read {path}: {error}") from None
        if not isinstance(content, dict):
            raise CheckpointLoadError(f"{path} holds no hashes")
        return content

    def _hashes_of(self, tag: str) -> list[Path]:
        """Names are matched before paths are made: a run that keeps its sets has hundreds of files, and
        this runs for every `latest` and alias committed."""
        suffix = f"_cp={tag}{HASHES_SUFFIX}"
        names = self.storage.list(str(self.directory))
        return [self.directory / name for name in sorted(names) if name.endswith(suffix) and not name.startswith(".")]

    def _members_on_disk(self, tag: str) -> dict[Member, Path]:
        found = {}
        for path in self._listing():
            parsed = Member.parse(path.name)
            if parsed is not None and parsed[1] == tag:
                found[parsed[0]] = path
        return found

    def _listing(self, hidden: bool = False) -> list[Path]:
        return [self.directory / name for name in self.storage.list(str(self.directory)) if name.startswith(".") == hidden]

    def _read(self, path: Path) -> dict[str, Any]:
        """A checkpoint's small fields without reading its tensors (memory-mapped where the file is local;
        a folder's own file)."""
        if self.storage.is_folder(str(path)):
            path = path / SHARDED_FIELDS
        local = self.storage.local_path(str(path))
        try:
            if local is None:
                raise CheckpointLoadError("not a local file")  # read whole, below
            payload = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - load_checkpoint names what is wrong
            payload = load_checkpoint(path, self.storage.open_read)
        if not isinstance(payload, dict):
            raise CheckpointLoadError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
        return payload


# --------------------------------------------------------------------------------- commit
def _staged_path(path: Path, set_id: str) -> Path:
    return path.with_name(f".{path.name}~{set_id}{STAGED}")


class _SetOutcome:
    """A set's staged links (already durable: the commit's barrier skips them), whether it was committed
    (set on the writer thread, read by the links to its files queued after it), and the digests of its files
    (of staged links until the commit, then of its committed files, by path)."""

    def __init__(self) -> None:
        self.linked: set[Path] = set()
        self.committed = False
        self.digests: dict[Path, str | None] = {}


@dataclass(frozen=True)
class _Hashes:
    """Where a set's hashes file goes, and the iteration it records."""

    iteration: TrainingIteration
    final: Path
    staged: Path


def _hashes_name(model_name: str, tag: str) -> str:
    return f"{model_name}_cp={tag}{HASHES_SUFFIX}"


def _pattern(file_name: str, tag: str) -> str:
    """A member's file name with its tag replaced by TAG_FIELD, as hashes and trainer states name files."""
    parsed = Member.parse(file_name)
    assert parsed is not None and parsed[1] == tag, file_name
    return parsed[0].file_name(TAG_FIELD, sharded=file_name.endswith(SHARDED_SUFFIX))


@dataclass(frozen=True)
class _Written:
    """A member's file as this store last wrote it."""

    iteration: TrainingIteration
    fingerprint: Any
    path: Path
    outcome: _SetOutcome


def _fingerprint(payload: Any) -> Any:
    """What tells two payloads hold the same bytes without reading them: their plain values and, for
    each tensor, its memory, layout and version counter (which every in-place change bumps)."""
    if isinstance(payload, dict):
        return tuple((key, _fingerprint(value)) for key, value in payload.items())
    if isinstance(payload, (list, tuple)):
        return type(payload), tuple(_fingerprint(value) for value in payload)
    if isinstance(payload, torch.Tensor):
        if payload.is_inference():
            return object()  # no version counter: never taken for the same bytes
        return payload.data_ptr(), payload.shape, payload.stride(), payload.dtype, payload.device, payload._version
    if payload is None or type(payload) in (bool, int, float, str, bytes):
        return payload
    return object()  # anything else (an array, an object) is never taken for the same bytes


def _read_sharded(folder: Path) -> dict[str, Any]:
    """The whole state dict of a `.dcp` folder in this process (no process group needed)."""
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process", which is the point
            warnings.simplefilter("ignore", UserWarning)
            return _load_state_dict_from_keys(checkpoint_id=folder)["state_dict"]
    except Exception as error:  # noqa: BLE001 - named as the checkpoint it concerns
        raise CheckpointLoadError(f"cannot read sharded checkpoint {folder}: {one_line(error, 500)}") from None


def _set_files(trainer_state: dict[str, Any], tag: str) -> list[str]:
    """The files of the set a trainer state belongs to, under `tag` (older states list plain names)."""
    return [name.replace(TAG_FIELD, tag) for name in trainer_state["files"]]
