"""Reads W&B offline runs back: the records of `{dir}/wandb/offline-run-*/run-*.wandb`.

The file is W&B's transaction log: a 7-byte header (`:W&B`, magic, version), then LevelDB-style
log blocks of 32 KiB whose chunks (checksum, length, type) carry wandb's own protobuf `Record`s.
The installed wandb has no reader of its own for it, so this one decodes the framing and hands
every record to wandb's protobuf classes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER_SIZE = 7
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # checksum, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """One start of a W&B run: its run record and the history rows it logged, W&B's `_` keys left out."""

    folder: Path
    run: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    step_metrics: dict[str, str] = field(default_factory=dict)


def read_records(path: Path) -> list[Any]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    records, pending, position = [], b"", HEADER_SIZE
    while position + CHUNK_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, chunk_type = CHUNK_HEADER.unpack_from(data, position)
        if chunk_type == 0:  # zeros: the end of what was written
            break
        start = position + CHUNK_HEADER.size
        pending += data[start : start + length]
        position = start + length
        if chunk_type in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline start under `{run_dir}/wandb`, oldest first."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log_file,) = folder.glob("run-*.wandb")
        offline_run = OfflineRun(folder)
        for record in read_records(log_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                offline_run.run = record.run
            elif kind == "metric" and record.metric.step_metric:
                offline_run.step_metrics[record.metric.glob_name or record.metric.name] = record.metric.step_metric
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                offline_run.history.append({key: value for key, value in row.items() if not key.startswith("_")})
        runs.append(offline_run)
    return runs
