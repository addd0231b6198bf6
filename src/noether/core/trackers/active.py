"""Hands every metrics row to the run's trackers and switches off the ones that fail."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

from noether.core.trackers.base import Tracker

logger = logging.getLogger("noether.trackers")


class ActiveTrackers:
    """The trackers still working. They start on the first row, so that a resume can tell them
    first where it continues; one that raises (server unreachable, its disk full) is dropped with
    one warning, because training and metrics.jsonl, the record of the run, must go on."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)
        self.resumed_update: int | None = None
        self.started = False

    def resume_at(self, update: int) -> None:
        """The run continues from a checkpoint at `update`: trackers drop or note what the stopped run logged after it."""
        self.resumed_update = update

    def log(self, row: dict[str, float]) -> None:
        """A metrics.jsonl row: `update` is the step, every other key a value (`epoch` and `sample` included)."""
        if not self.trackers:
            return
        if not self.started:
            self.started = True
            self._each("start", lambda tracker: tracker.start(self.resumed_update))
        step = int(row["update"])
        values = {key: value for key, value in row.items() if key != "update"}
        self._each("log", lambda tracker: tracker.log(step, values))

    def close(self) -> None:
        if self.started:
            self._each("close", lambda tracker: tracker.close())
        self.trackers = []

    def _each(self, action: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 - any failure of a tracker only switches it off
                self.trackers.remove(tracker)
                logger.warning(
                    f"tracker {tracker.name} failed to {action} ({error!r}); it is switched off, training and metrics.jsonl go on"
                )
                if action != "close":
                    with contextlib.suppress(Exception):
                        tracker.close()
