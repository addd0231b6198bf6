"""Exponential moving averages of the weights: updated every step, checkpointed, evaluated by child callbacks."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from pydantic import field_validator

from noether.core.callbacks.base import CallbackBase, CallBackBaseConfig, nested_metric_prefixes
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.checkpoint_manager import SaveRequest
from noether.core.checkpoint_store import Member
from noether.core.checkpointing import weights_payload
from noether.core.config import ConfigError, build, by_kind
from noether.core.models.base import ModelBase
from noether.core.models.ema import ModuleEma
from noether.core.utils.training.counter import UpdateCounter
from noether.core.writers.checkpoint_writer import CheckpointLoadError


class EmaCallbackConfig(CallBackBaseConfig):
    name: Literal["EmaCallback"] | None = None
    target_factors: list[float]
    """One EMA per factor: `ema = factor * ema + (1 - factor) * live` after every update."""
    model_paths: list[str | None] | None = None
    """Submodules to average (`encoder`, `encoder.blocks`); None averages the whole model."""
    save_weights: bool = False
    """Write the EMA weights under the training iteration's tag at every invocation."""
    save_last_weights: bool = True
    """Write the EMA weights as `last` at the end of training."""
    save_latest_weights: bool = True
    """Write the EMA weights as `latest`, overwritten at every invocation."""
    eval_callbacks: list[by_kind(CallBackBaseConfig)] | None = None
    """Callbacks run on the EMA weights of each factor, on their own schedule; keys prefixed `ema={factor}/`."""

    @field_validator("target_factors")
    @classmethod
    def _valid_factors(cls, factors: list[float]) -> list[float]:
        if not factors:
            raise ValueError("at least one target factor is required")
        if len(set(factors)) != len(factors):
            raise ValueError(f"target factors must be distinct, got {factors}")
        for factor in factors:
            if not 0.0 <= factor < 1.0:
                raise ValueError(f"target factors must satisfy 0 <= factor < 1, got {factor}")
        return factors


class EmaCallback(PeriodicCallback):
    """Keeps EMAs of the model (or of submodules) and runs child callbacks on them.

    Children keep their own schedule; only on a step where one is due are the EMA weights copied
    into the live model (and the live weights restored after), so idle children cost nothing.
    Whenever the trainer writes a checkpoint, the EMA weights are written under the same tag,
    which makes every checkpoint resume with the exact EMA.
    """

    config: EmaCallbackConfig

    def __init__(self, callback_config: EmaCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.target_factors = callback_config.target_factors
        self.model_paths = callback_config.model_paths or [None]
        self._check_model_paths()
        self.emas: dict[str | None, ModuleEma] = {}
        self.eval_callbacks: dict[float, list[CallbackBase]] = {
            factor: [
                build(_child_config_for_factor(child_config, factor), context.with_log_prefix(f"ema={factor}/"))
                for child_config in callback_config.eval_callbacks or []
            ]
            for factor in self.target_factors
        }

    def get_children(self) -> list[CallbackBase]:
        """All children, in the order they are dispatched, so their data is served by the shared loader."""
        return [child for factor in self.target_factors for child in self.eval_callbacks[factor]]

    def logged_metric_prefixes(self) -> list[str] | None:
        prefixes: list[str] = []
        for factor, children in self.eval_callbacks.items():
            child_prefixes = nested_metric_prefixes(children, f"ema={factor}/")
            if child_prefixes is None:
                return None
            prefixes += child_prefixes
        return prefixes

    # ----------------------------------------------------------------------------- lifecycle
    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self._build_emas()
        for child in self.get_children():
            child.before_training(update_counter=update_counter, **kwargs)

    def track_after_update_step(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        for ema in self.emas.values():
            ema.update()

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        super().after_update(update_counter=update_counter, **kwargs)
        self._run_children("after_update", lambda child: child.is_due_after_update(update_counter), update_counter, kwargs)

    def after_epoch(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        super().after_epoch(update_counter=update_counter, **kwargs)
        self._run_children("after_epoch", lambda child: child.is_due_after_epoch(update_counter), update_counter, kwargs)

    def at_eval(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        """Only the children run: the EMA weights were loaded from the evaluated checkpoint, there is nothing to save."""
        self._run_children("at_eval", lambda child: True, update_counter, kwargs)

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if self.config.save_weights:
            self._request_save(str(update_counter.cur_iteration))
        if self.config.save_latest_weights:
            self._request_save("latest")

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if self.config.save_last_weights:
            self._request_save("last")
        for child in self.get_children():
            child.after_training(update_counter=update_counter, **kwargs)

    def checkpoint_members(self, *, checkpoint_tag: str, update_counter: UpdateCounter) -> dict[Member, dict[str, Any]]:
        return self._members()

    def resume_from_checkpoint(self, *, checkpoint_tag: str, update_counter: UpdateCounter) -> None:
        """Load the EMA written at the resumed iteration: the one of the resumed checkpoint's set, else one
        saved on the EMA's own schedule under the iteration's tag. Never an EMA of another iteration (it
        would silently differ from an uninterrupted run's): without one, the EMA restarts from the live weights.
        """
        self._build_emas()
        iteration = update_counter.cur_iteration
        checkpoints = self.context.checkpoints
        tags = list(dict.fromkeys([checkpoint_tag, str(iteration)]))
        for path, ema in self.emas.items():
            for factor in self.target_factors:
                member = self._member(path, factor)
                found = checkpoints.find_member_state(member, tags, iteration, ema.state_dict(factor))
                if found is None:
                    looked_for = ", ".join(checkpoints.member_path(member, tag).name for tag in tags)
                    self.logger.warning(
                        f"no EMA weights written at {iteration} (looked for {looked_for}); EMA {factor} restarts from "
                        "the live weights, so it differs from an uninterrupted run's"
                    )
                    continue
                tag, state_dict = found
                try:
                    ema.load_state_dict(factor, state_dict)
                except (ValueError, TypeError) as error:
                    raise CheckpointLoadError(
                        f"{checkpoints.member_path(member, tag)} does not fit EMA {factor} of this model: {error}"
                    ) from None

    # ----------------------------------------------------------------------------- internals
    def _build_emas(self) -> None:
        if self.emas:
            return
        model = self.context.model
        for path in self.model_paths:
            module = model if path is None else model.get_submodule(path)
            self.emas[path] = ModuleEma(module, self.target_factors)

    def _run_children(self, hook: str, is_due: Any, update_counter: UpdateCounter, kwargs: dict[str, Any]) -> None:
        for factor in self.target_factors:
            due = [child for child in self.eval_callbacks[factor] if isinstance(child, PeriodicCallback) and is_due(child)]
            if not due:
                continue
            with contextlib.ExitStack() as swaps:
                for ema in self.emas.values():
                    swaps.enter_context(ema.swapped_in(factor))
                for child in due:
                    getattr(child, hook)(update_counter=update_counter, **kwargs)

    def _check_model_paths(self) -> None:
        """Fail before training on a path that names no submodule."""
        model = self.context.model
        for path in self.model_paths:
            if path is None:
                continue
            try:
                model.get_submodule(path)
            except AttributeError:
                submodules = ", ".join(name for name, _ in model.named_children())
                raise ConfigError(
                    f"{self.state_key}.model_paths: model '{model.name}' has no submodule '{path}' (its submodules: {submodules})"
                ) from None

    def _member(self, path: str | None, factor: float) -> Member:
        model_name = self.context.model.name if path is None else f"{self.context.model.name}.{path}"
        return Member(model_name, "model", factor)

    def _request_save(self, tag: str) -> None:
        """EMA weights on their own schedule, written at the end of the step; under a tag where the step
        also saves a resumable set, that set holds them already."""
        self.context.checkpoints.request(SaveRequest(tag, weights=False, own_members=self._members))

    def _members(self) -> dict[Member, dict[str, Any]]:
        members = {}
        for path, ema in self.emas.items():
            for factor in self.target_factors:
                state_dict = ema.state_dict(factor)
                module = ema.module
                members[self._member(path, factor)] = (
                    weights_payload(module, state_dict) if isinstance(module, ModelBase) else {"state_dict": state_dict}
                )
        return members


def _child_config_for_factor(child_config: CallBackBaseConfig, factor: float) -> CallBackBaseConfig:
    """The child's config with an id of its own per factor, so stateful children keep apart in checkpoints."""
    own_id = child_config.id or type(child_config).configured_class().__name__
    return child_config.model_copy(update={"id": f"ema={factor}/{own_id}"})
