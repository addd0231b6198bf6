"""Where a test finds a checkpoint file: asked of the CheckpointStore, which alone knows the layout."""

from __future__ import annotations

from pathlib import Path

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.providers.path import PathProvider


def checkpoint_path(paths: PathProvider, model_name: str, tag: str, part: str, ema_factor: float | None = None) -> Path:
    return CheckpointStore(paths.checkpoint_dir, paths.run_id).path(Member(model_name, part, ema_factor), tag)  # type: ignore[arg-type]
