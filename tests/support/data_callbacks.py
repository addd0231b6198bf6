"""Test-only trainers and callbacks for the data and evaluation tests.

Configs name them by `kind: tests.support.data_callbacks.<Class>`.
"""

from __future__ import annotations

from typing import Any

import torch

from noether.core.callbacks.base import CallbackBase, CallBackBaseConfig
from noether.core.callbacks.periodic import IntervalType, PeriodicCallback
from noether.core.config import by_kind
from noether.core.models.base import ModelBase, build_model
from noether.core.providers.path import PathProvider
from noether.core.utils.training.counter import UpdateCounter
from noether.training.run import parse_run_config
from noether.training.trainers.classification import ClassificationTrainer, ClassificationTrainerConfig

TRAINING_BATCHES_FILE = "training_batches.th"


def model_from_checkpoint(tree: dict[str, Any], paths: PathProvider, tag: str) -> ModelBase:
    """The config's model with the weights of checkpoint `tag`, in eval mode: what evaluation callbacks saw."""
    model = build_model(parse_run_config(tree).model)
    payload = torch.load(paths.checkpoint_file(model.name, tag, "model"), weights_only=True)
    model.load_state_dict(payload["state_dict"])
    return model.eval()


class RecordingClassificationTrainerConfig(ClassificationTrainerConfig):
    pass


class RecordingClassificationTrainer(ClassificationTrainer):
    """Writes every training batch it saw to `{run_dir}/training_batches.th`, so tests can compare runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training_batches: list[dict[str, torch.Tensor]] = []

    def train_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.training_batches.append({key: value.clone() for key, value in batch.items()})
        return super().train_step(model, batch)

    def evaluation_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return super().train_step(model, batch)  # evaluation batches are not training batches

    def train(self, resume_tag: str | None = None, **kwargs: Any) -> UpdateCounter:
        counter = super().train(resume_tag, **kwargs)
        torch.save(self.training_batches, self.context.paths.run_dir / TRAINING_BATCHES_FILE)
        return counter


class MultiTermClassificationTrainerConfig(ClassificationTrainerConfig):
    pass


class MultiTermClassificationTrainer(ClassificationTrainer):
    """Returns loss terms besides `total`: `cross_entropy` (equal to total) and `logit_norm`."""

    def train_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["x"])
        cross_entropy = torch.nn.functional.cross_entropy(logits, batch["y"])
        return {"total": cross_entropy, "cross_entropy": cross_entropy, "logit_norm": logits.norm(dim=-1).mean()}

    def evaluation_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.train_step(model, batch)  # batch means: the offline loss weights them by batch size


class ForwardingParentCallbackConfig(CallBackBaseConfig):
    eval_callbacks: list[by_kind(CallBackBaseConfig)] = []


class ForwardingParentCallback(PeriodicCallback):
    """Owns children that run at their own schedule (like the EMA callback): it hands every hook,
    with the shared loader, on to them and lists them in `get_children` so the sampler serves them."""

    config: ForwardingParentCallbackConfig

    def __init__(self, callback_config: ForwardingParentCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        child_context = context.with_log_prefix("parent/")
        self.children = [type(config).configured_class()(config, child_context) for config in callback_config.eval_callbacks]

    def get_children(self) -> list[CallbackBase]:
        return self.children

    def before_training(self, **kwargs: Any) -> None:
        for child in self.children:
            child.before_training(**kwargs)

    def after_update(self, **kwargs: Any) -> None:
        for child in self.children:
            child.after_update(**kwargs)

    def after_epoch(self, **kwargs: Any) -> None:
        for child in self.children:
            child.after_epoch(**kwargs)


class EventParentCallbackConfig(CallBackBaseConfig):
    eval_callbacks: list[by_kind(CallBackBaseConfig)] = []


class EventParentCallback(PeriodicCallback):
    """Runs its children when it fires itself (like the best-checkpoint callback on a new best):
    they read a loader of their own, so `get_children` does not list them."""

    config: EventParentCallbackConfig

    def __init__(self, callback_config: EventParentCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        child_context = context.with_log_prefix("event/")
        self.children = [type(config).configured_class()(config, child_context) for config in callback_config.eval_callbacks]

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        for child in self.children:
            child.at_eval(update_counter=update_counter)


class UnlistedChildrenParentCallbackConfig(ForwardingParentCallbackConfig):
    pass


class UnlistedChildrenParentCallback(ForwardingParentCallback):
    """A parent that hands the shared loader to its children but forgets to list them in `get_children`."""

    def get_children(self) -> list[CallbackBase]:
        return []


class UndispatchedChildrenParentCallbackConfig(ForwardingParentCallbackConfig):
    pass


class UndispatchedChildrenParentCallback(ForwardingParentCallback):
    """A parent that lists its children in `get_children` but never hands them the shared loader."""

    def after_update(self, **kwargs: Any) -> None:
        pass

    def after_epoch(self, **kwargs: Any) -> None:
        pass
