"""The training loop. Read it top to bottom: `train` is the whole story.

A subclass defines `train_step` (the losses of one batch); everything else — batching and
gradient accumulation, mixed precision, callbacks, checkpoints, resume and signals — is here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from torch.utils.data import DataLoader

from noether.core import distributed, fsdp
from noether.core.callbacks.base import CallbackBase, CallBackBaseConfig
from noether.core.callbacks.context import CallbackContext
from noether.core.callbacks.default import (
    LearningRateCallback,
    LearningRateCallbackConfig,
    ProgressCallback,
    ProgressCallbackConfig,
    TrainingLossCallback,
    TrainingLossCallbackConfig,
)
from noether.core.callbacks.periodic import EvaluationInterrupted, PeriodicCallback, PeriodicDataIteratorCallback
from noether.core.checkpoint_store import Member
from noether.core.checkpointing import capture_rng_states, restore_rng_states
from noether.core.config import ConfigError, RegistryConfig, build, by_kind
from noether.core.models.base import ModelBase, apply_initializers
from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointLoadError
from noether.data.samplers.interleaved import (
    TRAIN_KEY,
    InterleavedDataset,
    InterleavedSampler,
    TrainingBatching,
    collate_tagged,
)
from noether.training.trainers.clock import TrainingClock
from noether.training.trainers.deadline import Deadline
from noether.training.trainers.nonfinite import SKIPPED_UPDATES_KEY, NonFiniteLossError, NonFiniteLossGuard, OnNonfiniteLoss

logger = logging.getLogger("noether.trainer")

TRAINING_LIMITS = ("max_epochs", "max_updates", "max_samples")
Precision = Literal["float32", "bfloat16", "float16"]
_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing
REDO_STEP_HOOKS = "redo_step_hooks"
"""Trainer-state part: True in an interrupt checkpoint taken while a signal cut the step's evaluations."""
PER_STEP_HOOKS = ("track_after_accumulation_step", "track_after_update_step", "track_after_skipped_update")


class NothingLeftToTrainError(ConfigError):
    """The checkpoint to resume from is past the end of training."""


class BaseTrainerConfig(RegistryConfig):
    max_epochs: PositiveInt | None = None
    max_updates: PositiveInt | None = None
    max_samples: PositiveInt | None = None
    effective_batch_size: PositiveInt
    max_batch_size: PositiveInt | None = None
    precision: Precision = "float32"
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: `ddp` replicates each model, `fsdp` shards it (FSDP2) and writes sharded checkpoints."""
    shard_module_classes: list[str] | None = None
    """Under `fsdp`: the module classes sharded as units (e.g. a transformer block); default: each direct child."""
    num_workers: NonNegativeInt = 0
    log_every_n_updates: PositiveInt | None = None
    max_grad_norm: PositiveFloat | None = None
    """Clip the gradients of all trained parameters to this total norm before each optimizer step (logged as `grad_norm`)."""
    stop_before: PositiveFloat | Literal["slurm"] | None = None
    """A Unix time (or `slurm`: the job's SLURM_JOB_END_TIME) before which the run writes an interrupt checkpoint
    and stops on its own: when the time left is less than the last save took, plus the longest step, plus 30 s."""
    on_nonfinite_loss: OnNonfiniteLoss = "stop"
    """A NaN or infinite loss: `stop` before that update's optimizer step (with an error checkpoint of the state
    before it), or `skip` the update (its gradients dropped, counted as `nonfinite/skipped_updates`)."""
    callbacks: list[by_kind(CallBackBaseConfig)] = []

    @model_validator(mode="after")
    def _one_limit(self) -> BaseTrainerConfig:
        given = [name for name in TRAINING_LIMITS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(TRAINING_LIMITS)} (got {', '.join(given) or 'none'})")
        return self


class BaseTrainer:
    """Trains `context.model` on the `train` dataset and runs the configured callbacks in order."""

    def __init__(
        self, trainer_config: BaseTrainerConfig, context: CallbackContext, *, seed: int = 0, device: str = "cpu"
    ) -> None:
        self.config = trainer_config
        self.context = context
        self.seed = seed
        self.device = torch.device(device)
        self.num_workers = trainer_config.num_workers
        context.trainer = self
        self.batching = TrainingBatching(
            dataset_size=len(context.data.get(TRAIN_KEY)),
            effective_batch_size=trainer_config.effective_batch_size,
            micro_batch_size=min(
                trainer_config.max_batch_size or trainer_config.effective_batch_size,
                trainer_config.effective_batch_size // context.world_size,
            ),
            world_size=context.world_size,
            rank=context.rank,
        )
        self.micro_batch_size = self.batching.micro_batch_size
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=trainer_config.precision == "float16")
        self.callbacks = self._build_callbacks()
        self.stop_requested: str | None = None
        self.early_stop: str | None = None
        """Why a callback ended training before its limit (a run stopped so has finished)."""
        self.grad_norm: torch.Tensor | None = None
        """The total gradient norm of the last update, before clipping (with max_grad_norm)."""
        self.nonfinite = NonFiniteLossGuard(trainer_config.on_nonfinite_loss)
        self.deadline = Deadline.from_config(trainer_config.stop_before)
        timed = [c for c in self.all_callbacks() if isinstance(c, PeriodicCallback) and c.schedule.is_timed]
        self.clock = TrainingClock(timed)
        self._update_boundary_rng: tuple | None = None  # torch's RNG before the update that is under way
        self.finishing = False  # the loop is left: a signal stops only after_training's data passes
        self._redo_step_hooks = False  # set by a resume from a checkpoint whose step's evaluations a signal cut
        # the trainer state before hooks that do something (a step's, after_training), while they run: a
        # signal stops a data pass among them, and a failure in a step's hooks saves this state for a resume
        # that runs them again
        self._before_hooks: dict[str, Any] | None = None
        self._receivers_by_hook: dict[tuple[str, bool], list[CallbackBase]] = {}
        self._register_checkpoint_state()

    # ----------------------------------------------------------------------------- the step
    def train_step(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Losses of one batch as a dict of scalar tensors; `total` is the one that is optimized."""
        raise NotImplementedError

    def evaluation_step(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Losses of one batch without gradients, for offline loss callbacks: scalars, or one value per
        sample (exact dataset means also when distributed evaluation pads the last batch)."""
        return self.train_step(model, batch)

    def move_to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {key: self.move_to_device(value) for key, value in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.move_to_device(value) for value in batch)
        return batch

    def autocast(self) -> contextlib.AbstractContextManager:
        precision = self.config.precision
        if precision == "float32":
            return _NO_CONTEXT
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ----------------------------------------------------------------------------- the loop
    def train(
        self, resume_tag: str | None = None, *, skip_if_finished: bool = False, on_start: Callable[[], None] | None = None
    ) -> UpdateCounter:
        """Train from scratch or from checkpoint `resume_tag`. With `skip_if_finished` (a resume that did not
        name its checkpoint, e.g. a relaunch of a finished job), a run that has finished ends at once, before
        anything of it is read back or changed. `on_start` runs once the run is set up (its checkpoint
        loaded, on a resume), before the first update."""
        model = self.context.model.to(self.device)
        checkpoints = self.context.checkpoints
        if self.config.parallelism == "fsdp":  # before the optimizers: sharding replaces the parameters
            fsdp.shard_model(model, precision=self.config.precision, shard_classes=self.config.shard_module_classes)
        counter = self.create_update_counter(TrainingIteration())
        model.initialize_optimizers(counter.end_update)
        if resume_tag is None:
            apply_initializers(model, self.context.paths.output_path)
        else:
            finished = self._finished_at(resume_tag) if skip_if_finished else None
            if finished is not None:
                logger.info(
                    f"run {self.context.paths.run_id} has finished (checkpoint 'last' at {finished.cur_iteration}): nothing left to do"
                )
                return finished
            counter = self._resume(resume_tag)
        if on_start is not None:
            on_start()
        trainer_model = self.wrap_for_training(model)
        model.train()
        self._log_start(counter)
        if not any(
            getattr(c.config, "save_optim", False) or getattr(c.config, "save_latest_optim", False) for c in self.all_callbacks()
        ):
            logger.warning("no callback saves optimizer state: only interrupt and error checkpoints of this run can be resumed")
        data_iter = iter(self._data_loader(counter))
        counter.training_seconds = self.clock.start()
        self._dispatch("before_training", update_counter=counter)
        if resume_tag is not None:
            self._dispatch("resume_from_checkpoint", checkpoint_tag=resume_tag, update_counter=counter)

        with self._stop_on_signals():
            # every rank leaves the loop on the value all ranks agreed on, never on a flag a signal set
            # after the last agreement: one rank would otherwise gather for the interrupt save while
            # another runs the next update
            stop_agreed = evaluations_interrupted = False
            try:
                if self._redo_step_hooks:  # a signal cut the evaluations of this step: they run again
                    self._end_step(counter, data_iter=None)
                while not counter.is_finished and not stop_agreed and self.early_stop is None:
                    if self.deadline is not None:
                        self.deadline.step_started()
                    stepped = self._train_update(model, trainer_model, data_iter, counter)
                    counter.training_seconds = self.clock.read()
                    tracking_hook = "track_after_update_step" if stepped else "track_after_skipped_update"
                    self._dispatch(tracking_hook, update_counter=counter, periodic_only=True)
                    self._before_hooks = checkpoints.capture() if self._hooks_due(counter) else None
                    try:
                        self._end_step(counter, data_iter)
                    except EvaluationInterrupted as interruption:
                        assert self._before_hooks is not None  # only then does a data pass ask to stop
                        self._stop_during_evaluations(counter, self._before_hooks, interruption, redo_step_hooks=True)
                        evaluations_interrupted, self._before_hooks = True, None
                        break
                    self._before_hooks = None
                    if self.deadline is not None and self.stop_requested is None:
                        self.stop_requested = self.deadline.reason_to_stop(checkpoints.last_save_seconds)
                    stop_agreed = distributed.any_rank(self.stop_requested is not None)
                    if stop_agreed and self.stop_requested is None:
                        self.stop_requested = "a signal to another process"
                if stop_agreed and not counter.is_finished and self.early_stop is None:
                    logger.info(f"stopping on {self.stop_requested} after update {counter.update}")
                    checkpoints.save_interrupt(counter)
            except BaseException as error:
                boundary = self._update_boundary_rng  # set while an update is under way: forget its partial draws
                undo_partial_update = None if boundary is None else functools.partial(_restore_torch_rng_states, boundary)
                # a non-finite loss stops every process at the same update: all of them can write the error set
                every_rank = isinstance(error, NonFiniteLossError)
                # a failure in the hooks of a step whose prior state was captured: the resume runs them again
                captured = None if self._before_hooks is None else {**self._before_hooks, REDO_STEP_HOOKS: True}
                checkpoints.save_on_failure(
                    counter, error, before_update=undo_partial_update, every_rank=every_rank, captured=captured
                )
                raise

            if evaluations_interrupted:
                return counter
            # signals from here on only ask for what happens anyway: the final checkpoints, complete; a data
            # pass of after_training stops, and the resume of its interrupt checkpoint runs after_training again
            self.finishing = True
            self._before_hooks = checkpoints.capture()
            try:
                self._dispatch("after_training", update_counter=counter)
            except EvaluationInterrupted as interruption:
                self._stop_during_evaluations(counter, self._before_hooks, interruption, redo_step_hooks=False)
                return counter
            finally:
                self._before_hooks = None
            self.context.log_writer.flush(counter)
            checkpoints.flush(counter)
            checkpoints.wait()
        return counter

    def _end_step(self, counter: UpdateCounter, data_iter: Any) -> None:
        """The hooks after an update, then its metrics row and checkpoints."""
        self._dispatch("after_update", update_counter=counter, data_iter=data_iter, periodic_only=True)
        if counter.is_full_epoch:
            self._dispatch("after_epoch", update_counter=counter, data_iter=data_iter, periodic_only=True)
        self.context.log_writer.flush(counter)
        self.context.checkpoints.flush(counter)
        self.context.checkpoints.check()

    def _hooks_due(self, counter: UpdateCounter) -> bool:
        """Whether anything runs after this update (a due callback, a metrics row to write): then the state
        before the step's hooks is captured, so that a failure in them, or a signal during a data pass among
        them, is resumed by running them all again. Steps with nothing due (most, unless a row is logged every
        update) pay nothing."""
        if self.context.log_writer.log_cache:
            return True
        return any(
            isinstance(callback, PeriodicCallback)
            and (callback.is_due_after_update(counter) or (counter.is_full_epoch and callback.is_due_after_epoch(counter)))
            for callback in self.callbacks
        )

    def _stop_during_evaluations(
        self,
        counter: UpdateCounter,
        before_evaluations: dict[str, Any],
        interruption: EvaluationInterrupted,
        *,
        redo_step_hooks: bool,
    ) -> None:
        """The interrupt checkpoint of hooks whose evaluations a signal cut: the trainer state captured before
        them, so that a resume runs them all again (a step's hooks when marked, else after_training, which a
        run without `last` runs anyway); nothing they logged or asked to save is kept."""
        checkpoints = self.context.checkpoints
        checkpoints.discard_step()
        self.context.log_writer.discard_step()
        tag = checkpoints.save_interrupt(counter, {**before_evaluations, REDO_STEP_HOOKS: redo_step_hooks})
        checkpoints.wait()
        hooks = f"the evaluations after update {counter.update}" if redo_step_hooks else "the evaluations of after_training"
        logger.info(f"stopping on {self.stop_requested} during {hooks} ({interruption}); a resume from '{tag}' runs them again")

    def wrap_for_training(self, model: ModelBase) -> torch.nn.Module:
        """The module `train_step` calls: DistributedDataParallel under torchrun, else the model itself
        (also when sharded: FSDP works inside the model's own modules)."""
        if not distributed.is_distributed() or self.config.parallelism == "fsdp":
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def _train_update(
        self, model: ModelBase, trainer_model: torch.nn.Module, data_iter: Iterator, counter: UpdateCounter
    ) -> bool:
        """Accumulate gradients over the micro-batches of one update, then step every optimizer. False: the
        update was skipped (a non-finite loss under `on_nonfinite_loss: skip`), its gradients dropped."""
        model.set_learning_rates(counter.update)
        # what an error checkpoint restores if the update fails half done (Python's and NumPy's generators
        # restart per batch, and callbacks keep an update's losses out of their state until it completes)
        self._update_boundary_rng = _torch_rng_states(self.device)
        self.nonfinite.begin_update(model)
        local_batch_size = self.batching.local_batch_size
        steps = self.batching.accumulation_steps
        scaling = self.grad_scaler.is_enabled()
        for step in range(steps):
            dataset_key, batch = next(data_iter)
            if dataset_key != TRAIN_KEY:
                raise RuntimeError(
                    f"expected a training batch but got one of '{dataset_key}': an evaluation pass the sampler "
                    "scheduled was not consumed (a parent lists a child in get_children() but did not dispatch it)"
                )
            batch = self.move_to_device(batch)
            # gradients are averaged over processes once per update, on its last micro-batch
            synchronize = step == steps - 1 or not distributed.is_distributed()
            with _NO_CONTEXT if synchronize else self._no_gradient_sync(trainer_model):
                with self.autocast():
                    losses = self.train_step(trainer_model, batch)
                # one micro-batch is the whole local batch; of several, the last may be shorter
                weight = _batch_length(batch) / local_batch_size if steps > 1 else 1.0
                loss = losses["total"] if weight == 1.0 else losses["total"] * weight
                (self.grad_scaler.scale(loss) if scaling else loss).backward()
            self.nonfinite.track(losses)
            self._dispatch(
                "track_after_accumulation_step", update_counter=counter, losses=losses, weight=weight, periodic_only=True
            )
        # before any unscaling: a skipped update leaves the grad scaler as it was
        stepped = self.nonfinite.update_is_finite(counter)
        if stepped:
            if self.config.max_grad_norm is not None:
                self._clip_gradients(model, unscale=scaling)
            model.optimizer_step(self.grad_scaler if scaling else None)
            if scaling:
                self.grad_scaler.update()
        else:
            self.context.log_writer.add_scalar(SKIPPED_UPDATES_KEY, self.nonfinite.skipped_updates)
        model.optimizer_zero_grad()
        counter.add_update()
        self._update_boundary_rng = None
        return stepped

    def _clip_gradients(self, model: ModelBase, *, unscale: bool) -> None:
        """Clip to max_grad_norm over every trained parameter: after the gradients of all processes are
        combined (DDP) and over all shards (FSDP's DTensor gradients), so every rank clips alike. No
        host-device synchronization: the norm stays a tensor until it is logged."""
        if unscale:
            for leaf in model.named_models().values():
                if leaf.optimizer is not None:
                    self.grad_scaler.unscale_(leaf.optimizer)
        parameters = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm, foreach=True)
        self.grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def evaluation_interrupted(self) -> bool:
        """Only in hooks the trainer captured the state before (a step's, by `_hooks_due`, the same on every
        rank; after_training's): elsewhere a pass runs to its end and the stop comes after the update."""
        return self._before_hooks is not None and distributed.any_rank(self.stop_requested is not None)

    def stop_early(self, reason: str) -> None:
        """End training after this step, as its limit would (`after_training`, `last`); for early stoppers."""
        if self.early_stop is None:
            self.early_stop = reason
            logger.info(f"stopping early: {reason}")

    def _no_gradient_sync(self, trainer_model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return fsdp.no_gradient_sync(trainer_model) if self.config.parallelism == "fsdp" else trainer_model.no_sync()

    def create_update_counter(self, start: TrainingIteration) -> UpdateCounter:
        config = self.config
        end = TrainingIteration(epoch=config.max_epochs or 0, update=config.max_updates or 0, sample=config.max_samples or 0)
        return UpdateCounter(
            start_iteration=start,
            end_iteration=end,
            updates_per_epoch=self.batching.updates_per_epoch,
            effective_batch_size=config.effective_batch_size,
        )

    def _data_loader(self, counter: UpdateCounter) -> DataLoader:
        consumers = [c for c in self.all_callbacks() if isinstance(c, PeriodicDataIteratorCallback) and not c.schedule.is_timed]
        data = self.context.data
        sampler = InterleavedSampler(
            batching=self.batching,
            start_iteration=counter.cur_iteration,
            end_iteration=counter.end_iteration,
            consumers=consumers,
            consumer_dataset_sizes=[len(data.get(c.dataset_key)) for c in consumers],
            seed=self.seed,
        )
        dataset = InterleavedDataset(
            [(TRAIN_KEY, data.get(TRAIN_KEY))] + [(c.dataset_key, data.get(c.dataset_key)) for c in consumers]
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_tagged,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating the iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed),
        )

    # ----------------------------------------------------------------------------- callbacks
    def _build_callbacks(self) -> list[CallbackBase]:
        schedule = (
            {"every_n_updates": self.config.log_every_n_updates} if self.config.log_every_n_updates else {"every_n_epochs": 1}
        )
        defaults = [
            TrainingLossCallback(TrainingLossCallbackConfig(**schedule), self.context),
            LearningRateCallback(LearningRateCallbackConfig(**schedule), self.context),
            ProgressCallback(ProgressCallbackConfig(**schedule), self.context),
        ]
        configured = [build(config, self.context) for config in self.config.callbacks]
        labelled = [(f"the default {type(callback).__name__}", callback) for callback in defaults]
        labelled += [(f"trainer.callbacks[{index}]", callback) for index, callback in enumerate(configured)]
        _check_state_keys(labelled)
        return defaults + configured

    def all_callbacks(self) -> list[CallbackBase]:
        """Callbacks in dispatch order, each followed by the children it dispatches itself."""
        return [member for callback in self.callbacks for member in _with_children(callback)]

    def _dispatch(self, hook: str, periodic_only: bool = False, **kwargs: Any) -> None:
        """Call `hook` on every callback in order; if some raise, the others still run, then the first error is raised."""
        receivers = self._receivers(hook, periodic_only)
        if not receivers:
            return
        first_error: BaseException | None = None
        with torch.no_grad():
            for callback in receivers:
                try:
                    getattr(callback, hook)(**kwargs)
                except Exception as error:  # noqa: BLE001 - re-raised below once every callback had its turn
                    if first_error is None:
                        first_error = error
                    else:
                        logger.error(f"{callback.state_key}.{hook} also failed: {error!r}")
        if first_error is not None:
            raise first_error

    def _receivers(self, hook: str, periodic_only: bool) -> list[CallbackBase]:
        """The callbacks a hook is dispatched to, without those for which it would do nothing: per-step
        tracking hooks a callback leaves empty, and `after_update` of a callback that is never due after an update."""
        key = (hook, periodic_only)
        if key not in self._receivers_by_hook:
            self._receivers_by_hook[key] = [
                callback
                for callback in self.callbacks
                if (not periodic_only or isinstance(callback, PeriodicCallback)) and not _does_nothing(callback, hook)
            ]
        return self._receivers_by_hook[key]

    # ----------------------------------------------------------------------------- checkpoints
    def _register_checkpoint_state(self) -> None:
        """What a trainer state holds, each part with how it is restored (see CheckpointManager.register)."""
        checkpoints = self.context.checkpoints
        checkpoints.register("callbacks", self.callback_states, self._load_callback_states, per_rank=True)
        checkpoints.register(
            "rng_states", capture_rng_states, lambda saved, tag: restore_rng_states(saved), per_rank=True, fresh=True
        )
        checkpoints.register(
            "grad_scaler", self.grad_scaler.state_dict, lambda saved, tag: self.grad_scaler.load_state_dict(saved)
        )
        checkpoints.register("metrics_rows", lambda: self.context.log_writer.rows_written)
        checkpoints.register("effective_batch_size", lambda: self.config.effective_batch_size, check=self._check_batch_size)
        checkpoints.register("early_stop", lambda: self.early_stop, self._load_early_stop)
        checkpoints.register("nonfinite_skipped_updates", lambda: self.nonfinite.skipped_updates, self._load_skipped_updates)
        checkpoints.register("training_clock", self.clock.state_dict, lambda saved, tag: self.clock.load_state_dict(saved))
        checkpoints.register(REDO_STEP_HOOKS, lambda: False, lambda saved, tag: setattr(self, "_redo_step_hooks", bool(saved)))
        checkpoints.register_members(self._callback_members)

    def callback_states(self) -> dict[str, Any]:
        states = {}
        for callback in self.all_callbacks():
            state = callback.state_dict()
            if state is not None:
                states[callback.state_key] = state
        return states

    def _load_callback_states(self, saved: dict[str, Any], tag: str) -> None:
        saved_states = dict(saved)
        for callback in self.all_callbacks():
            if callback.state_dict() is None:
                continue
            if callback.state_key in saved_states:
                callback.load_state_dict(saved_states.pop(callback.state_key))
            else:
                logger.warning(f"checkpoint '{tag}' has no state for callback '{callback.state_key}'; it starts fresh")
        for orphan in saved_states:
            logger.warning(f"checkpoint '{tag}' has state for callback '{orphan}', which this run does not have; it is ignored")

    def _callback_members(self, tag: str, counter: UpdateCounter) -> dict[Member, dict[str, Any]]:
        members: dict[Member, dict[str, Any]] = {}
        for callback in self.all_callbacks():
            members.update(callback.checkpoint_members(checkpoint_tag=tag, update_counter=counter))
        return members

    def _load_early_stop(self, reason: str | None, tag: str) -> None:
        self.early_stop = reason

    def _load_skipped_updates(self, skipped: int | None, tag: str) -> None:
        self.nonfinite.skipped_updates = skipped or 0

    def _check_batch_size(self, saved_batch_size: int | None, tag: str) -> None:
        """Epochs, the data order and the learning-rate schedule all count in updates of this size."""
        if saved_batch_size is not None and saved_batch_size != self.config.effective_batch_size:
            raise CheckpointLoadError(
                f"cannot resume checkpoint '{tag}' with trainer.effective_batch_size {self.config.effective_batch_size}: "
                f"it was trained with {saved_batch_size}"
            )

    def _finished_at(self, tag: str) -> UpdateCounter | None:
        """The counter at the end of training (its limit, or an early stop) when checkpoint `tag` is there
        and `last` marks the run as finished; None otherwise (a checkpoint that cannot be read is left to
        the resume to report)."""
        checkpoints = self.context.checkpoints
        with contextlib.suppress(CheckpointLoadError):
            counter = self.create_update_counter(checkpoints.iteration(tag))
            at_the_end = counter.is_finished and counter.update <= counter.end_update  # past it: the resume refuses
            stopped_early = checkpoints.saved_part(tag, "early_stop") is not None
            if (at_the_end or stopped_early) and checkpoints.has_finished(counter.cur_iteration):
                return counter
        return None

    def _resume(self, tag: str) -> UpdateCounter:
        """Restore the run saved under `tag`; returns the counter to continue from.

        The sampler needs no state of its own: its order depends only on seed and epoch, so the
        counter says where it continues.
        """

        def check_iteration(iteration: TrainingIteration) -> None:
            if iteration.update > self.create_update_counter(iteration).end_update:
                limits = ", ".join(
                    f"trainer.{name}={getattr(self.config, name)}" for name in TRAINING_LIMITS if getattr(self.config, name)
                )
                raise NothingLeftToTrainError(
                    f"checkpoint '{tag}' was written at {iteration}, past the end of training ({limits}): "
                    "nothing left to train; raise the limit to train on"
                )

        counter = self.create_update_counter(self.context.checkpoints.resume(tag, check_iteration))
        logger.info(f"resumed from checkpoint '{tag}' at {counter.cur_iteration}")
        return counter

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, tag: str) -> UpdateCounter:
        """Load checkpoint `tag` into the model and run every callback's `at_eval`."""
        model = self.context.model.to(self.device)
        model.initialize_optimizers(0)
        counter = self.create_update_counter(self.context.checkpoints.load_weights(tag))
        model.eval()
        self._dispatch("resume_from_checkpoint", checkpoint_tag=tag, update_counter=counter)
        self._dispatch("at_eval", update_counter=counter, periodic_only=True)
        self.context.log_writer.flush(counter)
        self.context.checkpoints.wait()
        return counter

    # ----------------------------------------------------------------------------- plumbing
    def _log_start(self, counter: UpdateCounter) -> None:
        counts = self.context.model.parameter_counts()
        logger.info(
            f"training {self.context.model.name}: {counts['trainable']:,} trainable and {counts['frozen']:,} frozen parameters; "
            f"{counter.updates_per_epoch} updates per epoch, {counter.end_update} updates in all, "
            f"batch {self.config.effective_batch_size} = {self.batching.accumulation_steps} x {self.micro_batch_size}"
            f" x {self.context.world_size} process(es)"
        )

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT finish the current update; a second SIGINT stops at once, except once the loop is
        left: then every signal waits for the final checkpoints. A signal the process inherited as ignored
        (nohup, a background job) stays ignored."""

        def request_stop(signal_number: int, frame: Any) -> None:
            name = signal.Signals(signal_number).name
            if self._before_hooks is not None and self.finishing:
                logger.info(f"{name} received in after_training: a data pass stops, its other work finishes first")
            elif self.finishing:
                logger.info(f"{name} received: finishing the final checkpoints first")
            elif self.stop_requested is not None and signal_number == signal.SIGINT:
                raise KeyboardInterrupt
            if self.stop_requested is None:
                self.stop_requested = name

        handlers: dict[int, Callable | int | None] = {}
        try:
            for signal_number in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(signal_number) is not signal.SIG_IGN:
                    handlers[signal_number] = signal.signal(signal_number, request_stop)
        except ValueError:  # not the main thread: signals cannot be caught here
            pass
        try:
            yield
        finally:
            for signal_number, handler in handlers.items():
                signal.signal(signal_number, handler)


def _torch_rng_states(device: torch.device) -> tuple:
    """torch's global generator states (a few kB): cheap enough to take before every update."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None


def _restore_torch_rng_states(states: tuple) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _does_nothing(callback: CallbackBase, hook: str) -> bool:
    if not isinstance(callback, PeriodicCallback):
        return False
    inherited = getattr(type(callback), hook, None) is getattr(PeriodicCallback, hook, None)
    if hook in PER_STEP_HOOKS:
        return inherited
    if hook == "after_update":
        never_due = not callback.schedule.fires_after_updates
        return inherited and never_due and type(callback).is_due_after_update is PeriodicCallback.is_due_after_update
    return False


def _with_children(callback: CallbackBase) -> Iterator[CallbackBase]:
    yield callback
    for child in callback.get_children():
        yield from _with_children(child)


def _check_state_keys(labelled: list[tuple[str, CallbackBase]]) -> None:
    """Stateful callbacks sharing a key would overwrite each other's state in every checkpoint."""
    owners: dict[str, str] = {}
    for label, callback in labelled:
        for member in _with_children(callback):
            if member.state_dict() is None:
                continue
            member_label = label if member is callback else f"a {type(member).__name__} inside {label}"
            if member.state_key in owners:
                raise ConfigError(
                    f"{owners[member.state_key]} and {member_label} both keep their checkpoint state under "
                    f"'{member.state_key}'; give them distinct 'id's"
                )
            owners[member.state_key] = member_label


def _batch_length(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        return _batch_length(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_length(batch[0])
    raise TypeError(f"cannot tell the size of a batch of type {type(batch).__name__}")
