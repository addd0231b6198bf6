"""Training under torchrun: real two-process CPU runs (gloo) of `noether-train`, compared with a single
process that uses the same effective batch size, and stopped by signals, failures and bad configs.

Each torchrun start costs seconds, so every run here is the tiny digits example, and the runs that
several tests inspect are module fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from noether.core.providers.path import PathProvider
from noether.examples.digits import DigitsDataset, DigitsDatasetConfig
from noether.training.run import train
from tests.conftest import cli_command, cli_env, tiny_config
from tests.support.checkpoints import checkpoint_path
from tests.support.interrupting import slow_validation
from tests.support.timed import read_record

TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN_TIMEOUT_SECONDS = 120
# one process and two differ only in the order of floating-point sums (micro-batches, all-reduce)
TOLERANCE = 1e-6

VALIDATION_LOSS = {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"}
VALIDATION_ACCURACY = {"kind": "noether.training.callbacks.AccuracyCallback", "every_n_epochs": 1, "dataset_key": "val"}
BEST = {
    "kind": "noether.core.callbacks.BestCheckpointCallback",
    "every_n_epochs": 1,
    "metric_key": "loss/val/total",
    "tolerances": [0],
    # evaluates each new best with a loader of its own, not the shared sampler
    "eval_callbacks": [{"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "test"}],
}
EMA = {
    "kind": "noether.core.callbacks.EmaCallback",
    "every_n_epochs": 1,
    "target_factors": [0.9],
    "eval_callbacks": [VALIDATION_LOSS],
}
CHECKPOINT = {
    "kind": "noether.core.callbacks.CheckpointCallback",
    "every_n_epochs": 1,
    "save_latest_weights": True,
    "save_latest_optim": True,
}


def distributable_tree(output_path: Path, *extra_callbacks: dict[str, Any], dropout: float = 0.0) -> dict[str, Any]:
    """18 updates of 128 samples, 2 micro-batches of 32 per rank under 2 processes (4 under one).

    SGD, because Adam divides out the scale of the gradient and would hide gradients summed rather
    than averaged over ranks.
    """
    tree = tiny_config(
        output_path,
        max_batch_size=32,
        log_every_n_updates=3,
        callbacks=[VALIDATION_LOSS, VALIDATION_ACCURACY, BEST, EMA, CHECKPOINT, *extra_callbacks],
    )
    tree["model"]["dropout"] = dropout
    tree["model"]["optimizer"] = {"kind": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9, "weight_decay": 0.01}
    return tree


ONE_NODE_OF_TWO = ("--standalone", "--nproc_per_node", "2")


def torchrun_command(config: Path, *args: str, launch: tuple[str, ...] = ONE_NODE_OF_TWO) -> list[str]:
    return [str(TORCHRUN), *launch, "--no-python", cli_command("noether-train"), str(config), *args]


def torchrun_env() -> dict[str, str]:
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def torchrun(config: Path, *args: str, launch: tuple[str, ...] = ONE_NODE_OF_TWO) -> Iterator[subprocess.Popen]:
    """A run under torchrun. Whatever still runs at the end is stopped as a scheduler would stop it: SIGTERM
    to torchrun, which passes it on to the workers and kills those that do not stop within 30 s."""
    process = subprocess.Popen(
        torchrun_command(config, *args, launch=launch),
        cwd=config.parent,
        env=torchrun_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def run_torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    """A finished two-process run; a hang fails the test by the timeout."""
    with torchrun(config, *args) as process:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def write_yaml(tree: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def metric_lines(paths: PathProvider) -> list[dict[str, float]]:
    return [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]


def steps_logged(paths: PathProvider) -> list[tuple[int, int, int]]:
    return [(line["epoch"], line["update"], line["sample"]) for line in metric_lines(paths)]


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*")}


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def last_weights(paths: PathProvider) -> dict[str, torch.Tensor]:
    return load(checkpoint_path(paths, "classifier", "last", "model"))["state_dict"]


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> PathProvider:
    return train(distributable_tree(tmp_path_factory.mktemp("single")))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[PathProvider, subprocess.CompletedProcess]:
    """The same config under torchrun, with a run id that rank 0 generates."""
    directory = tmp_path_factory.mktemp("two")
    tree = distributable_tree(directory)
    del tree["run_id"]
    result = run_torchrun(write_yaml(tree, directory / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    return PathProvider(directory, run_dir.name), result


def test_two_processes_train_the_weights_of_one_process_with_the_same_effective_batch_size(single_process, two_processes):
    """Every model file (periodic, latest, last, best, EMA) holds the weights of the single-process run."""
    paths, _ = two_processes
    model_files = sorted(path.name for path in single_process.checkpoint_dir.glob("*_model.th"))
    assert "classifier_ema=0.9_cp=last_model.th" in model_files
    assert "classifier_cp=best_model.loss.val.total_model.th" in model_files

    for name in model_files:
        expected, actual = load(single_process.checkpoint_dir / name), load(paths.checkpoint_dir / name)
        assert actual["training_iteration"] == expected["training_iteration"], name
        for key, tensor in expected["state_dict"].items():
            torch.testing.assert_close(actual["state_dict"][key], tensor, rtol=0, atol=TOLERANCE, msg=f"{name}: {key}")


def test_evaluation_over_a_dataset_that_does_not_divide_over_the_ranks_matches_one_process(single_process, two_processes):
    """Each rank evaluates half of val and test (269 samples each, so one is padded); the padding must
    not count. Covers loaders served by the shared sampler (val, and the EMA's child) and a loader of
    its own (the best model's child on test)."""
    assert len(DigitsDataset(DigitsDatasetConfig(kind="noether.examples.digits.DigitsDataset", split="val"))) == 269
    assert len(DigitsDataset(DigitsDatasetConfig(kind="noether.examples.digits.DigitsDataset", split="test"))) == 269
    paths, _ = two_processes
    expected_lines, actual_lines = metric_lines(single_process), metric_lines(paths)
    assert len(actual_lines) == len(expected_lines)
    evaluated = ("loss/val/total", "accuracy/val", "ema=0.9/loss/val/total", "best=loss.val.total/loss/test/total")
    compared = set()
    for expected, actual in zip(expected_lines, actual_lines):
        assert actual.keys() == expected.keys()
        for key in set(evaluated) & expected.keys():
            assert actual[key] == pytest.approx(expected[key], abs=TOLERANCE), (expected["update"], key)
            compared.add(key)
    assert compared == set(evaluated)


def test_the_logged_training_loss_is_the_mean_over_every_rank(single_process, two_processes):
    paths, _ = two_processes
    for expected, actual in zip(metric_lines(single_process), metric_lines(paths)):
        if "loss/online/total" in expected:
            assert actual["loss/online/total"] == pytest.approx(expected["loss/online/total"], abs=TOLERANCE), expected["update"]


def test_rank_zero_alone_writes_the_run_directory(single_process, two_processes):
    """The files of a single-process run and no others, no metrics line or log line written twice, the
    run directory printed once."""
    paths, result = two_processes
    assert files_under(paths.run_dir) == files_under(single_process.run_dir)
    assert result.stdout.splitlines().count(str(paths.run_dir)) == 1

    assert steps_logged(paths) == steps_logged(single_process)
    log_messages = [line.split(" ", 1)[1] for line in paths.log_file.read_text().splitlines()]
    assert len(log_messages) == len(set(log_messages))
    assert sum("training classifier:" in message for message in log_messages) == 1
    assert "batch 128 = 2 x 32 x 2 process(es)" in log_messages[0]


def test_two_nodes_of_one_process_each_train_as_one_node_of_two_processes(tmp_path, two_processes):
    """Multi-node flags, both "nodes" on this machine: node 1's only process has local rank 0 but rank 1,
    and must neither write nor print the run directory."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_yaml(distributable_tree(tmp_path), tmp_path / "config.yaml")
    rendezvous = ("--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port))
    launches = [(*rendezvous, "--node_rank", str(node)) for node in range(2)]
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(torchrun(config, launch=launch)) for launch in launches]
        outputs = [node.communicate(timeout=RUN_TIMEOUT_SECONDS) for node in nodes]

    assert [node.returncode for node in nodes] == [0, 0], outputs
    paths = PathProvider(tmp_path, "run")
    assert outputs[0][0].strip().splitlines()[-1] == str(paths.run_dir)
    assert str(paths.run_dir) not in outputs[1][0]
    assert_identical(last_weights(paths), last_weights(two_processes[0]))


@pytest.fixture(scope="module")
def uninterrupted_with_dropout(tmp_path_factory) -> PathProvider:
    """Dropout masks from each rank's own random state, which differs between ranks."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = run_torchrun(write_yaml(rank_noise_tree(directory), directory / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    return PathProvider(directory, "run")


def rank_noise_tree(output_path: Path, *extra_callbacks: dict[str, Any]) -> dict[str, Any]:
    return distributable_tree(output_path, {"kind": "tests.support.distributed.RankNoiseCallback"}, *extra_callbacks, dropout=0.1)


@pytest.mark.parametrize("receiver", ["torchrun", "rank 1"])
def test_sigterm_stops_every_rank_at_the_same_update_and_the_run_resumes_exactly(tmp_path, uninterrupted_with_dropout, receiver):
    """A scheduler's SIGTERM goes to torchrun, which passes it on to every worker; a SIGTERM to one
    worker alone must stop the other at the same update too. Rank 0 logs what stopped it."""
    ready_file = tmp_path / "update-11-done"
    waiting = {"kind": "tests.support.distributed.WaitForSignalOnAnyRankCallback", "at_update": 11, "ready_file": str(ready_file)}
    config = write_yaml(rank_noise_tree(tmp_path, waiting), tmp_path / "config.yaml")
    with torchrun(config) as process:
        rank_ready_files = [Path(f"{ready_file}.{rank}") for rank in range(2)]
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while not all(path.exists() for path in rank_ready_files) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if not all(path.exists() for path in rank_ready_files):
            pytest.fail("the run did not reach update 11:\n" + "".join(process.communicate(timeout=RUN_TIMEOUT_SECONDS)))
        if receiver == "torchrun":
            process.send_signal(signal.SIGTERM)
        else:
            os.kill(int(rank_ready_files[1].read_text()), signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_SECONDS)

    if receiver == "rank 1":  # torchrun itself reports a SIGTERM it received with an exit code of its own
        assert process.returncode == 0, stdout + stderr
    paths = PathProvider(tmp_path, "run")
    assert stdout.strip().splitlines()[-1] == str(paths.run_dir), stdout + stderr  # rank 0 finished normally
    stopped_by = "SIGTERM" if receiver == "torchrun" else "a signal to another process"
    assert f"stopping on {stopped_by} after update 11" in paths.log_file.read_text()
    tag = "E1_U11_S1408.signal_interrupt"
    interrupt_state = load(checkpoint_path(paths, "classifier", tag, "trainer"))
    rank_0_rng, rank_1_rng = interrupt_state["rng_states"]  # both ranks took part in the save
    assert not torch.equal(rank_0_rng["torch"], rank_1_rng["torch"])

    resumed = run_torchrun(config, "--resume", "run", "--checkpoint", tag)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_identical(last_weights(paths), last_weights(uninterrupted_with_dropout))
    assert paths.metrics_file.read_text() == uninterrupted_with_dropout.metrics_file.read_text()


def test_a_rank_that_fails_stops_the_whole_run_with_its_error(tmp_path):
    """Rank 1 raises after update 5 while rank 0 waits for it in a collective: torchrun must exit with
    the error instead of hanging (the timeout of `run_torchrun` fails the test on a hang)."""
    failing = {"kind": "tests.support.distributed.FailOnRankCallback", "at_update": 5, "rank": 1}
    config = write_yaml(distributable_tree(tmp_path, failing), tmp_path / "config.yaml")

    result = run_torchrun(config)

    assert result.returncode != 0
    assert "RuntimeError: test failure on rank 1 after update 5" in result.stdout + result.stderr
    paths = PathProvider(tmp_path, "run")
    assert checkpoint_path(paths, "classifier", "E0_U5_S640.error", "trainer").exists()  # rank 0 stopped at update 5
    assert not checkpoint_path(paths, "classifier", "last", "model").exists()


def test_an_effective_batch_size_that_does_not_divide_over_the_ranks_is_a_one_line_config_error(tmp_path):
    config = write_yaml(distributable_tree(tmp_path), tmp_path / "config.yaml")

    result = run_torchrun(config, "trainer.effective_batch_size=127")

    assert result.returncode != 0
    worker_errors = [line for line in result.stderr.splitlines() if line.startswith(("noether-train:", "[rank"))]
    # a worker ends with the message and no traceback (torchrun adds a report of its own); once one has
    # failed, torchrun may end the other before it gets to print
    message = "noether-train: error: trainer.effective_batch_size: 127 does not divide over 2 processes"
    assert worker_errors in ([message], [message] * 2)
    assert not any(PathProvider(tmp_path, "run").checkpoint_dir.glob("*"))


@pytest.mark.parametrize(("receiver", "delay"), [(0, 0.0), (0, 0.5), (1, 0.3)])
def test_a_sigterm_to_one_rank_while_the_other_is_inside_its_update_stops_both_at_the_same_update(tmp_path, receiver, delay):
    """Rank 1 is slow after update 3; the signal goes to rank 0 (waiting in the stop agreement of update 3,
    so only the agreement of update 4 can carry it) or to rank 1 (still inside update 3). The slow rank
    makes the race certain rather than occasional: a rank that left the loop on its own flag would
    gather for the interrupt save while the other runs the next update, and the job would hang."""
    ready_file = tmp_path / "update-3-done"
    slow = {
        "kind": "tests.support.distributed.SlowRankCallback",
        "at_update": 3,
        "rank": 1,
        "seconds": 1.0,
        "ready_file": str(ready_file),
    }
    tree = tiny_config(tmp_path, max_batch_size=32, callbacks=[CHECKPOINT, slow])
    tree["trainer"].update(max_epochs=None, max_updates=6)
    config = write_yaml(tree, tmp_path / "config.yaml")
    with torchrun(config) as process:
        rank_ready_files = [Path(f"{ready_file}.{rank}") for rank in range(2)]
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while not all(path.exists() for path in rank_ready_files) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        os.kill(int(rank_ready_files[receiver].read_text()), signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks hung after a SIGTERM to rank {receiver}")

    assert process.returncode == 0, stdout + stderr
    paths = PathProvider(tmp_path, "run")
    stop_update = 4 if receiver == 0 else 3
    assert f"after update {stop_update}" in paths.log_file.read_text()
    assert checkpoint_path(paths, "classifier", f"E0_U{stop_update}_S{stop_update * 128}.signal_interrupt", "trainer").exists()
    assert checkpoint_path(paths, "classifier", "last", "model").exists()


def test_a_timed_callback_fires_at_the_same_update_on_every_rank_by_rank_zeros_clock(tmp_path):
    """Rank 1's updates take 40 ms longer than rank 0's own work, so their clocks disagree; both fire the
    timed recorder and the timed validation loss (a collective) after the same updates, those rank 0's
    clock says."""
    timed = [
        {"kind": "tests.support.timed.SlowUpdates", "seconds_by_rank": [0.0, 0.04]},
        {"kind": "tests.support.timed.ClockRecord", "every_n_updates": 1, "file": str(tmp_path / "clock")},
        {"kind": "tests.support.timed.ClockRecord", "id": "timed", "every_n_seconds": 0.15, "file": str(tmp_path / "fired")},
        {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_seconds": 0.15, "dataset_key": "val"},
    ]
    tree = tiny_config(tmp_path / "outputs", max_batch_size=32, callbacks=timed)
    result = run_torchrun(write_yaml(tree, tmp_path / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr

    fired = [[line["update"] for line in read_record(tmp_path / f"fired.{rank}")] for rank in (0, 1)]
    assert fired[0] == fired[1] and len(fired[0]) >= 3
    clocks = [read_record(tmp_path / f"clock.{rank}") for rank in (0, 1)]
    assert clocks[0] == clocks[1]  # every rank read rank 0's clock
    rows = metric_lines(PathProvider(tmp_path / "outputs", "run"))
    assert [row["update"] for row in rows if "loss/val/total" in row] == fired[0]


def test_noether_eval_under_torchrun_evaluates_on_every_rank_what_the_run_logged(two_processes):
    """torchrun reads `--run` as its own `--run-path`: noether-eval also takes `--run-id`."""
    paths, _ = two_processes
    command = [
        str(TORCHRUN),
        *ONE_NODE_OF_TWO,
        "--no-python",
        cli_command("noether-eval"),
        str(paths.output_path / "config.yaml"),
    ]
    result = subprocess.run(
        [*command, "--run-id", str(paths.run_dir), "--checkpoint", "last"],
        cwd=paths.output_path,
        env=torchrun_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    logged = [line["loss/val/total"] for line in metric_lines(paths) if "loss/val/total" in line][-1]  # the last epoch's
    printed = [float(line.split(": ")[1]) for line in result.stdout.splitlines() if line.startswith("loss/val/total: ")]
    assert printed and all(value == pytest.approx(logged, abs=TOLERANCE) for value in printed)
    [record] = [json.loads(line) for line in (paths.run_dir / "eval" / "last.jsonl").read_text().splitlines()]
    assert record["loss/val/total"] == pytest.approx(logged, abs=TOLERANCE)


def test_sigterm_during_an_evaluation_stops_every_rank_there_and_the_resume_ends_as_a_run_never_stopped(tmp_path):
    """The validation pass after update 9 is cut after its 3rd batch by a SIGTERM to one process; both ranks
    leave it at the same batch (they agree after every batch), and `--resume auto` runs the step's hooks again.
    The resumed run is stopped again in after_training's test pass, and the next resume finishes it."""
    slow, final = slow_validation(), slow_validation(dataset_key="test", final_pass=True)
    signalling = slow_validation(signal_after=[9, 3], signalled_file=str(tmp_path / "signalled"))
    final_signalling = {**final, "signal_after": ["final", 2], "signalled_file": str(tmp_path / "signalled-final")}
    reference_tree = tiny_config(tmp_path / "reference", max_batch_size=32, callbacks=[slow, final, BEST, CHECKPOINT])
    tree = tiny_config(tmp_path / "stopped", max_batch_size=32, callbacks=[signalling, final_signalling, BEST, CHECKPOINT])
    for name, config in (("reference", reference_tree), ("stopped", tree)):
        result = run_torchrun(write_yaml(config, tmp_path / f"{name}.yaml"))
        if name == "stopped":
            assert "during the evaluations after update 9" in result.stdout + result.stderr
    result = run_torchrun(tmp_path / "stopped.yaml", "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "during the evaluations of after_training" in result.stdout + result.stderr
    result = run_torchrun(tmp_path / "stopped.yaml", "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr

    stopped, reference = PathProvider(tmp_path / "stopped", "run"), PathProvider(tmp_path / "reference", "run")
    assert stopped.metrics_file.read_text() == reference.metrics_file.read_text()
    for tag in ("last", "best_model.loss.val.total"):
        actual = load(checkpoint_path(stopped, "classifier", tag, "model"))["state_dict"]
        expected = load(checkpoint_path(reference, "classifier", tag, "model"))["state_dict"]
        assert all(torch.equal(actual[key], expected[key]) for key in expected), tag
