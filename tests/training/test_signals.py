"""Stopping training: SIGTERM/SIGINT finish the update and write an interrupt checkpoint, an exception
writes an error checkpoint; a resume from either continues the run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from noether.core.config import ConfigError
from noether.core.providers.path import PathProvider
from noether.training.run import train
from tests.conftest import cli_command, cli_env, run_cli, tiny_config
from tests.support.checkpoints import checkpoint_path
from tests.support.interrupting import slow_validation

CHECKPOINT = {
    "kind": "noether.core.callbacks.CheckpointCallback",
    "every_n_epochs": 1,
    "save_latest_weights": True,
    "save_latest_optim": True,
}
COUNTING = {"kind": "tests.support.stateful.CountingCallback", "every_n_updates": 2}
EMA = {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9]}
VALIDATION = {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"}
BEST = {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": "loss/val/total"}


def stoppable_tree(output_path: Path, *extra_callbacks: dict[str, Any]) -> dict[str, Any]:
    """18 updates. EMA weights are large state that callbacks hand to every checkpoint through the `checkpoint_members`
    hook; the best-checkpoint callback logs its best value in `after_training`, also when stopped."""
    return tiny_config(
        output_path, log_every_n_updates=3, callbacks=[COUNTING, EMA, VALIDATION, BEST, CHECKPOINT, *extra_callbacks]
    )


def checkpoint_parts(paths: PathProvider, tag: str) -> list[Path]:
    return [
        checkpoint_path(paths, "classifier", tag, "model"),
        checkpoint_path(paths, "classifier", tag, "optim"),
        checkpoint_path(paths, "classifier", tag, "trainer"),
        checkpoint_path(paths, "classifier", tag, "model", ema_factor=0.9),
    ]


def last_weights(paths: PathProvider) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path(paths, "classifier", "last", "model"), weights_only=True)["state_dict"]


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> PathProvider:
    return train(stoppable_tree(tmp_path_factory.mktemp("reference")))


def test_sigterm_writes_the_interrupt_checkpoint_exits_cleanly_and_resumes_to_the_same_end(tmp_path, write_config, reference):
    """The signal comes from outside while update 11 is being finished (mid-epoch)."""
    ready = tmp_path / "update-11-done"
    waiting = {"kind": "tests.support.interrupting.WaitForStopCallback", "at_update": 11, "ready_file": str(ready)}
    config = write_config(stoppable_tree(tmp_path, waiting))
    process = subprocess.Popen(
        [cli_command("noether-train"), str(config)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()

    assert process.returncode == 0, stderr
    paths = PathProvider(tmp_path, "run")
    assert stdout.strip().splitlines()[-1] == str(paths.run_dir)
    assert "stopping on SIGTERM after update 11" in paths.log_file.read_text()
    for path in checkpoint_parts(paths, "E1_U11_S1408.signal_interrupt"):
        assert path.exists(), path.name
    assert checkpoint_path(paths, "classifier", "last", "model").exists()  # after_training ran
    assert '"update": 11, "sample": 1408, "best/loss/val/total"' in paths.metrics_file.read_text()

    run_cli("noether-train", str(config), "--resume", "run", "--checkpoint", "E1_U11_S1408.signal_interrupt", cwd=tmp_path)

    assert_identical(last_weights(paths), last_weights(reference))
    assert paths.metrics_file.read_text() == reference.metrics_file.read_text()


def test_sigint_stops_after_the_update_and_runs_after_training(tmp_path):
    signalling = {"kind": "tests.support.interrupting.SignalSelfCallback", "at_update": 11, "signal_name": "SIGINT"}
    handler_before = signal.getsignal(signal.SIGINT)
    paths = train(stoppable_tree(tmp_path, signalling))

    assert "stopping on SIGINT after update 11" in paths.log_file.read_text()
    for path in checkpoint_parts(paths, "E1_U11_S1408.signal_interrupt"):
        assert path.exists(), path.name
    last = torch.load(checkpoint_path(paths, "classifier", "last", "trainer"), weights_only=True)
    assert last["training_iteration"] == {"epoch": 1, "update": 11, "sample": 1408}
    assert signal.getsignal(signal.SIGINT) is handler_before  # the trainer's handler is gone


def test_an_exception_in_a_callback_writes_an_error_checkpoint_whose_resume_runs_the_step_again(tmp_path, reference):
    """Update 6 logs a row, and its callbacks after the failing one still had to run: the resume runs the
    step's hooks again, so the row is not lost."""
    failing = {"kind": "tests.support.failing.FailAtUpdateCallback", "at_update": 6, "failed_file": str(tmp_path / "failed")}
    tree = stoppable_tree(tmp_path, failing)

    with pytest.raises(RuntimeError, match="test failure after update 6"):
        train(tree)

    paths = PathProvider(tmp_path, "run")
    for path in checkpoint_parts(paths, "E0_U6_S768.error"):
        assert path.exists(), path.name
    assert "saved checkpoint 'E0_U6_S768.error'" in paths.log_file.read_text()
    assert all(json.loads(line)["update"] < 6 for line in paths.metrics_file.read_text().splitlines())

    train(tree, resume="run", checkpoint="E0_U6_S768.error")

    assert_identical(last_weights(paths), last_weights(reference))
    assert '"update": 6' in reference.metrics_file.read_text()
    assert paths.metrics_file.read_text() == reference.metrics_file.read_text()


def test_an_exception_in_the_training_step_writes_an_error_checkpoint(tmp_path):
    tree = stoppable_tree(tmp_path)
    tree["trainer"].update(kind="tests.support.failing.FailingClassificationTrainer", fail_on_step=6)

    with pytest.raises(RuntimeError, match="test failure in train step 6"):
        train(tree)

    paths = PathProvider(tmp_path, "run")
    for path in checkpoint_parts(paths, "E0_U5_S640.error"):
        assert path.exists(), path.name
    state = torch.load(checkpoint_path(paths, "classifier", "E0_U5_S640.error", "trainer"), weights_only=True)
    assert state["callbacks"][0]["CountingCallback"] == {"count": 2}


def test_two_stateful_callbacks_under_one_key_are_refused_at_start_up(tmp_path):
    tree = tiny_config(tmp_path, callbacks=[{**COUNTING, "id": "counter"}, CHECKPOINT, {**COUNTING, "id": "counter"}])

    with pytest.raises(
        ConfigError, match=r"trainer\.callbacks\[0\] and trainer\.callbacks\[2\] both keep their checkpoint state under 'counter'"
    ):
        train(tree)

    tree["trainer"]["callbacks"][2]["id"] = "other_counter"
    paths = train(tree)  # the same run id: the failed start left nothing that needs protecting
    state = torch.load(checkpoint_path(paths, "classifier", "last", "trainer"), weights_only=True)
    assert state["callbacks"][0]["counter"] == state["callbacks"][0]["other_counter"] == {"count": 9}


def test_a_callback_sharing_the_key_of_a_default_callback_is_refused(tmp_path):
    tree = tiny_config(tmp_path, callbacks=[{**COUNTING, "id": "TrainingLossCallback"}])

    with pytest.raises(ConfigError, match="the default TrainingLossCallback and trainer.callbacks.0. both keep"):
        train(tree)


def start_training(config: Path, **popen_options: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [cli_command("noether-train"), str(config)],
        cwd=config.parent,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_options,
    )


def test_signals_during_after_training_and_the_final_writes_let_every_final_checkpoint_finish(tmp_path, write_config):
    """A SIGTERM while `after_training` runs, then a second SIGTERM and a Ctrl-C: the final periodic,
    `latest` and `last` sets are written completely and the process exits normally."""
    ready = tmp_path / "after-training-started"
    slow = {"kind": "tests.support.interrupting.SlowAfterTrainingCallback", "ready_file": str(ready), "seconds": 1.5}
    config = write_config(tiny_config(tmp_path, callbacks=[CHECKPOINT, slow]))
    process = start_training(config)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for signal_number in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            process.send_signal(signal_number)
            time.sleep(0.3)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()

    assert process.returncode == 0, stderr
    paths = PathProvider(tmp_path, "run")
    for tag in ("E2_U18_S2304", "latest", "last"):
        for kind in ("model", "optim", "trainer"):
            assert torch.load(checkpoint_path(paths, "classifier", tag, kind), weights_only=True), (tag, kind)
    assert not list(paths.checkpoint_dir.glob(".*.tmp")) and not list(paths.checkpoint_dir.glob("*.staged*"))
    assert "SIGTERM received in after_training: a data pass stops, its other work finishes first" in paths.log_file.read_text()


def test_sigint_inherited_as_ignored_stays_ignored(tmp_path, write_config):
    """Started with SIGINT ignored (nohup, a background job): a Ctrl-C does not stop the run."""
    signalling = {"kind": "tests.support.interrupting.SignalSelfCallback", "at_update": 3, "signal_name": "SIGINT"}
    config = write_config(tiny_config(tmp_path, callbacks=[CHECKPOINT, signalling]))
    process = start_training(config, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 0, stderr
    paths = PathProvider(tmp_path, "run")
    assert "stopping on" not in paths.log_file.read_text()
    assert not list(paths.checkpoint_dir.glob("*signal_interrupt*"))
    last = torch.load(checkpoint_path(paths, "classifier", "last", "trainer"), weights_only=True)
    assert last["training_iteration"] == {"epoch": 2, "update": 18, "sample": 2304}


@pytest.mark.parametrize("dataset", ["noether.examples.digits.DigitsDataset", "tests.support.augmenting.NumpyNoisyDigitsDataset"])
def test_an_error_in_a_later_micro_batch_resumes_exactly_from_the_last_completed_update(tmp_path, dataset):
    """4 micro-batches per update; the 23rd train step (micro-batch 3 of update 6) fails after dropout (and the
    dataset's NumPy and Python augmentation) drew random numbers and the training-loss callback took partial
    losses: the error checkpoint holds the state as of update 5, and the resumed run ends where an
    uninterrupted one does."""

    def tree(directory: Path, fail_on_step: int) -> dict[str, Any]:
        config = tiny_config(directory, max_batch_size=32, log_every_n_updates=3, callbacks=[CHECKPOINT])
        config["trainer"].update(kind="tests.support.failing.FailingClassificationTrainer", fail_on_step=fail_on_step)
        config["datasets"]["train"]["kind"] = dataset
        return config

    uninterrupted = train(tree(tmp_path / "uninterrupted", fail_on_step=10_000))
    failing = tree(tmp_path / "failing", fail_on_step=23)
    with pytest.raises(RuntimeError, match="test failure in train step 23"):
        train(failing)

    paths = train(tree(tmp_path / "failing", fail_on_step=10_000), resume="run", checkpoint="E0_U5_S640.error")

    assert_identical(last_weights(paths), last_weights(uninterrupted))
    assert paths.metrics_file.read_text() == uninterrupted.metrics_file.read_text()


def test_augmentation_in_two_data_loader_workers_resumes_exactly(tmp_path):
    """Random draws in `__getitem__` of worker processes continue where they stopped: the resumed run
    ends with the weights of the uninterrupted one."""

    def tree(directory: Path, *extra_callbacks: dict[str, Any]) -> dict[str, Any]:
        config = tiny_config(directory, num_workers=2, callbacks=[CHECKPOINT, *extra_callbacks])
        config["datasets"]["train"]["kind"] = "tests.support.augmenting.NoisyDigitsDataset"
        return config

    uninterrupted = train(tree(tmp_path / "uninterrupted"))
    signalling = {"kind": "tests.support.interrupting.SignalSelfCallback", "at_update": 11, "signal_name": "SIGTERM"}
    stopped = train(tree(tmp_path / "stopped", signalling))
    assert checkpoint_path(stopped, "classifier", "E1_U11_S1408.signal_interrupt", "trainer").exists()

    resumed = train(tree(tmp_path / "stopped"), resume="run", checkpoint="E1_U11_S1408.signal_interrupt")

    assert_identical(last_weights(resumed), last_weights(uninterrupted))


# --------------------------------------------------------------------------------- a signal during an evaluation
def slow_validation_tree(
    output_path: Path, signalled_file: Path | None, *, fail: bool = False, signal_after: tuple[int | str, int] = (9, 3)
) -> dict[str, Any]:
    """Validation in batches of 16 (23 batches), 20 ms each, after every epoch and once more in after_training;
    the first launch is signalled after the 3rd batch of the pass after update 9 (before the best model and the
    checkpoints of that step), or of the pass `signal_after` names."""
    slow = slow_validation(final_pass=True)
    if signalled_file is not None:
        slow = slow_validation(final_pass=True, signal_after=signal_after, signalled_file=str(signalled_file), fail=fail)
    return tiny_config(output_path, log_every_n_updates=3, callbacks=[COUNTING, EMA, slow, BEST, CHECKPOINT])


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory) -> PathProvider:
    return train(slow_validation_tree(tmp_path_factory.mktemp("slow-reference"), None))


def test_sigterm_during_an_evaluation_stops_it_and_the_resume_runs_the_steps_hooks_again_exactly(tmp_path, slow_reference):
    reference = slow_reference
    signalled = tmp_path / "signalled"
    tree = slow_validation_tree(tmp_path / "stopped", signalled)

    stopped = train(tree)
    log = stopped.log_file.read_text()
    assert "stopping on SIGTERM during the evaluations after update 9" in log
    assert signalled.read_text() == "3"  # the pass stopped after the batch the signal came in, not after all 23
    assert checkpoint_path(stopped, "classifier", "E1_U9_S1152.signal_interrupt", "trainer").exists()
    # nothing of the cut step was written: no periodic set, no best, no metrics row of update 9
    assert not checkpoint_path(stopped, "classifier", "E1_U9_S1152", "model").exists()
    assert not checkpoint_path(stopped, "classifier", "last", "model").exists()
    assert all(json.loads(line)["update"] < 9 for line in stopped.metrics_file.read_text().splitlines())

    resumed = train(tree, resume="auto")

    assert resumed.metrics_file.read_text() == reference.metrics_file.read_text()
    for tag in ("E1_U9_S1152", "E2_U18_S2304", "last", "best_model.loss.val.total"):
        expected = torch.load(checkpoint_path(reference, "classifier", tag, "model"), weights_only=True)
        actual = torch.load(checkpoint_path(resumed, "classifier", tag, "model"), weights_only=True)
        assert actual["training_iteration"] == expected["training_iteration"], tag
        assert_identical(actual["state_dict"], expected["state_dict"])
    assert_identical(
        torch.load(checkpoint_path(resumed, "classifier", "last", "model", ema_factor=0.9), weights_only=True)["state_dict"],
        torch.load(checkpoint_path(reference, "classifier", "last", "model", ema_factor=0.9), weights_only=True)["state_dict"],
    )


def test_an_evaluation_that_fails_midway_is_run_again_by_the_resume_of_its_error_checkpoint(tmp_path, slow_reference):
    """The error checkpoint of a failure in a step's hooks holds the state before them: the resume runs the
    whole step again (its metrics row, best model and checkpoints are not lost)."""
    reference = slow_reference
    tree = slow_validation_tree(tmp_path / "failed", tmp_path / "failed-once", fail=True)

    with pytest.raises(RuntimeError, match="validation failed after batch 3"):
        train(tree)
    failed = PathProvider(tmp_path / "failed", "run")
    assert checkpoint_path(failed, "classifier", "E1_U9_S1152.error", "trainer").exists()

    resumed = train(tree, resume="auto")

    assert "resuming from the newest complete checkpoint 'E1_U9_S1152.error'" in resumed.log_file.read_text()
    assert resumed.metrics_file.read_text() == reference.metrics_file.read_text()
    for tag in ("E1_U9_S1152", "last", "best_model.loss.val.total"):
        expected = torch.load(checkpoint_path(reference, "classifier", tag, "model"), weights_only=True)
        actual = torch.load(checkpoint_path(resumed, "classifier", tag, "model"), weights_only=True)
        assert actual["training_iteration"] == expected["training_iteration"], tag
        assert_identical(actual["state_dict"], expected["state_dict"])


def test_sigterm_during_an_evaluation_of_after_training_stops_it_and_the_resume_finishes_the_run_exactly(
    tmp_path, slow_reference
):
    """The final pass stops after the batch the signal came in; the interrupt checkpoint holds the state from
    before after_training, no `last` is written, and the resume runs after_training as the run never stopped."""
    signalled = tmp_path / "signalled"
    tree = slow_validation_tree(tmp_path / "stopped", signalled, signal_after=("final", 3))

    stopped = train(tree)
    log = stopped.log_file.read_text()
    assert "SIGTERM received in after_training: a data pass stops" in log
    assert "stopping on SIGTERM during the evaluations of after_training" in log
    assert "stopped after 3 batch(es) of 'val'" in log
    assert checkpoint_path(stopped, "classifier", "E2_U18_S2304.signal_interrupt", "trainer").exists()
    assert not checkpoint_path(stopped, "classifier", "last", "model").exists()
    reference_rows = slow_reference.metrics_file.read_text().splitlines()
    assert stopped.metrics_file.read_text().splitlines() == reference_rows[:-1]  # all but after_training's row

    resumed = train(tree, resume="auto")

    assert resumed.metrics_file.read_text().splitlines() == reference_rows
    assert "best/loss/val/total" in json.loads(reference_rows[-1]) and "loss/val/total" in json.loads(reference_rows[-1])
    for tag in ("last", "best_model.loss.val.total"):
        expected = torch.load(checkpoint_path(slow_reference, "classifier", tag, "model"), weights_only=True)
        actual = torch.load(checkpoint_path(resumed, "classifier", tag, "model"), weights_only=True)
        assert actual["training_iteration"] == expected["training_iteration"], tag
        assert_identical(actual["state_dict"], expected["state_dict"])
    assert "has finished" in train(tree, resume="auto").log_file.read_text()
