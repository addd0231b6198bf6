"""Metric logging: a cache of the current step's values, flushed to metrics.jsonl, summary.json and the console."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from noether.core.trackers.active import ActiveTrackers
from noether.core.trackers.base import Tracker
from noether.core.utils.training.counter import UpdateCounter

logger = logging.getLogger("noether.metrics")
ITERATION_KEYS = ("epoch", "update", "sample")
SUMMARY_EVERY_SECONDS = 10.0
"""summary.json is rewritten at most this often (and on close): a rewrite per logged step cost more
than the step's other logging, and after a crash the summary is recomputed from metrics.jsonl."""


class LogWriteError(Exception):
    """metrics.jsonl, summary.json or log.txt could not be written (a full disk, say): the run stops with this one line."""


@contextlib.contextmanager
def _failure_reported(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise LogWriteError(f"could not write {path}: {error.strerror or error}") from None


class LogFileHandler(logging.FileHandler):
    """log.txt: a failed write raises LogWriteError from the logging call, instead of logging's printed tracebacks.

    A failure while an earlier error is already being handled (the run winding down) is dropped, so
    that the first failure is the one reported.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if error is None or error.__context__ is not None:
            return
        raise LogWriteError(f"could not write {self.baseFilename}: {getattr(error, 'strerror', None) or error}") from None


class LogWriter:
    """Collects scalars for the current step; callbacks later in the same step can read `log_cache`.

    Values may be tensors: they are converted to floats only at flush, so logging a loss does not
    force a device sync on every update. metrics.jsonl gets every flushed step at once, summary.json
    (the newest value of each key) every `SUMMARY_EVERY_SECONDS` and on `close`.
    """

    def __init__(
        self, metrics_file: Path, summary_file: Path, is_main_process: bool = True, trackers: Sequence[Tracker] = ()
    ) -> None:
        self.metrics_file = metrics_file
        self.summary_file = summary_file
        self.is_main_process = is_main_process
        self.trackers = ActiveTrackers(trackers)
        self.log_cache: dict[str, Any] = {}
        self.summary: dict[str, float] = {}
        self.rows_written = 0
        """Lines in metrics.jsonl; a checkpoint records it, so a resume can cut back to it."""
        self._summary_written_at: float | None = None  # time.monotonic() of the last rewrite
        self._summary_pending = False
        if is_main_process and summary_file.exists():
            self.summary = self._read_summary()
        if is_main_process and metrics_file.exists():
            with metrics_file.open("rb") as file:
                self.rows_written = sum(1 for _ in file)

    def add_scalar(self, key: str, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.log_cache[key] = value

    def with_prefix(self, prefix: str) -> PrefixedLogWriter:
        return PrefixedLogWriter(self, prefix)

    def discard_step(self) -> None:
        """Forget what this step logged (its hooks run again on resume and log it then)."""
        self.log_cache.clear()

    def flush(self, update_counter: UpdateCounter) -> dict[str, float]:
        """Write the cached values as one metrics.jsonl line and clear the cache."""
        if not self.log_cache:
            return {}
        values = {key: float(value) for key, value in self.log_cache.items()}
        self.log_cache.clear()
        if self.is_main_process:
            record = {**update_counter.cur_iteration.to_dict(), **values}
            with _failure_reported(self.metrics_file), self.metrics_file.open("a") as file:
                file.write(json.dumps(record) + "\n")
            self.rows_written += 1
            self.trackers.log(record)
            self.summary.update(values)
            self._summary_pending = True
            if self._summary_written_at is None or time.monotonic() - self._summary_written_at >= SUMMARY_EVERY_SECONDS:
                self._write_summary()
            text = " ".join(f"{key}={_format(value)}" for key, value in values.items())
            logger.info(f"{update_counter.cur_iteration} {text}")
        return values

    def keep_first_rows(self, rows: int) -> None:
        """Cut metrics.jsonl back to its first `rows` lines and summary.json to what they say: what a
        stopped run logged after its checkpoint (or a line torn by a crash) must not be logged twice."""
        if not self.is_main_process or not self.metrics_file.exists():
            return
        with self.metrics_file.open("rb") as file:
            kept = [line for _, line in zip(range(rows), file)]
        if len(kept) == rows and kept and not kept[-1].endswith(b"\n"):
            kept.pop()  # a torn last line
        _replace_durably(self.metrics_file, b"".join(kept), ".jsonl.tmp")
        self.rows_written = len(kept)
        self.summary = _last_values(kept)
        self._write_summary()

    def resumed_at(self, update: int) -> None:
        """metrics.jsonl was cut back to the checkpoint at `update`: the trackers are told before their first row."""
        self.trackers.resume_at(update)

    def close(self) -> None:
        try:
            if self._summary_pending:
                self._write_summary()
        finally:
            self.trackers.close()

    def _write_summary(self) -> None:
        if self.is_main_process:
            with _failure_reported(self.summary_file):
                _replace_durably(self.summary_file, json.dumps(self.summary, indent=2, sort_keys=True).encode(), ".json.tmp")
            self._summary_written_at, self._summary_pending = time.monotonic(), False

    def _read_summary(self) -> dict[str, float]:
        """summary.json, or, where it does not parse (emptied or torn by a power loss), what metrics.jsonl says:
        the summary is derived data, rebuilt rather than fatal."""
        try:
            summary = json.loads(self.summary_file.read_bytes())
        except (OSError, ValueError):
            summary = None
        if isinstance(summary, dict):
            return summary
        lines = self.metrics_file.read_bytes().splitlines() if self.metrics_file.exists() else []
        logger.warning(f"{self.summary_file} does not parse; rebuilt it from the {len(lines)} rows of {self.metrics_file.name}")
        self.summary = _last_values(lines)
        self._write_summary()
        return self.summary


class PrefixedLogWriter:
    """A view of a LogWriter that puts `prefix` before every key (for nested callbacks)."""

    def __init__(self, parent: LogWriter | PrefixedLogWriter, prefix: str) -> None:
        self.parent = parent
        self.prefix = prefix

    @property
    def log_cache(self) -> dict[str, Any]:
        return self.parent.log_cache

    def add_scalar(self, key: str, value: float | torch.Tensor) -> None:
        self.parent.add_scalar(self.prefix + key, value)

    def with_prefix(self, prefix: str) -> PrefixedLogWriter:
        return PrefixedLogWriter(self, prefix)


def _last_values(lines: Sequence[bytes]) -> dict[str, float]:
    """The newest value of every metric in these metrics.jsonl lines (a torn line is skipped)."""
    summary: dict[str, float] = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            summary.update({key: value for key, value in row.items() if key not in ITERATION_KEYS})
    return summary


def _replace_durably(path: Path, data: bytes, temporary_suffix: str) -> None:
    """Write `data` under a temporary name next to `path`, fsync it, and rename it over `path`: after a power
    loss `path` holds the old or the new bytes, never an empty or torn file."""
    temporary = path.with_suffix(temporary_suffix)
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


def _format(value: float) -> str:
    if math.isnan(value) or math.isinf(value) or value == int(value):
        return str(value)
    return f"{value:.6g}"
