"""What every callback is: config, lifecycle hooks, state for checkpoints."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import PositiveFloat, PositiveInt, model_validator

from noether.core.callbacks.context import CallbackContext
from noether.core.checkpoint_store import Member
from noether.core.config import ConfigError, RegistryConfig
from noether.core.utils.training.counter import UpdateCounter

SCHEDULE_FIELDS = ("every_n_epochs", "every_n_updates", "every_n_samples", "every_n_seconds")


class CallBackBaseConfig(RegistryConfig):
    """Config of any callback: when it runs and under which key its state is checkpointed."""

    id: str | None = None
    name: str | None = None
    every_n_epochs: PositiveInt | None = None
    every_n_updates: PositiveInt | None = None
    every_n_samples: PositiveInt | None = None
    every_n_seconds: PositiveFloat | None = None
    """After the first update at which this much training time has passed since it last ran."""
    batch_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_schedule(self) -> CallBackBaseConfig:
        given = [field for field in SCHEDULE_FIELDS if getattr(self, field) is not None]
        if len(given) != 1:
            found = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(f"set exactly one of {', '.join(SCHEDULE_FIELDS)} ({found})")
        if self.every_n_samples is not None and self.batch_size is None:
            raise ValueError("every_n_samples requires batch_size")
        return self


def nested_metric_prefixes(children: list[CallbackBase], prefix: str) -> list[str] | None:
    """What children log under a parent's key prefix; None if any child cannot say."""
    prefixes: list[str] = []
    for child in children:
        logged = child.logged_metric_prefixes()
        if logged is None:
            return None
        prefixes += [prefix + key for key in logged]
    return prefixes


def logged_value(callback: CallbackBase, metric_key: str) -> float:
    """The value of `metric_key` logged at this step by a callback that ran before `callback`."""
    log_cache = callback.context.log_writer.log_cache
    if metric_key not in log_cache:
        logged = ", ".join(sorted(log_cache)) or "nothing"
        raise KeyError(
            f"{callback.state_key}: metric '{metric_key}' was not logged at this step (logged: {logged}); "
            "it must come from a callback listed before this one that runs at the same or a higher frequency"
        )
    return float(log_cache[metric_key])


def check_metric_logged_before(callback: CallbackBase, metric_key: str) -> None:
    """Fail at start-up when no callback listed before `callback` can log `metric_key`, which it reads
    at the same step (a callback that cannot say what it logs defers that check to the first read)."""
    callbacks = callback.context.trainer.callbacks
    if callback not in callbacks:
        return  # nested in another callback, which decides when it runs
    position = callbacks.index(callback)
    prefixes: list[str] = []
    for other in callbacks[:position]:
        logged = other.logged_metric_prefixes()
        if logged is None:
            return
        prefixes += logged
    if any(metric_key.startswith(prefix) for prefix in prefixes):
        return
    later = [
        other.state_key
        for other in callbacks[position + 1 :]
        if any(metric_key.startswith(prefix) for prefix in other.logged_metric_prefixes() or [])
    ]
    hint = (
        f"{later[0]} logs it but is listed after this callback; move it before"
        if later
        else "add one that does (e.g. an OfflineLossCallback) before this callback"
    )
    raise ConfigError(
        f"{callback.state_key}.metric_key: no callback listed before it logs '{metric_key}' "
        f"(they log: {', '.join(f'{p}*' for p in prefixes)}); {hint}"
    )


class CallbackBase:
    """Hooks the trainer calls around training. All hooks run under torch.no_grad()."""

    def __init__(self, callback_config: CallBackBaseConfig, context: CallbackContext) -> None:
        self.config = callback_config
        self.context = context
        self.logger = logging.getLogger(f"noether.callbacks.{self.state_key}")

    @property
    def state_key(self) -> str:
        """Key of this callback's state in the trainer checkpoint: its `id`, else its class name."""
        return self.config.id or type(self).__name__

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        """Called once before the first update (also on resume)."""

    def after_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        """Called once when training ends, by its limit or by a signal."""

    def get_children(self) -> list[CallbackBase]:
        """Callbacks owned by this one whose data the trainer must serve on the shared sampler."""
        return []

    def logged_metric_prefixes(self) -> list[str] | None:
        """Prefixes of every metric key this callback may log; None when it cannot say (checked at start-up
        by callbacks that read metrics, such as the best-checkpoint one)."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """Small state saved in the trainer checkpoint; None for stateless callbacks."""
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict returned."""

    def resume_from_checkpoint(self, *, checkpoint_tag: str, update_counter: UpdateCounter) -> None:
        """Restore large state kept in files of its own (e.g. EMA weights) from checkpoint_tag."""

    def checkpoint_members(self, *, checkpoint_tag: str, update_counter: UpdateCounter) -> dict[Member, dict[str, Any]]:
        """Large state of its own (e.g. EMA weights) to write with every trainer checkpoint, as
        {member: payload with a `state_dict`}; it is saved as part of the checkpoint's all-or-nothing set."""
        return {}
