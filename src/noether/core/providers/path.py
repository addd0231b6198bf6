"""Where a run's files live (layout fixed by SPEC.md)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from noether.core.config import ConfigError
from noether.core.storage import sync_directory

RUN_MARKER = "config.yaml"
"""The file that makes a directory a run directory: written when a run starts, before its first checkpoint."""


def metric_tag(metric_key: str) -> str:
    """A metric key as it appears in file names and log prefixes: `loss/val/total` -> `loss.val.total`."""
    return metric_key.replace("/", ".")


class PathProvider:
    def __init__(self, output_path: Path | str, run_id: str) -> None:
        _refuse_nul("output_path", str(output_path))
        _refuse_nul("run_id", run_id)
        self.output_path = Path(output_path)
        self.run_id = run_id
        self.remote_url: str | None = None
        """The run's home in an object store (`{output_path}/{run_id}`); its run directory is then the local cache."""

    @staticmethod
    def new_run_id() -> str:
        """Sortable by start time, unique across concurrent starts."""
        return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"

    @classmethod
    def for_existing_run(cls, run: str | Path, output_path: Path | str) -> PathProvider:
        """`run` is the id of a run under `output_path` or a run directory. Only a directory that holds a run
        (its config.yaml) is taken: a folder of the working directory that happens to share a run's name is
        never written into. A bare id looks under `output_path` first."""
        _refuse_nul("run", str(run))
        candidates = [Path(output_path) / str(run), Path(run)] if _is_bare_id(run) else [Path(run)]
        for candidate in candidates:
            if is_run_directory(candidate):
                return cls(candidate.parent, candidate.name)
        existing = next((candidate for candidate in candidates if candidate.exists()), None)
        if existing is not None:
            raise FileNotFoundError(
                f"{existing} is not a run directory (it has no {RUN_MARKER}); "
                f"name a run id under {output_path} or the directory of a run"
            )
        raise FileNotFoundError(f"unknown run '{run}': neither a directory nor a run id under {output_path}")

    @property
    def location(self) -> str:
        """Where the run lives, as users name it: its URL or its directory."""
        return self.remote_url or str(self.run_dir)

    @property
    def run_dir(self) -> Path:
        return self.output_path / self.run_id

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def config_file(self) -> Path:
        return self.run_dir / RUN_MARKER

    @property
    def log_file(self) -> Path:
        return self.run_dir / "log.txt"

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.run_dir / "summary.json"

    def create(self) -> None:
        """Create the run directory and its checkpoints/ folder. The directories this creates are made durable
        once, with their entries in their parents: after a power loss the run's later files are not orphaned."""
        created = _missing_directories(self.checkpoint_dir)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if created:
            for directory in created:
                sync_directory(directory)
            sync_directory(created[-1].parent)


def is_run_directory(path: Path) -> bool:
    return (path / RUN_MARKER).is_file()


def _is_bare_id(run: str | Path) -> bool:
    """A run id rather than a path: one directory name, neither `.` nor `..`."""
    text = str(run)
    return Path(text).name == text and text not in (".", "..")


def _missing_directories(directory: Path) -> list[Path]:
    """`directory` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _refuse_nul(what: str, value: str) -> None:
    if "\0" in value:
        raise ConfigError(f"{what}: {value!r} contains a NUL byte, which no file name can hold; pick another {what}")
