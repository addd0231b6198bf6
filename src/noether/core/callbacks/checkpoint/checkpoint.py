"""Periodic checkpoints of weights and optimizer state, `latest` and `last`, for resuming."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.models.base import select_models
from noether.core.utils.training.counter import UpdateCounter

ADAM_LIKE_STATE_PER_PARAMETER = 2  # exp_avg and exp_avg_sq: the common case, used for the size estimate


class CheckpointCallbackConfig(CallBackBaseConfig):
    name: Literal["CheckpointCallback"] | None = None
    save_weights: bool = True
    """Write weights under the training iteration's tag (`E.._U.._S..`) at every invocation."""
    save_optim: bool = True
    """Write optimizer state under the training iteration's tag at every invocation."""
    save_latest_weights: bool = False
    """Write weights as `latest`, overwritten at every invocation."""
    save_latest_optim: bool = False
    """Write optimizer state as `latest`, overwritten at every invocation."""
    model_names: list[str] | None = None
    """Submodels of a CompositeModel to write (default: all)."""

    @model_validator(mode="after")
    def _saves_something(self) -> CheckpointCallbackConfig:
        if not (self.save_weights or self.save_optim or self.save_latest_weights or self.save_latest_optim):
            raise ValueError("nothing would be saved: enable save_weights, save_optim, save_latest_weights or save_latest_optim")
        return self


class CheckpointCallback(PeriodicCallback):
    """Asks the trainer to checkpoint at the end of the step, so a resume continues right after it."""

    config: CheckpointCallbackConfig

    def logged_metric_prefixes(self) -> list[str]:
        return []

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        select_models(self.context.model, self.config.model_names)  # fail now on an unknown model name
        weights, optim = self._checkpoint_bytes()
        config = self.config
        per_periodic = weights * config.save_weights + optim * config.save_optim
        per_latest = weights * config.save_latest_weights + optim * config.save_latest_optim
        total = per_periodic * self._invocations(update_counter) + per_latest + weights + optim
        self.logger.info(
            f"checkpoint size: weights {_megabytes(weights)}, optimizer ~{_megabytes(optim)}; "
            f"this run writes ~{_megabytes(total)} of checkpoints in all"
        )

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return
        config, trainer = self.config, self.context.trainer
        if config.save_weights or config.save_optim:
            tag = str(update_counter.cur_iteration)
            trainer.request_checkpoint(tag, save_weights=config.save_weights, save_optim=config.save_optim, model_names=config.model_names)
        if config.save_latest_weights or config.save_latest_optim:
            trainer.request_checkpoint(
                "latest", save_weights=config.save_latest_weights, save_optim=config.save_latest_optim, model_names=config.model_names
            )

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        save_optim = self.config.save_optim or self.config.save_latest_optim
        self.context.trainer.request_checkpoint("last", save_weights=True, save_optim=save_optim, model_names=self.config.model_names)

    def _checkpoint_bytes(self) -> tuple[int, int]:
        weights = optim = 0
        for model in select_models(self.context.model, self.config.model_names).values():
            if model.is_frozen:
                continue
            weights += sum(t.numel() * t.element_size() for t in model.state_dict().values())
            if model.optimizer is not None:
                trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
                optim += ADAM_LIKE_STATE_PER_PARAMETER * trainable
        return weights, optim

    def _invocations(self, update_counter: UpdateCounter) -> int:
        config = self.config
        if config.every_n_epochs is not None:
            return update_counter.end_update // update_counter.updates_per_epoch // config.every_n_epochs
        if config.every_n_updates is not None:
            return update_counter.end_update // config.every_n_updates
        return update_counter.end_update * update_counter.effective_batch_size // config.every_n_samples


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
