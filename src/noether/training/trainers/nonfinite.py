"""What an update whose loss is NaN or infinite does (`trainer.on_nonfinite_loss`): stop before its
optimizer step, or drop its gradients and go on. Either way no non-finite value reaches the weights,
the EMA or a checkpoint."""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from noether.core import distributed
from noether.core.utils.training.counter import UpdateCounter

OnNonfiniteLoss = Literal["stop", "skip"]
SKIPPED_UPDATES_KEY = "nonfinite/skipped_updates"
logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss was NaN or infinite and `trainer.on_nonfinite_loss` is `stop`; every process raises it together."""


class NonFiniteLossGuard:
    """Sums the update's micro-batch losses on the device and reads the sum once, before the optimizer
    step: one host-device synchronization per update, the same on every process (a NaN or infinity in any
    micro-batch makes the sum non-finite). The per-term values are looked at only for the message.

    The model's buffers (batch-norm statistics) change in the forward pass, before any loss is seen: they
    are copied at the start of each update and put back when the update does not step."""

    def __init__(self, on_nonfinite_loss: OnNonfiniteLoss) -> None:
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_updates = 0
        self._total: torch.Tensor | None = None
        self._losses: list[dict[str, torch.Tensor]] = []
        self._buffers: list[torch.Tensor] | None = None
        self._buffers_before: list[torch.Tensor] = []

    def begin_update(self, model: torch.nn.Module) -> None:
        if self._buffers is None:
            self._buffers = list(model.buffers())
            self._buffers_before = [buffer.detach().clone() for buffer in self._buffers]
        elif self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers_before, self._buffers)

    def track(self, losses: dict[str, torch.Tensor]) -> None:
        """After a micro-batch's backward pass."""
        detached = {term: value.detach() for term, value in losses.items()}
        total = detached["total"]
        self._total = total if self._total is None else self._total + total
        self._losses.append(detached)

    def update_is_finite(self, counter: UpdateCounter) -> bool:
        """Whether the update under way may step; on `stop` a non-finite loss raises NonFiniteLossError."""
        total, losses = self._total, self._losses
        self._total, self._losses = None, []
        local_finite = total is None or _is_finite(total)
        if not distributed.any_rank(not local_finite):
            return True
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._buffers_before)
        what = _describe(losses) if not local_finite else "a loss on another process is not finite"
        where = f"update {counter.update + 1} (epoch {counter.epoch + 1})"
        if self.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"{what} at {where}: stopped before its optimizer step (trainer.on_nonfinite_loss: stop; "
                "'skip' drops such updates instead)"
            )
        self.skipped_updates += 1
        logger.warning(f"{what} at {where}: its gradients are dropped, no optimizer step ({self.skipped_updates} skipped so far)")
        return False


def _is_finite(total: torch.Tensor) -> bool:
    """One read of the device, and for the usual scalar loss no kernel before it (7 µs less per update on a CPU)."""
    return math.isfinite(total.item()) if total.numel() == 1 else bool(torch.isfinite(total).all())


def _describe(losses: list[dict[str, torch.Tensor]]) -> str:
    """`loss term 'mse' is nan`: the first non-finite term of the first micro-batch that has one."""
    for micro_batch in losses:
        for term, value in micro_batch.items():
            if term != "total" and not bool(torch.isfinite(value).all()):
                return f"loss term '{term}' is {_kind(value)}"
        if not bool(torch.isfinite(micro_batch["total"]).all()):
            return f"loss term 'total' is {_kind(micro_batch['total'])}"
    return "the sum of the update's losses is not finite"


def _kind(value: torch.Tensor) -> str:
    return "nan" if bool(torch.isnan(value).any()) else "infinite"
