"""The best model by a metric, the best under several early-stopping patiences, and evaluation of each new best."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import NonNegativeInt, field_validator

from noether.core.callbacks.base import CallbackBase, CallBackBaseConfig, nested_metric_prefixes
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback, PeriodicDataIteratorCallback
from noether.core.checkpointing import save_model_checkpoint
from noether.core.config import ConfigError, by_kind
from noether.core.models.base import select_models
from noether.core.providers.path import metric_tag
from noether.core.utils.training.counter import UpdateCounter
from noether.core.writers.checkpoint_writer import load_checkpoint


class BestCheckpointCallbackConfig(CallBackBaseConfig):
    name: Literal["BestCheckpointCallback"] | None = None
    metric_key: str
    """Metric to watch, logged by a callback listed earlier that runs at least as often."""
    tolerances: list[NonNegativeInt] | None = None
    """Patiences t: keep the model that was best when the metric had not improved for more than t invocations."""
    model_names: list[str] | None = None
    """Submodels of a CompositeModel to write (default: all)."""
    save_frozen_weights: bool = False
    """Also write frozen submodels."""
    eval_callbacks: list[by_kind(CallBackBaseConfig)] | None = None
    """Callbacks run on each new best model (their schedule is ignored); keys prefixed `best={metric}/`."""

    @field_validator("tolerances")
    @classmethod
    def _distinct(cls, tolerances: list[int] | None) -> list[int] | None:
        if tolerances is not None and len(set(tolerances)) != len(tolerances):
            raise ValueError(f"tolerances must be distinct, got {tolerances}")
        return sorted(tolerances) if tolerances is not None else None


class BestCheckpointCallback(PeriodicCallback):
    """Saves `best_model.{metric}` on every improvement of `metric_key` and evaluates that model.

    Each tolerance t answers "what if training had stopped after t invocations without
    improvement": when the streak of non-improvement first exceeds t, the best model so far is
    copied to `best_model.{metric}.tolerance={t}`; tolerances never exceeded get the overall best
    at the end. Everything is part of the state, so a resumed run writes the same files.
    """

    config: BestCheckpointCallbackConfig

    def __init__(self, callback_config: BestCheckpointCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.metric_key = callback_config.metric_key
        self.model_names = callback_config.model_names
        self.tolerances = callback_config.tolerances or []
        self.higher_is_better = context.metric_properties.higher_is_better(self.metric_key)
        self.best_tag = f"best_model.{metric_tag(self.metric_key)}"
        self.best_metric_value = -math.inf if self.higher_is_better else math.inf
        self.tolerance_counter = 0
        self.tolerances_is_exceeded = {tolerance: False for tolerance in self.tolerances}
        self.best_value_at_tolerance: dict[int, float] = {}
        child_context = context.with_log_prefix(f"best={metric_tag(self.metric_key)}/")
        self.eval_callbacks: list[CallbackBase] = [
            type(child_config).configured_class()(child_config, child_context) for child_config in callback_config.eval_callbacks or []
        ]

    @property
    def has_best(self) -> bool:
        return math.isfinite(self.best_metric_value)

    def get_children(self) -> list[CallbackBase]:
        # iterating children read their own loader when a new best appears, not the shared sampler
        return [child for child in self.eval_callbacks if not isinstance(child, PeriodicDataIteratorCallback)]

    def logged_metric_prefixes(self) -> list[str] | None:
        child_prefixes = nested_metric_prefixes(self.eval_callbacks, f"best={metric_tag(self.metric_key)}/")
        return None if child_prefixes is None else [f"best/{self.metric_key}", *child_prefixes]

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        select_models(self.context.model, self.model_names)  # fail now on an unknown model name
        self._check_metric_is_logged_before()
        for child in self.eval_callbacks:
            child.before_training(update_counter=update_counter, **kwargs)

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            self._evaluate_children(update_counter)
            return
        value = self._current_metric_value()
        if self._is_better(value):
            self.best_metric_value = value
            self.tolerance_counter = 0
            self._save(self.best_tag, update_counter)
            self._evaluate_children(update_counter)
            return
        self.tolerance_counter += 1
        for tolerance in self.tolerances:
            if not self.tolerances_is_exceeded[tolerance] and self.tolerance_counter > tolerance:
                self.tolerances_is_exceeded[tolerance] = True
                self._keep_best_for_tolerance(tolerance)

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        for tolerance in self.tolerances:
            if not self.tolerances_is_exceeded[tolerance]:
                self._keep_best_for_tolerance(tolerance)
        if self.has_best:
            log_writer = self.context.log_writer
            log_writer.add_scalar(f"best/{self.metric_key}", self.best_metric_value)
            for tolerance, value in self.best_value_at_tolerance.items():
                log_writer.add_scalar(f"best/{self.metric_key}/tolerance={tolerance}", value)
        for child in self.eval_callbacks:
            child.after_training(update_counter=update_counter, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_metric_value": self.best_metric_value,
            "tolerance_counter": self.tolerance_counter,
            "tolerances_is_exceeded": {str(t): exceeded for t, exceeded in self.tolerances_is_exceeded.items()},
            "best_value_at_tolerance": {str(t): value for t, value in self.best_value_at_tolerance.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_metric_value = state_dict["best_metric_value"]
        self.tolerance_counter = state_dict["tolerance_counter"]
        saved_exceeded = {int(t): exceeded for t, exceeded in state_dict["tolerances_is_exceeded"].items()}
        if set(saved_exceeded) != set(self.tolerances):
            raise ValueError(
                f"{self.state_key}: the checkpoint tracked tolerances {sorted(saved_exceeded)}, the config has {self.tolerances}"
            )
        self.tolerances_is_exceeded = saved_exceeded
        self.best_value_at_tolerance = {int(t): value for t, value in state_dict["best_value_at_tolerance"].items()}

    # -------------------------------------------------------------------------------------------
    def _current_metric_value(self) -> float:
        log_cache = self.context.log_writer.log_cache
        if self.metric_key not in log_cache:
            logged = ", ".join(sorted(log_cache)) or "nothing"
            raise KeyError(
                f"{self.state_key}: metric '{self.metric_key}' was not logged at this step (logged: {logged}); "
                "it must come from a callback listed before this one that runs at the same or a higher frequency"
            )
        return float(log_cache[self.metric_key])

    def _is_better(self, value: float) -> bool:
        return value > self.best_metric_value if self.higher_is_better else value < self.best_metric_value

    def _save(self, tag: str, update_counter: UpdateCounter) -> None:
        if self.context.is_main_process:
            save_model_checkpoint(
                self.context.checkpoint_writer,
                self.context.paths,
                self.context.model,
                tag,
                update_counter.cur_iteration,
                model_names=self.model_names,
                save_frozen_weights=self.config.save_frozen_weights,
            )

    def _keep_best_for_tolerance(self, tolerance: int) -> None:
        """Copy the current best files to the tolerance's tag (the weights have moved on since)."""
        if not self.has_best:
            return
        self.best_value_at_tolerance[tolerance] = self.best_metric_value
        if not self.context.is_main_process:
            return
        writer, paths = self.context.checkpoint_writer, self.context.paths
        writer.wait()  # the best file may still be in flight
        tolerance_tag = f"{self.best_tag}.tolerance={tolerance}"
        for name, model in select_models(self.context.model, self.model_names).items():
            best_file = paths.checkpoint_file(name, self.best_tag, "model")
            if best_file.exists():
                payload = load_checkpoint(best_file)
                payload["checkpoint_tag"] = tolerance_tag
                writer.save(paths.checkpoint_file(name, tolerance_tag, "model"), payload)

    def _evaluate_children(self, update_counter: UpdateCounter) -> None:
        for child in self.eval_callbacks:
            child.at_eval(update_counter=update_counter)

    def _check_metric_is_logged_before(self) -> None:
        """Fail at start-up when no callback listed before this one can log the metric."""
        callbacks = self.context.trainer.callbacks
        earlier = callbacks[: callbacks.index(self)] if self in callbacks else []
        prefixes: list[str] = []
        for callback in earlier:
            logged = callback.logged_metric_prefixes()
            if logged is None:
                return  # a callback that may log anything: only the first invocation can tell
            prefixes += logged
        if not any(self.metric_key.startswith(prefix) for prefix in prefixes):
            raise ConfigError(
                f"{self.state_key}.metric_key: no callback listed before it logs '{self.metric_key}' "
                f"(they log: {', '.join(f'{p}*' for p in prefixes)}); add one that does, e.g. an "
                "OfflineLossCallback, before this callback"
            )
