"""`noether-ckpt`: what checkpoints a run has, whether they are sound, and its weights in a standard format.

Everything goes through the run's CheckpointStore (tags, members, loading); this module only
decides what to show and how to write it out.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from noether.core.checkpoint_store import (
    STAGED,
    CheckpointInfo,
    CheckpointStore,
    Member,
    iteration_of_tag,
)
from noether.core.config import load_yaml
from noether.core.object_storage import fetch_run, is_url
from noether.core.providers.path import PathProvider, metric_tag
from noether.core.storage import HOST, process_alive, sync_directory
from noether.core.utils.formatting import format_bytes, path_size
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError

PART_NAMES = {"model": "weights", "optim": "optimizer", "trainer": "trainer"}
EXPORT_STAGING = re.compile(r"^\.(?P<name>.+)~export~(?P<host>[^~]+)~(?P<pid>\d+)\.tmp$")
"""`.{file}~export~{host}~{pid}.tmp/`: the folder an export writes in before its file is renamed into place."""


class RunToolError(Exception):
    """A bad argument to a run tool (EMA factor, model name, output file)."""


def open_run(run: str, output_path: str | Path) -> tuple[PathProvider, CheckpointStore]:
    """A run on disk, or a run in an object store (a URL, or an id under a URL `output_path`), downloaded
    whole into a temporary folder that goes when the process ends: the tools then read the bucket's bytes."""
    url = run if is_url(run) else f"{str(output_path).rstrip('/')}/{run}" if is_url(output_path) else None
    if url is not None:
        folder = tempfile.mkdtemp(prefix="noether-run-")
        atexit.register(shutil.rmtree, folder, True)
        run = str(fetch_run(url, Path(folder)))
    paths = PathProvider.for_existing_run(run, output_path)
    paths.remote_url = url
    return paths, CheckpointStore(paths.checkpoint_dir, paths.run_id)


# --------------------------------------------------------------------------------- list
def list_checkpoints(paths: PathProvider, store: CheckpointStore) -> list[str]:
    """A header, one line per tag (oldest first) with the value of each best-checkpoint metric at its
    iteration where metrics.jsonl has one, then one line per staged leftover."""
    metrics = best_metric_keys(paths)
    rows = metric_rows(paths.metrics_file)
    infos = store.tags()
    kept = kept_by_retention(paths, store)
    table = [["tag", "iteration", "files", "size", "state", *metrics]] if infos else []
    for info in infos:
        iteration = "?" if info.iteration is None else str(info.iteration)
        values = [_format_value(value_at(rows, key, info.iteration)) for key in metrics]
        size = format_bytes(info.size)
        state = state_of(info) + (f", {kept[info.tag]}" if info.tag in kept else "")
        table.append([info.tag, iteration, describe_files(info), size, state, *values])
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))] if table else []
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    committing = {path for commit in interrupted_commits(store) for path in commit.staged}
    for leftover in store.staged_leftovers():
        if leftover in committing:
            size = format_bytes(path_size(leftover))
            lines.append(f"{leftover.name}  {size}  staged by an interrupted commit (the next run completes it)")
            continue
        what = "staged, never committed" if leftover.name.endswith(STAGED) else "left by an interrupted deletion"
        lines.append(f"{leftover.name}  {format_bytes(path_size(leftover))}  not usable: {what} (the next run removes it)")
    return lines


def _format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def state_of(info: CheckpointInfo) -> str:
    if info.problem is not None:
        return f"INCOMPLETE, not usable: {info.problem}"
    return "resumable" if info.resumable else "weights only"


def describe_files(info: CheckpointInfo) -> str:
    """`classifier[weights,optimizer,trainer state,ema=0.9]`: what each model has under the tag."""
    by_model: dict[str, list[str]] = {}
    for member in sorted(info.files, key=lambda m: (m.model_name, m.ema_factor is not None, m.ema_factor or 0, m.part)):
        name = PART_NAMES[member.part] if member.ema_factor is None else f"ema={member.ema_factor}"
        by_model.setdefault(member.model_name, []).append(name)
    return " ".join(f"{model}[{','.join(parts)}]" for model, parts in by_model.items())


def best_callback_configs(paths: PathProvider) -> list[dict[str, Any]]:
    """The run's BestCheckpointCallback entries from its resolved config.yaml (none when it has no config)."""
    if not paths.config_file.exists():
        return []
    callbacks = (load_yaml(paths.config_file).get("trainer") or {}).get("callbacks") or []
    return [entry for entry in callbacks if str(entry.get("kind", "")).endswith("BestCheckpointCallback")]


def kept_by_retention(paths: PathProvider, store: CheckpointStore) -> dict[str, str]:
    """Tags kept on purpose: top-k best models (`best_model.{metric}.{E.._U.._S..}`, by name) and the
    milestones the newest resumable set's CheckpointCallback states list."""
    kept = {}
    prefixes = [
        f"best_model.{metric_tag(entry['metric_key'])}." for entry in best_callback_configs(paths) if entry.get("save_top_k")
    ]
    for info in store.tags():
        for prefix in prefixes:
            rest = info.tag.removeprefix(prefix)
            if rest != info.tag and "." not in rest and iteration_of_tag(rest) is not None:
                kept[info.tag] = "top-k"
    newest = store.newest_resumable()
    trainer = next((member for member in newest.files if member.part == "trainer"), None) if newest else None
    if trainer is not None:
        try:
            states = store.load(trainer, newest.tag).get("callbacks") or [{}]
        except (CheckpointLoadError, OSError):  # marks nothing; `verify` names the damage
            states = [{}]
        for state in states[0].values():
            if isinstance(state, dict):
                kept.update((tag, "milestone") for tag in state.get("milestones", []))
    return kept


def best_metric_keys(paths: PathProvider) -> list[str]:
    return list(dict.fromkeys(entry["metric_key"] for entry in best_callback_configs(paths)))


def metric_rows(metrics_file: Path) -> list[dict[str, float]]:
    """metrics.jsonl as dicts; a torn last line (a run still writing, or killed) is skipped."""
    if not metrics_file.exists():
        return []
    rows = []
    for line in metrics_file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def value_at(rows: list[dict[str, float]], key: str, iteration: TrainingIteration | None) -> float | None:
    if iteration is None:
        return None
    matching = [row[key] for row in rows if key in row and row.get("update") == iteration.update]
    return matching[-1] if matching else None


# --------------------------------------------------------------------------------- verify
@dataclass
class InterruptedCommit:
    """A set whose commit a stop interrupted: some files already under their final names, the rest (the
    trainer state last) still staged. Not damage: the next start (`CheckpointStore.recover`) completes it."""

    tag: str
    iteration: TrainingIteration
    final_names: set[str]
    staged: set[Path]

    def describe(self) -> str:
        files = len(self.final_names)
        moved = files - len(self.staged)
        return (
            f"{self.tag}: interrupted commit of the set of {self.iteration} ({moved} of {files} files moved into place, "
            "the rest staged): the next start of the run completes it"
        )


def verify_checkpoints(store: CheckpointStore) -> tuple[list[str], list[str], list[InterruptedCommit]]:
    """(one line per bad file or incomplete tag, one line per file without a content hash or staged leftover,
    the interrupted commits).

    The files of a set whose commit was interrupted disagree with the previous set under that tag until
    the next start completes it: they are reported as that interrupted commit, not as bad files."""
    interrupted = interrupted_commits(store)
    in_commit = {(commit.tag, name) for commit in interrupted for name in commit.final_names}
    problems: list[str] = []
    unhashed: list[str] = []
    for info in store.tags():
        committing = any((info.tag, path.name) in in_commit for path in info.files.values())
        if info.problem is not None and not committing:
            problems.append(f"{info.tag}: incomplete checkpoint ({info.problem})")
        stamps: dict[Member, dict[str, Any]] = {}
        for member, path in sorted(info.files.items(), key=lambda item: item[1].name):
            try:
                payload = store.load(member, info.tag)
            except CheckpointLoadError as error:
                reason = _one_line(str(error)).replace(f": {path}", "").replace(str(path), "it")
                problems.append(f"{path.name}: {reason}")
                continue
            stamps[member] = {key: payload.get(key) for key in ("checkpoint_tag", "training_iteration", "run_id")}
        # files of an interrupted commit disagree with the rest of their tag until the next start completes it
        settled = {member: stamp for member, stamp in stamps.items() if (info.tag, info.files[member].name) not in in_commit}
        problems.extend(_stamp_disagreements(info, settled))
        if not committing:
            content = store.content_check(info.tag)
            problems.extend(f"{name}: its bytes changed since it was written (content hash differs)" for name in content.changed)
            unhashed.extend(f"{name}: no hash (written before content hashes were recorded), loads" for name in content.unhashed)
    staged_by_commits = {path for commit in interrupted for path in commit.staged}
    leftovers = [
        f"{path.name}: staged leftover of an unfinished save or deletion, not a checkpoint"
        for path in store.staged_leftovers()
        if path not in staged_by_commits
    ]
    return problems, [*unhashed, *leftovers], interrupted


def interrupted_commits(store: CheckpointStore) -> list[InterruptedCommit]:
    """The staged sets that `recover` would complete (decided without doing it: a run tool never writes
    into the run)."""
    return [
        InterruptedCommit(staged.tag, staged.iteration, {final.name for final, _ in staged.files}, set(staged.still_staged))
        for staged in store.interrupted_commits()
    ]


def _stamp_disagreements(info: CheckpointInfo, stamps: dict[Member, dict[str, Any]]) -> list[str]:
    """Files of one tag must be stamped with one iteration (the one a periodic tag names) and one run id;
    the trainer state (else the majority) is the reference. The stamped tag may be another one: the store
    writes the bytes of one iteration once and links them under the other tags (latest, tolerances)."""
    reference = next((stamp for member, stamp in stamps.items() if member.part == "trainer"), None)
    if reference is None and stamps:
        common = Counter(json.dumps(stamp, sort_keys=True) for stamp in stamps.values()).most_common(1)[0][0]
        reference = json.loads(common)
    named_iteration = iteration_of_tag(info.tag)
    problems = []
    for member, stamp in stamps.items():
        path_name = info.files[member].name
        iteration = _iteration(stamp["training_iteration"])
        if named_iteration is not None and iteration != named_iteration:
            problems.append(f"{path_name}: stamps disagree: written at {iteration}, but its tag names {named_iteration}")
        elif stamp["training_iteration"] != reference["training_iteration"]:
            problems.append(
                f"{path_name}: stamps disagree: written at {iteration}, the rest of '{info.tag}' at "
                f"{_iteration(reference['training_iteration'])}"
            )
        elif stamp["run_id"] != reference["run_id"]:
            problems.append(
                f"{path_name}: stamps disagree: written by run '{stamp['run_id']}', "
                f"the rest of '{info.tag}' by '{reference['run_id']}'"
            )
    return problems


def _iteration(stamped: Any) -> TrainingIteration | str:
    try:
        return TrainingIteration.from_dict(stamped)
    except (KeyError, TypeError, ValueError):
        return repr(stamped)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------- export
def export_weights(
    paths: PathProvider, store: CheckpointStore, tag: str, output: Path, *, ema: str | None = None, model: str | None = None
) -> str:
    """Write the weights of `tag` (EMA `ema`, submodel `model`) to `output`; returns a one-line summary."""
    _check_output_file(output)
    iteration = store.iteration(tag)  # names the known tags when `tag` is not one
    info = store.info(tag)
    factor = _ema_factor(ema)
    weights = {m: p for m, p in info.files.items() if m.part == "model"}
    chosen = [m for m in weights if m.ema_factor == factor]
    if not chosen:
        factors = sorted({m.ema_factor for m in weights if m.ema_factor is not None})
        have = f"EMA factors: {', '.join(map(str, factors))}" if factors else "no EMA weights"
        what = "weights" if factor is None else f"EMA {ema} weights"
        raise RunToolError(f"checkpoint '{tag}' has no {what} ({have})")
    root = _root_model_name(store, chosen)
    selected, name = _select_model(chosen, root, model)
    state_dict: dict[str, torch.Tensor] = {}
    stamped_run_id = None
    for member in selected:
        payload = store.load(member, tag)
        stamped_run_id = payload.get("run_id", stamped_run_id)
        prefix = "" if member.model_name == name else member.model_name[len(name) + 1 :] + "."
        state_dict.update({prefix + key: value for key, value in payload["state_dict"].items()})
    if output.suffix == ".pt":
        _write_atomically(output, lambda path: _save_pt(state_dict, path))
    else:
        metadata = {
            "checkpoint_tag": tag,
            "training_iteration": str(iteration),
            "run_id": str(stamped_run_id or paths.run_id),
            "model_name": name,
        }
        if factor is not None:
            metadata["ema_factor"] = str(factor)
        _write_atomically(output, lambda path: _save_safetensors(state_dict, path, metadata))
    return f"wrote {len(state_dict)} tensors of {name}{'' if factor is None else f' (EMA {factor})'} at {iteration} to {output}"


def _check_output_file(output: Path) -> None:
    """Refuse, before anything is loaded, an output that cannot become the exported file."""
    if output.suffix not in (".safetensors", ".pt"):
        raise RunToolError(f"--output must end in .safetensors or .pt, got '{output.name}'")
    if output.is_dir():
        raise RunToolError(f"--output {output} is a directory; name a file in it, e.g. {output / ('weights' + output.suffix)}")
    if not output.parent.is_dir():
        what = "is not a directory" if output.parent.exists() else "does not exist"
        raise RunToolError(f"--output {output}: {output.parent} {what}; create that directory first or name another one")


def _write_atomically(output: Path, write: Callable[[Path], None]) -> None:
    """`write` the file in a private folder next to `output`, fsync it and rename it over `output`: a stopped
    export leaves the previous `output` as it was. The folder of an export that was killed is named for its
    process, and removed by the next export into that directory."""
    directory = output.parent
    staging = directory / f".{output.name}~export~{HOST}~{os.getpid()}.tmp"
    try:
        _remove_stale_staging(directory)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        staged = staging / output.name
        write(staged)
        with open(staged, "rb") as file:
            os.fsync(file.fileno())
        os.replace(staged, output)
        sync_directory(directory)
    except OSError as error:
        raise RunToolError(f"cannot write {output}: {error.strerror or error}; export into a writable directory") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(directory: Path) -> None:
    """Staging folders of exports into `directory` killed on this host (their process is gone)."""
    for entry in os.scandir(directory):
        match = EXPORT_STAGING.match(entry.name)
        if match and match["host"] == HOST and not process_alive(int(match["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)


def _save_pt(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "wb") as file:  # a file object: a failed write is an OSError, not torch's RuntimeError
        torch.save(state_dict, file)


def _ema_factor(ema: str | None) -> float | None:
    if ema is None:
        return None
    try:
        return float(ema)
    except ValueError:
        raise RunToolError(f"--ema must be an EMA factor such as 0.999, got '{ema}'") from None


def _root_model_name(store: CheckpointStore, members: list[Member]) -> str:
    """The whole model's name: the one the trainer states are saved under, else the members' common dotted prefix."""
    names = [m.model_name for m in members]
    for info in store.tags():
        trainer = next((m.model_name for m in info.files if m.part == "trainer"), None)
        if trainer is not None and all(n == trainer or n.startswith(trainer + ".") for n in names):
            return trainer
    common = names[0].split(".")
    for name in names[1:]:
        parts = name.split(".")
        length = next((i for i, (a, b) in enumerate(zip(common, parts)) if a != b), min(len(common), len(parts)))
        common = common[:length]
    return ".".join(common)


def _select_model(members: list[Member], root: str, model: str | None) -> tuple[list[Member], str]:
    """The members of `model` (a full or short submodel name; default the whole model) and its full name."""
    if model is None or model == root:
        return sorted(members, key=lambda m: m.model_name), root
    for member in members:
        if member.model_name in (model, f"{root}.{model}"):
            return [member], member.model_name
    names = ", ".join(sorted(m.model_name for m in members))
    raise RunToolError(f"no model '{model}' in this checkpoint; its models: {names}")


def _save_safetensors(state_dict: dict[str, torch.Tensor], output: Path, metadata: dict[str, str]) -> None:
    """safetensors holds each tensor once, contiguous and unshared: tied weights (one storage under
    several keys) and views are written as copies of their values, and the tied keys are recorded
    in the metadata (`tied_keys`) so that a loader can tie them again."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    views: dict[tuple, list[str]] = {}  # keys by the exact tensor they hold
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise RunToolError(
                f"state_dict entry '{key}' is a {type(value).__name__}, which safetensors cannot hold; export as .pt"
            )
        if value.numel() > 0:
            views.setdefault((value.data_ptr(), value.dtype, tuple(value.shape), value.stride()), []).append(key)
        owns_storage = value.is_contiguous() and value.storage_offset() == 0 and value.nbytes == value.untyped_storage().nbytes()
        tensors[key] = value if owns_storage else value.contiguous().clone()
    written: set[int] = set()
    for key, value in tensors.items():
        if value.nbytes > 0 and value.untyped_storage().data_ptr() in written:
            tensors[key] = value.clone()
        written.add(value.untyped_storage().data_ptr())
    tied = [keys for keys in views.values() if len(keys) > 1]
    if tied:
        metadata = {**metadata, "tied_keys": json.dumps(tied)}
    try:
        save_file(tensors, str(output), metadata=metadata)
    except SafetensorError as error:
        raise OSError(_one_line(str(error))) from None
