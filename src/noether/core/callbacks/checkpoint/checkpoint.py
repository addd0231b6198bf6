"""Periodic checkpoints of weights and optimizer state, `latest` and `last`, for resuming."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveInt, model_validator

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.checkpoint_manager import SaveRequest
from noether.core.checkpoint_store import iteration_of_tag
from noether.core.config import ConfigError
from noether.core.models.base import select_models
from noether.core.utils.formatting import format_bytes
from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration

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
    keep_last_n: PositiveInt | None = None
    """Keep only the newest n periodic (`E.._U.._S..`) checkpoints this callback wrote (default: all);
    `latest`, `last`, best, interrupt and error checkpoints are never deleted."""
    keep_every_n_epochs: PositiveInt | None = None
    """Periodic checkpoints written at the end of every n-th epoch are milestones: kept besides the
    newest keep_last_n (which counts the others)."""

    @model_validator(mode="after")
    def _saves_something(self) -> CheckpointCallbackConfig:
        if not (self.save_weights or self.save_optim or self.save_latest_weights or self.save_latest_optim):
            raise ValueError("nothing would be saved: enable save_weights, save_optim, save_latest_weights or save_latest_optim")
        if self.keep_every_n_epochs and not self.keep_last_n:
            raise ValueError("keep_every_n_epochs keeps milestones from keep_last_n's deletions: set keep_last_n too")
        if self.keep_every_n_epochs and not (self.save_weights or self.save_optim):
            raise ValueError("keep_every_n_epochs needs periodic checkpoints: enable save_weights or save_optim")
        return self


class CheckpointCallback(PeriodicCallback):
    """Asks for a resumable checkpoint at the end of the step, so a resume continues right after it.

    With `keep_last_n`, each new periodic set is followed by the deletion of the sets it outnumbers,
    done by the checkpoint store only once the new set is committed, and never of a set another
    CheckpointCallback keeps (two callbacks saving at one step share its tag).
    """

    config: CheckpointCallbackConfig

    def __init__(self, callback_config: CheckpointCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.periodic_tags: list[str] = []
        """The periodic checkpoints written and not yet deleted, milestones aside: the newest keep_last_n + 1 at
        most, or, for a timed schedule without keep_last_n, every one."""
        self.milestones: list[str] = []
        """The periodic checkpoints kept as milestones (keep_every_n_epochs)."""
        self._epoch_length_and_batch: tuple[int, int] | None = None
        context.checkpoints.add_retention_owner(self)

    def logged_metric_prefixes(self) -> list[str]:
        return []

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        try:
            select_models(self.context.model, self.config.model_names)
        except ValueError as error:  # an unknown model name: fail now, not at the first save
            raise ConfigError(f"{self.state_key}.model_names: {error}") from None
        self._epoch_length_and_batch = update_counter.updates_per_epoch, update_counter.effective_batch_size
        self._log_forecast(update_counter)
        if self.config.keep_last_n and self.periodic_tags:
            # a set the stopped run asked for but never wrote (it failed in that step) must not take a place
            # among the newest; then a deletion the stopped run had not done yet
            self.periodic_tags = [tag for tag in self.periodic_tags if self.context.checkpoints.holds(tag)]
            self.context.checkpoints.prune(self, self.periodic_tags, self.config.keep_last_n)

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            return
        config = self.config
        if config.save_weights or config.save_optim:
            tag = str(update_counter.cur_iteration)
            prune = None
            if self._is_milestone(update_counter.cur_iteration, update_counter.updates_per_epoch):
                self.milestones.append(tag)
            elif config.keep_last_n:
                self.periodic_tags = [*self.periodic_tags, tag][-config.keep_last_n - 1 :]
                prune = (self, tuple(self.periodic_tags), config.keep_last_n)
            elif self.schedule.is_timed:
                self.periodic_tags.append(tag)  # where a timed schedule fired is known only from this list
            self._request(tag, weights=config.save_weights, optim=config.save_optim, prune=prune)
        if config.save_latest_weights or config.save_latest_optim:
            self._request("latest", weights=config.save_latest_weights, optim=config.save_latest_optim)

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self._request("last", weights=True, optim=self.config.save_optim or self.config.save_latest_optim)

    def keeps(self, tag: str) -> bool:
        """Whether this callback keeps periodic set `tag`: one of its newest keep_last_n, or, without
        keep_last_n, any set its schedule made."""
        if not (self.config.save_weights or self.config.save_optim):
            return False  # it writes `latest` only
        if tag in self.milestones:
            return True
        if self.config.keep_last_n:
            return tag in self.periodic_tags[-self.config.keep_last_n :]
        if self.schedule.is_timed:
            return tag in self.periodic_tags
        iteration = iteration_of_tag(tag)
        if iteration is None or self._epoch_length_and_batch is None:
            return False
        return self.schedule.fired_at(iteration, *self._epoch_length_and_batch)

    def state_dict(self) -> dict[str, Any] | None:
        if not (self.config.keep_last_n or self.schedule.is_timed):
            return None
        state: dict[str, Any] = {"periodic_tags": self.periodic_tags}
        if self.config.keep_every_n_epochs:
            state["milestones"] = self.milestones
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.periodic_tags = list(state_dict["periodic_tags"])
        self.milestones = list(state_dict.get("milestones", []))

    def _is_milestone(self, iteration: TrainingIteration, updates_per_epoch: int) -> bool:
        every = self.config.keep_every_n_epochs
        at_epoch_end = iteration.update == iteration.epoch * updates_per_epoch
        return bool(every) and at_epoch_end and iteration.epoch > 0 and iteration.epoch % every == 0

    def _request(self, tag: str, *, weights: bool, optim: bool, prune: Any = None) -> None:
        model_names = self.config.model_names
        self.context.checkpoints.request(
            SaveRequest(
                tag,
                weights=weights,
                optim=optim,
                resumable=True,
                model_names=None if model_names is None else tuple(model_names),
                save_frozen_weights=model_names is not None,  # a frozen submodel named in `model_names` is one the user asked for
                prune=prune,
            )
        )

    def _log_forecast(self, update_counter: UpdateCounter) -> None:
        """What one checkpoint weighs and what the run writes and keeps, each file counted once: `latest`
        with the periodic set's parts is a second name of its files, and so is `last` at a periodic step."""
        weights, optim = self._checkpoint_bytes()
        config = self.config
        if self.schedule.is_timed:  # how many sets it writes is known only as training goes
            self.logger.info(
                f"one checkpoint: weights {format_bytes(weights)}, optimizer state ~{format_bytes(optim)}; "
                f"one every {config.every_n_seconds:g} s of training"
                + (f", the newest {config.keep_last_n} kept" if config.keep_last_n else "")
            )
            return
        per_periodic = weights * config.save_weights + optim * config.save_optim
        per_latest = weights * config.save_latest_weights + optim * config.save_latest_optim
        latest_is_periodic = per_periodic > 0 and (config.save_latest_weights, config.save_latest_optim) == (
            config.save_weights,
            config.save_optim,
        )
        last_optim = config.save_optim or config.save_latest_optim
        last = weights + optim * last_optim
        epoch_length, batch = update_counter.updates_per_epoch, update_counter.effective_batch_size
        end = update_counter.end_update
        at_end = TrainingIteration(epoch=end // epoch_length, update=end, sample=end * batch)
        if config.save_weights and config.save_optim == last_optim and self.schedule.fired_at(at_end, epoch_length, batch):
            last = 0
        invocations = self.schedule.invocations_between(update_counter.update, end, epoch_length, batch)
        epoch_ends = (
            TrainingIteration(epoch=epoch, update=epoch * epoch_length, sample=epoch * epoch_length * batch)
            for epoch in range(update_counter.update // epoch_length + 1, end // epoch_length + 1)
        )
        milestones = sum(
            self._is_milestone(at, epoch_length) and self.schedule.fired_at(at, epoch_length, batch) for at in epoch_ends
        )
        rolling = min(invocations - milestones, config.keep_last_n or invocations)
        latest_written, latest_kept = (0, 0) if latest_is_periodic else (per_latest * invocations, per_latest)
        total = per_periodic * invocations + latest_written + last
        kept = per_periodic * (rolling + milestones) + latest_kept + last
        kept_how = f"keep_last_n={config.keep_last_n}" + (
            f", a milestone every {config.keep_every_n_epochs} epochs" if config.keep_every_n_epochs else ""
        )
        self.logger.info(
            f"one checkpoint: weights {format_bytes(weights)}, optimizer state ~{format_bytes(optim)}; "
            f"this run will write ~{format_bytes(total)} of checkpoints"
            + (f" and keep ~{format_bytes(kept)} of them ({kept_how})" if config.keep_last_n else "")
        )

    def _checkpoint_bytes(self) -> tuple[int, int]:
        weights = optim = 0
        for model in select_models(self.context.model, self.config.model_names).values():
            if model.is_frozen and self.config.model_names is None:
                continue
            weights += sum(t.numel() * t.element_size() for t in model.state_dict().values())
            if model.optimizer is not None:
                trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
                optim += ADAM_LIKE_STATE_PER_PARAMETER * trainable
        return weights, optim
