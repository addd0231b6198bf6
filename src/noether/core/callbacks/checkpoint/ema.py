"""Exponential moving averages of the weights: updated every step, checkpointed, evaluated by child callbacks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from noether.core.callbacks.base import CallbackBase, CallBackBaseConfig, nested_metric_prefixes
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.checkpointing import stamp
from noether.core.config import ConfigError, build, by_kind
from noether.core.models.base import ModelBase
from noether.core.models.ema import ModuleEma
from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import load_checkpoint


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
            self._save(str(update_counter.cur_iteration), update_counter)
        if self.config.save_latest_weights:
            self._save("latest", update_counter)

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if self.config.save_last_weights:
            self._save("last", update_counter)
        for child in self.get_children():
            child.after_training(update_counter=update_counter, **kwargs)

    def checkpoint_files(self, *, checkpoint_tag: str, update_counter: UpdateCounter) -> dict[Path, dict[str, Any]]:
        return self._payloads(checkpoint_tag, update_counter)

    def resume_from_checkpoint(self, *, checkpoint_tag: str, update_counter: UpdateCounter) -> None:
        """Load the EMA of the resumed iteration, else the later of `latest` and `last`, else keep the live weights.

        The EMA of the resumed iteration is the file under `checkpoint_tag` or under the iteration's own tag, if it
        was written at that iteration: `latest` is also overwritten on the EMA's own schedule, so it may hold a
        later EMA than the `latest` trainer checkpoint.
        """
        self._build_emas()
        iteration = update_counter.cur_iteration
        for path, ema in self.emas.items():
            for factor in self.target_factors:
                exact = [self._file(path, factor, tag) for tag in dict.fromkeys([checkpoint_tag, str(iteration)])]
                fallbacks = [self._file(path, factor, tag) for tag in ("latest", "last")]
                found = self._written_at(exact, iteration) or self._latest_written(fallbacks)
                if found is None:
                    looked_for = ", ".join(candidate.name for candidate in exact + fallbacks)
                    self.logger.warning(
                        f"no EMA weights found (looked for {looked_for}); EMA {factor} starts from the live weights"
                    )
                    continue
                file, payload = found
                ema.load_state_dict(factor, payload["state_dict"])
                written_at = TrainingIteration.from_dict(payload["training_iteration"])
                if written_at != iteration:
                    looked_for = ", ".join(candidate.name for candidate in exact)
                    self.logger.warning(
                        f"no EMA weights written at {iteration} (looked for {looked_for}); EMA {factor} resumed from "
                        f"{file.name}, written at {written_at}, so it differs from an uninterrupted run's"
                    )

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

    def _file(self, path: str | None, factor: float, tag: str) -> Path:
        return self.context.paths.checkpoint_file(self._file_model_name(path), tag, "model", ema_factor=factor)

    def _file_model_name(self, path: str | None) -> str:
        return self.context.model.name if path is None else f"{self.context.model.name}.{path}"

    def _save(self, tag: str, update_counter: UpdateCounter) -> None:
        """Write every EMA under `tag` on its own schedule (checkpoints of the trainer include them anyway)."""
        if self.context.is_main_process:
            for file, payload in self._payloads(tag, update_counter).items():
                self.context.checkpoint_writer.save(file, payload)

    def _payloads(self, tag: str, update_counter: UpdateCounter) -> dict[Path, dict[str, Any]]:
        run_id = self.context.paths.run_id
        payloads = {}
        for path, ema in self.emas.items():
            module = ema.module
            for factor in self.target_factors:
                payload = {"state_dict": ema.state_dict(factor), **stamp(tag, update_counter.cur_iteration, run_id)}
                if isinstance(module, ModelBase):
                    payload["model_config"] = module.config.model_dump(mode="json")
                payloads[self._file(path, factor, tag)] = payload
        return payloads

    @staticmethod
    def _written_at(files: list[Path], iteration: TrainingIteration) -> tuple[Path, dict[str, Any]] | None:
        """The first of `files` that exists and was written at `iteration`, with its payload."""
        for file in files:
            if file.exists():
                payload = load_checkpoint(file)
                if TrainingIteration.from_dict(payload["training_iteration"]) == iteration:
                    return file, payload
        return None

    @staticmethod
    def _latest_written(files: list[Path]) -> tuple[Path, dict[str, Any]] | None:
        """Of `files` that exist, the one written at the latest training iteration (the first on a tie), with its payload."""
        existing = [(file, load_checkpoint(file)) for file in files if file.exists()]
        if not existing:
            return None
        return max(existing, key=lambda item: TrainingIteration.from_dict(item[1]["training_iteration"]))


def _child_config_for_factor(child_config: CallBackBaseConfig, factor: float) -> CallBackBaseConfig:
    """The child's config with an id of its own per factor, so stateful children keep apart in checkpoints."""
    own_id = child_config.id or type(child_config).configured_class().__name__
    return child_config.model_copy(update={"id": f"ema={factor}/{own_id}"})
