"""A callback that records every read of a tensor's value into Python (`.item()`, `bool()`, `float()`,
`.tolist()`, `.cpu()`, ...) during a window of updates: on a GPU each is a host-device synchronization,
so this is the CPU-side check of what tests/training/test_cuda_sync.py checks on a device."""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from pydantic import PositiveInt
from torch.overrides import TorchFunctionMode

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter

READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}


class _RecordReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.allowed = 0
        self.allowing = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", None) in READS:
            caller = traceback.extract_stack(limit=2)[0]
            if self.allowing:
                self.allowed += 1
            elif "/torch/" not in caller.filename:  # torch's own (the optimizers' step counts: CPU tensors by design)
                self.reads.append(f"{func.__name__} at {Path(caller.filename).name}:{caller.lineno} ({caller.line})")
        return func(*args, **(kwargs or {}))


class RecordHostReadsConfig(CallBackBaseConfig):
    from_update: PositiveInt
    """Reads are recorded from the end of this update on (after the first updates' lazy set-up)..."""
    until_update: PositiveInt
    """...until the end of this one (before the epoch's logging and checkpoints, which read values back)."""
    report_file: str
    """Written at the end of the window: {"reads": [...], "guard_reads": n}."""


class RecordHostReads(PeriodicCallback):
    """Reads of the non-finite-loss check are counted apart: it reads the loss once per update by design."""

    config: RecordHostReadsConfig

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self._mode = _RecordReads()
        guard = self.context.trainer.nonfinite
        check = guard.update_is_finite

        def allowed_read(counter: UpdateCounter) -> bool:
            self._mode.allowing = True
            try:
                return check(counter)
            finally:
                self._mode.allowing = False

        guard.update_is_finite = allowed_read

    def track_after_update_step(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update == self.config.from_update:
            self._mode.__enter__()
        elif update_counter.update == self.config.until_update:
            self._mode.__exit__(None, None, None)
            report = {"reads": self._mode.reads, "guard_reads": self._mode.allowed}
            Path(self.config.report_file).write_text(json.dumps(report))
