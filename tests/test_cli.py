"""`noether-train` as a user runs it: a real subprocess writing a real run directory."""

from __future__ import annotations

import json
import random
import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from noether.core.models.base import build_model
from noether.core.utils.training import TrainingIteration
from noether.training.run import parse_run_config
from tests.conftest import cli_command, cli_env, run_cli, tiny_config

CALLBACKS = [
    {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
    {
        "kind": "noether.core.callbacks.CheckpointCallback",
        "every_n_epochs": 1,
        "save_latest_weights": True,
        "save_latest_optim": True,
    },
]


def read_records(metrics_file: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_file.read_text().splitlines()]


def test_training_run_writes_the_run_directory(tmp_path, write_config):
    config = write_config(tiny_config(Path("outputs"), max_epochs=5, callbacks=CALLBACKS))
    result = run_cli("noether-train", str(config), "trainer.max_epochs=2", cwd=tmp_path)
    *printed, last_line = result.stdout.splitlines()
    run_dir = tmp_path / "outputs" / "run"
    assert (tmp_path / last_line).resolve() == run_dir.resolve()

    resolved = parse_run_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert resolved.trainer.max_epochs == 2
    assert [callback.kind for callback in resolved.trainer.callbacks] == [callback["kind"] for callback in CALLBACKS]

    log = (run_dir / "log.txt").read_text()
    assert printed and all(line in log for line in printed)

    records = read_records(run_dir / "metrics.jsonl")
    epoch_ends = [record for record in records if "loss/val/total" in record]
    assert [record["epoch"] for record in epoch_ends] == [1, 2]
    assert all({"epoch", "update", "sample", "loss/online/total", "lr/classifier"} <= set(record) for record in epoch_ends)
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("loss/online/total", "loss/val/total", "lr/classifier"):
        assert summary[key] == [record[key] for record in records if key in record][-1]

    tags = [str(TrainingIteration.from_dict(record)) for record in epoch_ends] + ["latest", "last"]
    expected = {f"classifier_cp={tag}_{part}" for tag in tags for part in ("model.th", "optim.th", "trainer.th", "hashes.json")}
    assert {path.name for path in (run_dir / "checkpoints").iterdir()} == expected

    weights = torch.load(run_dir / "checkpoints" / f"classifier_cp={tags[0]}_model.th", weights_only=True)
    assert weights["checkpoint_tag"] == tags[0]
    assert weights["run_id"] == "run"
    assert TrainingIteration.from_dict(weights["training_iteration"]) == TrainingIteration.from_dict(epoch_ends[0])
    assert set(weights["state_dict"]) == set(build_model(resolved.model).state_dict())


def test_without_a_config_the_bundled_example_trains(tmp_path):
    result = run_cli("noether-train", "output_path=outputs", "run_id=quick", "trainer.max_epochs=1", cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == str(Path("outputs") / "quick")
    logged = {key for record in read_records(tmp_path / "outputs" / "quick" / "metrics.jsonl") for key in record}
    assert {"loss/val/total", "accuracy/val", "loss/test/total", "accuracy/test"} <= logged


def test_generated_run_id_names_the_printed_directory_and_is_in_config_yaml(tmp_path, write_config):
    tree = tiny_config(Path("outputs"), max_epochs=None, max_updates=1)
    del tree["run_id"]
    result = run_cli("noether-train", str(write_config(tree)), cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs").iterdir()
    assert result.stdout.splitlines()[-1] == str(Path("outputs") / run_dir.name)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_id"] == run_dir.name


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{config}", "trainer.max_epoch=3"], "trainer.max_epoch: extra inputs are not permitted"),
        (["{config}", "trainer.max_epochs", "3"], "override 'trainer.max_epochs' is not of the form dotted.key=value"),
        (
            ["{config}", "trainer.callbacks.1.eval_callbacks.0.metric=[1]"],
            "trainer.callbacks[1].eval_callbacks[0].metric: input should be a valid string",
        ),
        (
            ["{config}", "trainer.callbacks.0.kind=noether.core.callbacks.BestCheckpointCalback"],
            "trainer.callbacks[0].kind: module 'noether.core.callbacks' has no attribute 'BestCheckpointCalback'; "
            "did you mean noether.core.callbacks.BestCheckpointCallback?",
        ),
        (["missing.yaml"], "config file not found: missing.yaml"),
        (["{broken}"], "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1"),
    ],
)
def test_bad_config_exits_with_a_one_line_message(tmp_path, write_config, arguments, message):
    recorder = {"kind": "tests.support.callbacks.FiringRecorder", "every_n_epochs": 1}
    forwarding = {"kind": "tests.support.callbacks.ForwardingCallback", "every_n_epochs": 1, "eval_callbacks": [recorder]}
    config = write_config(tiny_config(tmp_path / "outputs", callbacks=[recorder, forwarding]))
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  callbacks: [a: 1\n")
    argv = [argument.format(config=config, broken=broken) for argument in arguments]
    result = run_cli("noether-train", *argv, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("noether-train: error: ")
    assert message in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["trainer.effective_batch_size=100000"],
            "trainer.effective_batch_size: 100000 is larger than the training set (1259 samples)",
        ),
        (["seed=-1"], "seed: input should be greater than or equal to 0"),
        (["model.optimizer.lr=.inf"], "model.optimizer.lr: input should be a finite number"),
        # an output_path that is a file: tests/training/test_lifecycle.py
    ],
)
def test_value_that_would_fail_later_is_reported_before_anything_is_created(tmp_path, write_config, arguments, message):
    (tmp_path / "outputs").mkdir()
    config = write_config(tiny_config(Path("outputs")))
    result = run_cli("noether-train", str(config), *arguments, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr == f"noether-train: error: {message}\n"
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["config.yaml", "outputs"]


def test_config_file_that_is_not_utf8_is_reported_on_one_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes("output_path: outputs\n# r\u00e9sum\u00e9\n".encode("latin-1"))
    result = run_cli("noether-train", str(config), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr == f"noether-train: error: config file {config} is not UTF-8 text (byte 0xe9 at offset 24)\n"
    assert not (tmp_path / "outputs").exists()


# SIGTERM from outside, the interrupt checkpoint and the resume from it: tests/training/test_signals.py


# ----------------------------------------------------------------------------- damaged checkpoint files
EMA_RUN_CALLBACKS = [
    {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9]},
    {
        "kind": "noether.core.callbacks.CheckpointCallback",
        "every_n_epochs": 1,
        "save_latest_weights": True,
        "save_latest_optim": True,
    },
]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A finished run with EMA weights and a `latest` checkpoint, and its config file."""
    root = tmp_path_factory.mktemp("ema_run")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root / "outputs", max_epochs=1, callbacks=EMA_RUN_CALLBACKS)))
    run_cli("noether-train", str(config), cwd=root)
    return config, root / "outputs" / "run"


def replace_by_file_of_another_kind(path: Path, source_part: str) -> None:
    path.write_bytes((path.parent / f"classifier_cp=latest_{source_part}.th").read_bytes())


@pytest.mark.parametrize(
    ("damaged_file", "damage", "message"),
    [
        (
            "classifier_ema=0.9_cp=latest_model.th",
            lambda path: replace_by_file_of_another_kind(path, "trainer"),
            "checkpoint 'latest' is damaged: {path} is not the file that was written (its content hash differs)",
        ),
        (
            "classifier_ema=0.9_cp=latest_model.th",
            lambda path: replace_by_file_of_another_kind(path, "optim"),
            "checkpoint 'latest' is damaged: {path} is not the file that was written (its content hash differs)",
        ),
        (
            "classifier_cp=latest_model.th",
            lambda path: path.write_bytes(random.Random(0).randbytes(4096)),
            "corrupt or not a torch checkpoint file (no zip archive): {path}",
        ),
    ],
    ids=["ema-holds-trainer-state", "ema-holds-optimizer-state", "random-bytes"],
)
def test_a_checkpoint_file_of_the_wrong_content_is_reported_in_one_line(ema_run, tmp_path, damaged_file, damage, message):
    config, reference_run = ema_run
    shutil.copytree(reference_run, tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / damaged_file
    damage(path)
    result = run_cli(
        "noether-train",
        str(config),
        "trainer.max_epochs=2",
        "--resume",
        str(tmp_path / "run"),
        "--checkpoint",
        "latest",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("noether-train: error: ")
    assert str(path) in line
    assert message.format(path=path) in line


# ----------------------------------------------------------------------------- a full disk
FILE_SIZE_LIMIT = 20_000


def limit_file_size() -> None:
    """In the child: files cannot grow past FILE_SIZE_LIMIT, and a write past it fails with EFBIG
    (SIGXFSZ ignored) as it would on a full disk, instead of killing the process."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_log_write_that_fails_stops_the_run_with_one_line_naming_the_first_failure(tmp_path, write_config):
    config = write_config(tiny_config(Path("outputs"), max_epochs=1000, log_every_n_updates=1))
    command = [cli_command("noether-train"), str(config)]
    result = subprocess.run(
        command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    failed = re.fullmatch(r"noether-train: error: could not write (\S+): File too large", line)
    assert failed, line
    run_dir = tmp_path / "outputs" / "run"
    written = {path.name: path.stat().st_size for path in (run_dir / "log.txt", run_dir / "metrics.jsonl")}
    named = (tmp_path / failed.group(1)).resolve()
    assert named.parent == run_dir.resolve()
    # the file named is the one that hit the limit first: the run stopped before the other one did
    assert written.pop(named.name) == FILE_SIZE_LIMIT
    assert list(written.values())[0] < FILE_SIZE_LIMIT
