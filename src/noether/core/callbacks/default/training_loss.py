"""Logs the training loss averaged since the last log: `loss/online/{term}`."""

from __future__ import annotations

from typing import Any

import torch

from noether.core import distributed
from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter


class TrainingLossCallbackConfig(CallBackBaseConfig):
    pass


class TrainingLossCallback(PeriodicCallback):
    """Sums loss terms on the device so logging costs no sync until the log step."""

    def __init__(self, callback_config: TrainingLossCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self.grad_norm_sum: torch.Tensor | None = None
        self.update_losses: list[tuple[dict[str, torch.Tensor], float]] = []
        """The micro-batches of the update under way; added to `loss_sums` once it completes."""

    def track_after_accumulation_step(
        self, *, update_counter: UpdateCounter, losses: dict[str, torch.Tensor], weight: float, **kwargs: Any
    ) -> None:
        self.update_losses.append(({term: value.detach() for term, value in losses.items()}, weight))

    def track_after_update_step(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        for losses, weight in self.update_losses:
            for term, value in losses.items():
                if term in self.loss_sums:
                    self.loss_sums[term].add_(value, alpha=weight)
                else:
                    self.loss_sums[term] = value.float() * weight
        self.update_losses.clear()
        self.step_count += 1
        grad_norm = self.context.trainer.grad_norm
        if grad_norm is not None:
            self.grad_norm_sum = (
                grad_norm.detach().float().clone() if self.grad_norm_sum is None else self.grad_norm_sum.add_(grad_norm)
            )

    def track_after_skipped_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self.update_losses.clear()

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval" or not self.step_count:
            return
        # one collective for all terms: the mean over every rank's samples, not rank 0's alone
        terms = list(self.loss_sums)
        totals = distributed.sum_over_ranks(torch.stack([self.loss_sums[term] for term in terms])) / self.context.world_size
        for term, total in zip(terms, totals):
            self.context.log_writer.add_scalar(f"loss/online/{term}", total / self.step_count)
        if self.grad_norm_sum is not None:  # the same on every rank: computed from the combined gradients
            self.context.log_writer.add_scalar("grad_norm", self.grad_norm_sum / self.step_count)
        self.loss_sums, self.step_count, self.grad_norm_sum = {}, 0, None

    def logged_metric_prefixes(self) -> list[str]:
        return ["loss/online/", "grad_norm"]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"loss_sums": dict(self.loss_sums), "step_count": self.step_count}
        if self.grad_norm_sum is not None:
            state["grad_norm_sum"] = self.grad_norm_sum
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # checkpoints load onto the CPU; the sums keep growing on the trainer's device
        device = self.context.trainer.device
        self.loss_sums = {term: value.to(device) for term, value in state_dict["loss_sums"].items()}
        self.step_count = state_dict["step_count"]
        grad_norm_sum = state_dict.get("grad_norm_sum")
        self.grad_norm_sum = None if grad_norm_sum is None else grad_norm_sum.to(device)
