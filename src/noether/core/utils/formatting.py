"""Text for people: sizes and one-line error reasons, written one way everywhere."""

from __future__ import annotations

import os
from pathlib import Path


def format_bytes(size: float) -> str:
    """`1.5 MB`: decimal units, one decimal."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{size:.1f} {unit}"


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """An error's message on one line (libraries' messages span several), cut to `limit` characters."""
    text = " ".join(str(error).split())
    return text if limit is None else text[:limit]


def path_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder; 0 for what is gone."""
    path = Path(path)
    if path.is_dir():
        return sum(path_size(child) for child in path.iterdir())
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
