"""The best model by a metric, the best under several early-stopping patiences, and evaluation of each new best."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveInt, field_validator

from noether.core.callbacks.base import (
    CallbackBase,
    CallBackBaseConfig,
    check_metric_logged_before,
    logged_value,
    nested_metric_prefixes,
)
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback, PeriodicDataIteratorCallback
from noether.core.checkpoint_manager import SaveRequest
from noether.core.config import ConfigError, build, by_kind
from noether.core.models.base import select_models
from noether.core.providers.path import metric_tag
from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration


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
    save_top_k: PositiveInt | None = None
    """Also keep the weights of the k best evaluations so far, as `best_model.{metric}.{E.._U.._S..}`;
    one that drops out of the k best is deleted (once the set that replaced it is committed)."""
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
    improvement": `best_model.{metric}.tolerance={t}` holds the best model up to the invocation
    at which the streak of non-improvement first exceeded t (the overall best if it never did).
    It is written together with `best_model.{metric}` at every new best while t is not exceeded
    (one more write per open tolerance), so it never has to be copied from a best file that, after
    a resume from an earlier checkpoint, may already hold a later model. Everything else is part of
    the state, so a resumed run writes the same files as an uninterrupted one.

    Under `noether-eval` (interval type "eval") the children evaluate the loaded model; nothing is
    saved or tracked.
    """

    config: BestCheckpointCallbackConfig

    def __init__(self, callback_config: BestCheckpointCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.metric_key = callback_config.metric_key
        self.model_names = callback_config.model_names
        self.save_frozen_weights = callback_config.save_frozen_weights
        self.tolerances = callback_config.tolerances or []
        try:
            self.higher_is_better = context.metric_properties.higher_is_better(self.metric_key)
            select_models(context.model, self.model_names)
        except ValueError as error:
            raise ConfigError(f"{self.state_key}: {error}") from None
        self.best_tag = f"best_model.{metric_tag(self.metric_key)}"
        self.no_best_value = -math.inf if self.higher_is_better else math.inf
        self.best_metric_value = self.no_best_value
        self.tolerance_counter = 0
        self.tolerances_is_exceeded = {tolerance: False for tolerance in self.tolerances}
        self.best_value_at_tolerance: dict[int, float] = {}
        self.best_iteration: TrainingIteration | None = None
        self.top_k: list[tuple[float, str]] = []
        """(value, tag) of the k best evaluations kept, best first; ties rank the earlier first."""
        child_context = context.with_log_prefix(f"best={metric_tag(self.metric_key)}/")
        self.eval_callbacks: list[PeriodicCallback] = []
        for child_config in callback_config.eval_callbacks or []:
            child = build(child_config, child_context)
            if not isinstance(child, PeriodicCallback):
                raise ConfigError(
                    f"{self.state_key}.eval_callbacks: {type(child).__name__} is not a periodic callback, "
                    "so it cannot evaluate a model"
                )
            self.eval_callbacks.append(child)

    @property
    def has_best(self) -> bool:
        return self.best_metric_value != self.no_best_value

    def tolerance_tag(self, tolerance: int) -> str:
        return f"{self.best_tag}.tolerance={tolerance}"

    def get_children(self) -> list[CallbackBase]:
        # iterating children read their own loader when a new best appears, not the shared sampler
        return [child for child in self.eval_callbacks if not isinstance(child, PeriodicDataIteratorCallback)]

    def logged_metric_prefixes(self) -> list[str] | None:
        child_prefixes = nested_metric_prefixes(self.eval_callbacks, f"best={metric_tag(self.metric_key)}/")
        return None if child_prefixes is None else [f"best/{self.metric_key}", *child_prefixes]

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        self._check_config_against_other_callbacks()
        if self.has_best and not self.context.checkpoints.holds(self.best_tag):
            self._restore_best_files()
        for child in self.eval_callbacks:
            child.before_training(update_counter=update_counter, **kwargs)

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if interval_type == "eval":
            self._evaluate_children(update_counter)
            return
        value = logged_value(self, self.metric_key)
        top_k_tag = self._enter_top_k(value, f"{self.best_tag}.{update_counter.cur_iteration}")
        if self._is_better(value):
            self.best_metric_value = value
            self.best_iteration = update_counter.cur_iteration
            self.tolerance_counter = 0
            self._save(top_k_tag)
            self._evaluate_children(update_counter)
            return
        if top_k_tag is not None:
            self._save_weights(top_k_tag)
        self.tolerance_counter += 1
        for tolerance in self.tolerances:
            if not self.tolerances_is_exceeded[tolerance] and self.tolerance_counter > tolerance:
                self.tolerances_is_exceeded[tolerance] = True
                if self.has_best:
                    self.best_value_at_tolerance[tolerance] = self.best_metric_value

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if self.has_best:
            log_writer = self.context.log_writer
            log_writer.add_scalar(f"best/{self.metric_key}", self.best_metric_value)
            # a tolerance exceeded before the first best has no model and no value
            values = {t: self.best_metric_value for t, exceeded in self.tolerances_is_exceeded.items() if not exceeded}
            values.update(self.best_value_at_tolerance)
            for tolerance in sorted(values):
                log_writer.add_scalar(f"best/{self.metric_key}/tolerance={tolerance}", values[tolerance])
        for child in self.eval_callbacks:
            child.after_training(update_counter=update_counter, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "metric_key": self.metric_key,
            "best_metric_value": self.best_metric_value,
            "tolerance_counter": self.tolerance_counter,
            "tolerances_is_exceeded": {str(t): exceeded for t, exceeded in self.tolerances_is_exceeded.items()},
            "best_value_at_tolerance": {str(t): value for t, value in self.best_value_at_tolerance.items()},
        }
        if self.best_iteration is not None:
            state["best_iteration"] = self.best_iteration.to_dict()
        if self.config.save_top_k:
            state["top_k"] = [[value, tag] for value, tag in self.top_k]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_exceeded = {int(t): exceeded for t, exceeded in state_dict["tolerances_is_exceeded"].items()}
        if state_dict["metric_key"] != self.metric_key or set(saved_exceeded) != set(self.tolerances):
            raise ConfigError(
                f"{self.state_key}: the checkpoint tracked metric '{state_dict['metric_key']}' with tolerances "
                f"{sorted(saved_exceeded)}, the config has '{self.metric_key}' with {self.tolerances}; "
                "a resumed run must keep them (or give this callback a new 'id' to start it fresh)"
            )
        self.best_metric_value = state_dict["best_metric_value"]
        self.tolerance_counter = state_dict["tolerance_counter"]
        self.tolerances_is_exceeded = saved_exceeded
        self.best_value_at_tolerance = {int(t): value for t, value in state_dict["best_value_at_tolerance"].items()}
        self.top_k = [(value, tag) for value, tag in state_dict.get("top_k", [])]
        best_iteration = state_dict.get("best_iteration")
        self.best_iteration = None if best_iteration is None else TrainingIteration.from_dict(best_iteration)

    # -------------------------------------------------------------------------------------------
    def _is_better(self, value: float) -> bool:
        return value > self.best_metric_value if self.higher_is_better else value < self.best_metric_value

    def _restore_best_files(self) -> None:
        """A resume from an earlier checkpoint (a branch) set aside the best file the later history wrote: the
        best of this history is the set at `best_iteration`, named best again (with its open tolerances)
        from the periodic set of that iteration when one holds its weights."""
        open_tolerances = [self.tolerance_tag(t) for t in self.tolerances if not self.tolerances_is_exceeded[t]]
        source = str(self.best_iteration) if self.best_iteration is not None else None
        names = None if self.model_names is None else tuple(self.model_names)
        restored = source is not None and self.context.checkpoints.link_weights(
            source, [self.best_tag, *open_tolerances], names, self.save_frozen_weights
        )
        if restored:
            self.logger.info(f"'{self.best_tag}' is the model of '{source}' again, the best of this history")
        elif self.context.rank == 0:
            where = f" (at {source})" if source else ""
            self.logger.warning(
                f"'{self.best_tag}' of this history{where} is not on disk: a later best of the history set aside "
                "replaced it, and no periodic checkpoint holds its weights; the next improvement writes it again"
            )

    def _enter_top_k(self, value: float, tag: str) -> str | None:
        """With save_top_k: rank `value` among the kept evaluations; the one it pushes out is deleted at the
        end of the step. Returns `tag` when this evaluation is kept."""
        k = self.config.save_top_k
        if not k or math.isnan(value):
            return None
        ranked = sorted([*self.top_k, (value, tag)], key=lambda entry: entry[0], reverse=self.higher_is_better)
        self.top_k = ranked[:k]
        for _, dropped in ranked[k:]:
            if dropped != tag:
                self.context.checkpoints.delete(dropped)
        return tag if (value, tag) in self.top_k else None

    def _save(self, top_k_tag: str | None) -> None:
        """Ask for the new best at the end of the step, with every tolerance not yet exceeded (and its
        top-k tag) as second names of the same files (written once; their stamped `checkpoint_tag` is the
        best tag)."""
        open_tolerances = tuple(self.tolerance_tag(t) for t in self.tolerances if not self.tolerances_is_exceeded[t])
        self._save_weights(self.best_tag, aliases=open_tolerances + ((top_k_tag,) if top_k_tag else ()))

    def _save_weights(self, tag: str, aliases: tuple[str, ...] = ()) -> None:
        self.context.checkpoints.request(
            SaveRequest(
                tag,
                model_names=None if self.model_names is None else tuple(self.model_names),
                save_frozen_weights=self.save_frozen_weights,
                aliases=aliases,
            )
        )

    def _evaluate_children(self, update_counter: UpdateCounter) -> None:
        for child in self.eval_callbacks:
            child.at_eval(update_counter=update_counter)

    def _check_config_against_other_callbacks(self) -> None:
        """Fail at start-up when two callbacks would write the same best files, or when no callback
        listed before this one can log the metric (a callback that cannot say defers that check to
        the first invocation)."""
        callbacks = self.context.trainer.callbacks
        if self not in callbacks:
            return  # nested in another callback, which decides when it runs
        position = callbacks.index(self)
        for other in callbacks[:position]:
            if isinstance(other, BestCheckpointCallback) and other.best_tag == self.best_tag:
                raise ConfigError(
                    f"{other.state_key} and {self.state_key} both watch '{self.metric_key}' and would overwrite each "
                    f"other's {self.best_tag} files; keep one"
                )
        check_metric_logged_before(self, self.metric_key)
