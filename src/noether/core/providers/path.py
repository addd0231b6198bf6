"""Where a run's files live (layout fixed by SPEC.md)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path


def metric_tag(metric_key: str) -> str:
    """A metric key as it appears in file names and log prefixes: `loss/val/total` -> `loss.val.total`."""
    return metric_key.replace("/", ".")


class PathProvider:
    def __init__(self, output_path: Path | str, run_id: str) -> None:
        self.output_path = Path(output_path)
        self.run_id = run_id

    @staticmethod
    def new_run_id() -> str:
        """Sortable by start time, unique across concurrent starts."""
        return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"

    @classmethod
    def for_existing_run(cls, run: str | Path, output_path: Path | str) -> PathProvider:
        """`run` is a run directory or the id of a run under `output_path`."""
        run_path = Path(run)
        if not run_path.is_dir():
            run_path = Path(output_path) / str(run)
        if not run_path.is_dir():
            raise FileNotFoundError(f"unknown run '{run}': neither a directory nor a run id under {output_path}")
        return cls(run_path.parent, run_path.name)

    @property
    def run_dir(self) -> Path:
        return self.output_path / self.run_id

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def config_file(self) -> Path:
        return self.run_dir / "config.yaml"

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
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
