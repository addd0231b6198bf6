"""Callbacks that run on a schedule of epochs, updates, samples or seconds of training."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch

from noether.core.callbacks.base import CallbackBase, CallBackBaseConfig
from noether.core.callbacks.schedule import Schedule
from noether.core.utils.training.counter import UpdateCounter

IntervalType = Literal["epoch", "update", "sample", "eval"]


class EvaluationInterrupted(BaseException):  # noqa: N818 - a stop, not an error: not caught by `except Exception`
    """A signal asked every rank to stop during a data pass: the step's hooks are abandoned and run again
    on resume, from the state the trainer captured before them."""


class PeriodicCallback(CallbackBase):
    """Runs `periodic_callback` on its schedule (every n epochs, updates, samples or seconds) and on `at_eval`."""

    config: CallBackBaseConfig

    def __init__(self, callback_config: CallBackBaseConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.schedule = Schedule.of(callback_config)
        self.last_fired_seconds = 0.0
        """Training seconds when an `every_n_seconds` schedule last fired (kept in the trainer state)."""

    def is_due_after_update(self, update_counter: UpdateCounter) -> bool:
        return self.schedule.due_after_update(
            update_counter.update,
            update_counter.sample,
            update_counter.effective_batch_size,
            update_counter.training_seconds - self.last_fired_seconds,
        )

    def is_due_after_epoch(self, update_counter: UpdateCounter) -> bool:
        return self.schedule.due_after_epoch(update_counter.epoch, update_counter.is_full_epoch)

    @property
    def update_interval_type(self) -> IntervalType:
        return "sample" if self.config.every_n_samples is not None else "update"

    def track_after_accumulation_step(self, *, update_counter: UpdateCounter, losses: dict[str, Any], **kwargs: Any) -> None:
        """Called after every forward/backward of a micro-batch, e.g. to accumulate losses.

        Keep what an update adds here out of `state_dict()` until `track_after_update_step`: an update
        can still fail after this call, and its error checkpoint must hold whole updates only.
        """

    def track_after_update_step(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        """Called after every optimizer update, whatever the schedule (keep it cheap)."""

    def track_after_skipped_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        """Called instead of `track_after_update_step` after an update whose loss was not finite and whose
        gradients were dropped (`trainer.on_nonfinite_loss: skip`): forget what `track_after_accumulation_step`
        kept of it."""

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if self.is_due_after_update(update_counter):
            self.last_fired_seconds = update_counter.training_seconds
            self.periodic_callback(interval_type=self.update_interval_type, update_counter=update_counter, **kwargs)

    def after_epoch(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if self.is_due_after_epoch(update_counter):
            self.periodic_callback(interval_type="epoch", update_counter=update_counter, **kwargs)

    def at_eval(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        """Run once regardless of the schedule, on a model loaded from a checkpoint."""
        self.periodic_callback(interval_type="eval", update_counter=update_counter, **kwargs)

    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter, **kwargs: Any) -> None:
        """The callback's work; subclasses override this."""


class PeriodicDataIteratorCallbackConfig(CallBackBaseConfig):
    dataset_key: str


class PeriodicDataIteratorCallback(PeriodicCallback):
    """A periodic callback that makes one pass over a dataset: `process_data` per batch, then
    `process_results` once with the per-batch results concatenated over the whole dataset.

    In training, batches come from the trainer's shared loader (`data_iter`), where the
    interleaved sampler placed them; without one (eval command, dispatch on an event, or an
    `every_n_seconds` schedule) the callback builds a loader of its own on first use.
    """

    config: PeriodicDataIteratorCallbackConfig

    def __init__(self, callback_config: PeriodicDataIteratorCallbackConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.dataset_key = callback_config.dataset_key
        self._own_loader: Any = None

    @property
    def eval_batch_size(self) -> int:
        return self.config.batch_size or self.context.trainer.micro_batch_size

    @property
    def dataset(self) -> Any:
        return self.context.data.get(self.dataset_key)

    def periodic_callback(
        self, *, interval_type: IntervalType, update_counter: UpdateCounter, data_iter: Any = None, **kwargs: Any
    ) -> None:
        if self.schedule.is_timed:
            data_iter = None  # the shared loader cannot know in advance after which update a timed pass is due
        model = self.context.model
        was_training = model.training
        model.eval()
        trainer = self.context.trainer
        results = []
        try:
            for batch in self._batches(data_iter):
                results.append(self.process_data(batch, trainer_model=model))
                if trainer.evaluation_interrupted():
                    raise EvaluationInterrupted(
                        f"{self.state_key} stopped after {len(results)} batch(es) of '{self.dataset_key}'"
                    )
        finally:
            model.train(was_training)
        collated = gather_results(collate_results(results), len(self.dataset), self.context.world_size)
        self.process_results(collated, interval_type=interval_type, update_counter=update_counter)

    def process_data(self, batch: Any, *, trainer_model: Any) -> Any:
        """Result of one batch: a tensor, or dict/list/tuple of tensors, with the batch as first dimension."""
        raise NotImplementedError

    def process_results(self, results: Any, *, interval_type: IntervalType, update_counter: UpdateCounter) -> None:
        """Use the results over the whole dataset (e.g. log a mean)."""
        raise NotImplementedError

    def _batches(self, data_iter: Any) -> Iterator[Any]:
        if data_iter is None:
            yield from self._own_data_loader()
            return
        from noether.data.samplers.interleaved import evaluation_batches

        count = len(evaluation_batches(len(self.dataset), self.eval_batch_size, self.context.rank, self.context.world_size))
        for _ in range(count):
            dataset_key, batch = next(data_iter)
            if dataset_key != self.dataset_key:
                raise RuntimeError(
                    f"{self.state_key} expected a batch of '{self.dataset_key}' from the shared loader but got "
                    f"'{dataset_key}': it was dispatched at a step the interleaved sampler did not schedule (a callback "
                    "owned by another reads the shared loader only if its parent lists it in get_children())"
                )
            yield batch

    def _own_data_loader(self) -> Any:
        from torch.utils.data import DataLoader

        from noether.data.samplers.interleaved import evaluation_batches

        if self._own_loader is None:
            trainer = self.context.trainer
            batches = evaluation_batches(len(self.dataset), self.eval_batch_size, self.context.rank, self.context.world_size)
            self._own_loader = DataLoader(
                self.dataset,
                batch_sampler=batches,
                num_workers=trainer.num_workers,
                # without a generator of its own, each pass would draw from the global RNG and so
                # change the dropout of every later training step
                generator=torch.Generator().manual_seed(trainer.seed),
            )
        return self._own_loader


def collate_results(results: list[Any]) -> Any:
    """Concatenate per-batch results along the batch dimension, keeping their structure."""
    if not results:
        raise ValueError("no batches to collate results from: the dataset is empty")
    first = results[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            # without a batch dimension the padding of distributed evaluation could not be dropped
            raise ValueError("process_data must return one entry per sample (batch as first dimension), not a scalar")
        return torch.cat(results)
    if isinstance(first, dict):
        return {key: collate_results([result[key] for result in results]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(collate_results(list(items)) for items in zip(*results))
    raise TypeError(f"process_data must return tensors, or dicts/lists/tuples of tensors, not {type(first).__name__}")


def gather_results(results: Any, dataset_size: int, world_size: int) -> Any:
    """Results over the whole dataset: gathered from all ranks, distributed padding dropped."""
    if isinstance(results, dict):
        return {key: gather_results(value, dataset_size, world_size) for key, value in results.items()}
    if isinstance(results, (list, tuple)):
        return type(results)(gather_results(value, dataset_size, world_size) for value in results)
    if world_size == 1:
        return results[:dataset_size]
    import torch.distributed as dist

    gathered = [torch.empty_like(results) for _ in range(world_size)]
    dist.all_gather(gathered, results.contiguous())
    # rank r holds positions r, r + world_size, ...: interleave back into dataset order
    return torch.stack(gathered, dim=1).reshape(-1, *results.shape[1:])[:dataset_size]
