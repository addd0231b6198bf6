"""Runs in an S3 bucket (moto's server over HTTP on 127.0.0.1): what lands in the bucket, a run killed on
one machine resumed bit for bit on another with an empty cache, an endpoint that goes away mid-run."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from noether.core.config import ConfigError
from noether.core.object_storage import Bucket, UploadError, cache_folder, remote_sets
from noether.core.providers.path import PathProvider
from noether.training.run import evaluate, train
from tests.conftest import cli_command, cli_env, tiny_config
from tests.support.s3 import S3Server
from tests.training.test_distributed import run_torchrun, write_yaml
from tests.training.test_fsdp import assert_close, sharded_tree, weights

CHECKPOINT = "noether.core.callbacks.CheckpointCallback"
INITIALIZER = "noether.core.initializers.PreviousRunInitializer"
RUN_TIMEOUT_SECONDS = 240
OUTAGE_SECONDS = 20


def bucket_tree(url: str, cache_dir: Path, **extra: Any) -> dict[str, Any]:
    """18 updates with a checkpoint every 4, `latest` every epoch and two kept periodic sets."""
    callbacks = [
        {"kind": CHECKPOINT, "every_n_updates": 4, "keep_last_n": 2},
        {"kind": CHECKPOINT, "every_n_epochs": 1, "save_latest_weights": True, "save_latest_optim": True},
        *extra.pop("callbacks", []),
    ]
    tree = tiny_config(cache_dir, callbacks=callbacks)
    tree.update({"output_path": f"{url}/runs", "cache_dir": str(cache_dir), **extra})
    return tree


def pause_at(update: int, folder: Path) -> tuple[dict[str, Any], Path, Path]:
    ready, go = folder / "paused", folder / "go"
    return (
        {"kind": "tests.support.pausing.PauseCallback", "at_update": update, "ready_file": str(ready), "go_file": str(go)},
        ready,
        go,
    )


def wait_for(condition, what: str, timeout: float = RUN_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def checkpoint_files(paths: PathProvider) -> dict[str, bytes]:
    """The committed files of the cache, as the bucket should hold them (sharded folders' files one by one)."""
    found = {}
    for path in sorted(paths.checkpoint_dir.rglob("*")):
        relative = path.relative_to(paths.checkpoint_dir)
        if path.is_file() and not relative.parts[0].startswith("."):
            found[relative.as_posix()] = path.read_bytes()
    return found


def bucket_checkpoints(s3: S3Server, bucket: str, run_id: str = "run") -> dict[str, bytes]:
    return s3.objects(bucket, f"runs/{run_id}/checkpoints/")


def metrics_rows(text: str | bytes) -> list[dict[str, float]]:
    return [json.loads(line) for line in (text.decode() if isinstance(text, bytes) else text).splitlines()]


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------------- what lands in the bucket
def test_a_run_in_a_bucket_holds_the_caches_checkpoints_and_run_files_byte_for_byte(tmp_path, s3):
    url = s3.create_bucket("whole")
    paths = train(bucket_tree(url, tmp_path / "cache"))

    assert paths.location == f"{url}/runs/run"
    assert paths.run_dir == tmp_path / "cache" / "s3" / "whole" / "runs" / "run"
    in_bucket = bucket_checkpoints(s3, "whole")
    assert in_bucket == checkpoint_files(paths)
    # keep_last_n=2 deleted the older periodic sets in the bucket too
    periodic = sorted({name.split("_cp=")[1].rsplit("_", 1)[0] for name in in_bucket if "_cp=E" in name})
    assert periodic == ["E1_U12_S1536", "E1_U16_S2048", "E1_U9_S1152", "E2_U18_S2304"]  # the last two: every_n_epochs
    run_files = s3.objects("whole", "runs/run/")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "log.txt"):
        assert run_files[name] == (paths.run_dir / name).read_bytes(), name
    assert ".lease.json" not in run_files  # given back at the end
    assert not (paths.run_dir / ".upload").exists()


def test_the_noether_ckpt_and_plot_tools_read_a_run_by_its_url(tmp_path, s3):
    url = s3.create_bucket("tools")
    train(bucket_tree(url, tmp_path / "cache"))
    env = {**cli_env(), **s3.env}

    def tool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [cli_command(args[0]), *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    listed = tool("noether-ckpt", "list", f"{url}/runs/run")
    assert listed.returncode == 0, listed.stderr
    listed_tags = {line.split()[0] for line in listed.stdout.splitlines()[1:]}
    assert listed_tags == {"E1_U9_S1152", "E1_U12_S1536", "E1_U16_S2048", "latest", "E2_U18_S2304", "last"}
    verified = tool("noether-ckpt", "verify", "run", "--output-path", f"{url}/runs")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("ok: all")
    # a flipped byte in the bucket is found
    client = s3.client()
    key = "runs/run/checkpoints/classifier_cp=latest_optim.th"
    content = bytearray(client.get_object(Bucket="tools", Key=key)["Body"].read())
    content[-100] ^= 0xFF
    client.put_object(Bucket="tools", Key=key, Body=bytes(content))
    damaged = tool("noether-ckpt", "verify", f"{url}/runs/run")
    assert damaged.returncode == 1
    assert "classifier_cp=latest_optim.th" in damaged.stdout
    exported = tool(
        "noether-ckpt", "export", f"{url}/runs/run", "--checkpoint", "last", "--output", str(tmp_path / "last.safetensors")
    )
    assert exported.returncode == 0, exported.stderr
    weights = load_file(tmp_path / "last.safetensors")
    expected = load(tmp_path / "cache" / "s3" / "tools" / "runs" / "run" / "checkpoints" / "classifier_cp=last_model.th")
    assert weights.keys() == expected["state_dict"].keys()
    assert all(torch.equal(weights[key], value) for key, value in expected["state_dict"].items())
    plotted = tool("noether-plot", f"{url}/runs/run", "--output", str(tmp_path / "plots"))
    assert plotted.returncode == 0, plotted.stderr
    assert list((tmp_path / "plots").glob("*.png"))


def test_evaluation_and_an_initializer_read_a_run_by_its_url(tmp_path, s3):
    url = s3.create_bucket("readers")
    offline_loss = {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"}
    source = train(bucket_tree(url, tmp_path / "cache", callbacks=[offline_loss]))

    # evaluation on another machine: results in the bucket beside the run, nothing left in its cache
    other_cache = tmp_path / "other-machine"
    summary = evaluate({**bucket_tree(url, other_cache, callbacks=[offline_loss])}, run=f"{url}/runs/run", checkpoint="last")
    logged = metrics_rows(source.metrics_file.read_text())[-1]
    assert summary["loss/val/total"] == logged["loss/val/total"]
    assert metrics_rows(s3.objects("readers", "runs/run/eval/")["last.jsonl"])[0]["loss/val/total"] == logged["loss/val/total"]
    assert not any(path.is_file() for path in other_cache.rglob("*"))

    # a new local run starts from the bucket run's weights
    fine_tune = tiny_config(tmp_path / "local", callbacks=[{"kind": "tests.support.callbacks.StartingWeightsRecorder"}])
    fine_tune["trainer"]["max_epochs"] = 1
    fine_tune["model"]["initializers"] = [
        {"kind": INITIALIZER, "run_id": f"{url}/runs/run", "model_name": "classifier", "checkpoint_tag": "last"}
    ]
    started = train(fine_tune)
    assert_same_tensors(
        load(started.run_dir / "starting_weights.0.pt"),
        load(source.checkpoint_dir / "classifier_cp=last_model.th")["state_dict"],
        "weights",
    )


# --------------------------------------------------------------------------------- resume on another machine
def test_a_run_killed_on_one_machine_resumes_exactly_on_another_with_an_empty_cache(tmp_path, s3):
    url = s3.create_bucket("requeue")
    pause, ready, go = pause_at(11, tmp_path)
    go.touch()
    reference = train(
        {
            **bucket_tree(str(tmp_path / "reference"), tmp_path / "unused", callbacks=[pause]),
            "output_path": str(tmp_path / "reference"),
        }
    )

    go.unlink()
    tree = bucket_tree(url, tmp_path / "machine-a", callbacks=[pause])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    process = subprocess.Popen(
        [cli_command("noether-train"), str(config), "--resume", "auto"],
        cwd=tmp_path,
        env={**cli_env(), **s3.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, "update 11")
        checkpoints = Bucket(f"{url}/runs/run/checkpoints")
        # the bucket's newest set is the epoch-end `latest` (update 9) once its upload is done
        wait_for(
            lambda: (
                process.poll() is not None
                or any(item.resumable and item.iteration.update == 9 for item in remote_sets(checkpoints).values())
            ),
            "the upload of update 9",
        )
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, output

    go.touch()
    resumed = train({**tree, "cache_dir": str(tmp_path / "machine-b")}, resume="auto")

    assert resumed.run_dir.is_relative_to(tmp_path / "machine-b")
    log = resumed.log_file.read_text()
    assert "(E1_U9_S1152) from s3://requeue/runs/run" in log  # the newest set the bucket held whole
    assert f"from vm (pid {process.pid}), which is gone" in log.replace(socket.gethostname(), "vm")  # its lease
    for part in ("model", "optim"):
        name = f"classifier_cp=last_{part}.th"
        assert_same_tensors(load(resumed.checkpoint_dir / name), load(reference.checkpoint_dir / name), name)
    bucket_metrics = s3.objects("requeue", "runs/run/")["metrics.jsonl"]
    assert metrics_rows(bucket_metrics) == metrics_rows(reference.metrics_file.read_text())


def assert_same_tensors(actual: Any, expected: Any, where: str) -> None:
    """Every tensor equal bit for bit, every other value equal, through nested dicts and lists."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key, value in expected.items():
            assert_same_tensors(actual[key], value, f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, value in enumerate(expected):
            assert_same_tensors(actual[index], value, f"{where}[{index}]")
    else:
        assert actual == expected, where


def test_a_sharded_run_of_two_processes_resumes_from_the_bucket_in_one_process_on_another_machine(tmp_path, s3):
    url = s3.create_bucket("sharded")
    tree = {**sharded_tree(tmp_path / "unused"), "output_path": f"{url}/runs", "cache_dir": str(tmp_path / "machine-a")}
    result = run_torchrun(write_yaml(tree, tmp_path / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    two_processes = PathProvider(cache_folder(f"{url}/runs", tmp_path / "machine-a"), "run")

    in_bucket = bucket_checkpoints(s3, "sharded")
    assert in_bucket == checkpoint_files(two_processes)
    assert any(".dcp/" in name for name in in_bucket)  # the shards' folders, file by file

    resumed = train({**tree, "cache_dir": str(tmp_path / "machine-b")}, resume="run", checkpoint="E1_U9_S1152")
    log = resumed.log_file.read_text()
    assert "downloaded checkpoint 'E1_U9_S1152' (E1_U9_S1152)" in log
    assert "was written by 2 process(es), this run has 1" in log
    assert_close(weights(resumed), weights(two_processes))


# --------------------------------------------------------------------------------- faults
def test_training_goes_on_while_the_endpoint_is_down_and_uploads_everything_once_it_is_back(tmp_path, s3):
    url = s3.create_bucket("outage")
    pause, ready, go = pause_at(5, tmp_path)
    tree = bucket_tree(url, tmp_path / "cache", callbacks=[pause])

    def take_the_endpoint_away() -> None:
        wait_for(ready.exists, "update 5")
        s3.stop()
        go.touch()
        time.sleep(OUTAGE_SECONDS)  # longer than the client's own retries (~9 s): the uploader sees the outage
        s3.start()

    outage = threading.Thread(target=take_the_endpoint_away)
    outage.start()
    try:
        paths = train(tree)
    finally:
        outage.join()

    assert bucket_checkpoints(s3, "outage") == checkpoint_files(paths)
    assert s3.objects("outage", "runs/run/")["metrics.jsonl"] == paths.metrics_file.read_bytes()
    log = paths.log_file.read_text()
    assert log.count("retrying in the background, training goes on") == 1, log
    assert log.count("is reachable again") == 1, log


def test_a_bucket_unreachable_to_the_end_fails_the_run_naming_what_stayed_in_the_cache(tmp_path, s3):
    url = s3.create_bucket("gone")
    pause, ready, go = pause_at(5, tmp_path)
    tree = bucket_tree(url, tmp_path / "cache", callbacks=[pause], upload_give_up_seconds=2)

    def take_the_endpoint_away() -> None:
        wait_for(ready.exists, "update 5")
        s3.stop()
        go.touch()

    outage = threading.Thread(target=take_the_endpoint_away)
    outage.start()
    try:
        with pytest.raises(UploadError, match=r"stayed unreachable; not uploaded: .*checkpoint 'last'") as raised:
            train(tree)
    finally:
        outage.join()
        s3.start()
    paths = PathProvider(tmp_path / "cache" / "s3" / "gone" / "runs", "run")
    assert str(paths.run_dir) in str(raised.value)
    assert (paths.checkpoint_dir / "classifier_cp=last_model.th").exists()

    # the next start on this machine (here: the relaunch of the finished run) uploads what the cache holds
    # and deletes the parts of sets whose upload the outage cut short
    train(tree, resume="auto")
    in_bucket, in_cache = bucket_checkpoints(s3, "gone"), checkpoint_files(paths)
    assert {name: content for name, content in in_bucket.items() if name in in_cache} == in_cache
    assert all(remote.complete for remote in remote_sets(Bucket(f"{url}/runs/run/checkpoints")).values())


# --------------------------------------------------------------------------------- refusals
def test_a_missing_bucket_is_one_line_before_anything_is_written(tmp_path, s3):
    with pytest.raises(ConfigError, match=r"s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist"):
        train(bucket_tree("s3://no-such-bucket", tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_a_new_run_is_refused_where_the_bucket_already_holds_one_and_a_live_lease_is_refused(tmp_path, s3):
    url = s3.create_bucket("taken")
    tree = bucket_tree(url, tmp_path / "cache")
    train(tree)
    with pytest.raises(ConfigError, match=r"already holds a run; use --resume run"):
        train({**tree, "cache_dir": str(tmp_path / "other-machine")})

    lease = {"host": "node-7", "pid": 4242, "renewed_at": time.time()}
    s3.client().put_object(Bucket="taken", Key="runs/run/.lease.json", Body=json.dumps(lease).encode())
    with pytest.raises(ConfigError, match=r"is being trained by node-7 \(pid 4242\)"):
        train({**tree, "cache_dir": str(tmp_path / "other-machine")}, resume="run")


def test_an_object_store_url_without_its_package_is_one_line_naming_the_extra(tmp_path):
    with pytest.raises(ConfigError, match=r"nosuchscheme://bucket/runs"):
        train(bucket_tree("nosuchscheme://bucket", tmp_path / "cache"))
