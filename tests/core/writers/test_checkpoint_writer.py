import inspect
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from noether.core import storage
from noether.core.writers import checkpoint_writer
from noether.core.writers.checkpoint_writer import (
    CheckpointLoadError,
    CheckpointWriteError,
    CheckpointWriter,
    load_checkpoint,
)

KILL_TARGET = Path(__file__).with_name("_kill_target.py")


class Custom:
    pass


def trained_model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def assert_same(actual, expected) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected.cpu())
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    else:
        assert actual == expected


def tmp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


@pytest.mark.parametrize("asynchronous", [True, False])
def test_round_trip(tmp_path, asynchronous):
    model, optimizer = trained_model_and_optimizer()
    payload = {
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "checkpoint_tag": "latest",
        "extras": [1, 2.5, None, "x", (torch.arange(3), {"half": torch.ones(2, dtype=torch.float16)})],
    }
    path = tmp_path / "cp=latest_model.th"
    with CheckpointWriter(asynchronous=asynchronous) as writer:
        writer.save(path, payload)
    loaded = load_checkpoint(path)
    assert_same(loaded, payload)
    assert loaded["state_dict"]._metadata == payload["state_dict"]._metadata
    assert tmp_files(tmp_path) == []

    fresh_model, fresh_optimizer = trained_model_and_optimizer()
    fresh_model.load_state_dict(loaded["state_dict"])
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize("asynchronous", [True, False])
def test_a_checkpoint_of_many_writeback_chunks_round_trips_exactly(tmp_path, asynchronous):
    # larger than several of the 8 MB chunks whose disk write starts early, with odd sizes so that
    # chunk boundaries fall inside tensors and inside the archive's records
    generator = torch.Generator().manual_seed(0)
    payload = {f"tensor{i}": torch.randn(size, generator=generator) for i, size in enumerate([3_000_001, 17, 5_242_879])}
    path = tmp_path / "cp=latest_model.th"
    with CheckpointWriter(asynchronous=asynchronous) as writer:
        writer.save(path, payload)
    assert path.stat().st_size > 3 * (8 << 20)
    assert_same(load_checkpoint(path), payload)


def test_snapshot_buffers_keep_every_tensor_in_a_storage_of_its_own(tmp_path):
    # the buffers of one snapshot share one memory map; the file must not show it
    generator = torch.Generator().manual_seed(0)
    payload = {
        "weight": torch.randn(1000, 300, generator=generator).t(),  # not contiguous
        "half": torch.randn(7, 3, generator=generator).half(),
        "step": torch.tensor(12),
        "empty": torch.zeros(0, 5),
        "bytes": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=generator),
    }
    path = tmp_path / "cp=latest_model.th"
    with CheckpointWriter() as writer:
        for _ in range(2):  # the second save reuses the buffers of the first
            writer.save(path, payload)
            writer.wait()
    loaded = load_checkpoint(path)
    assert_same(loaded, payload)
    for name, tensor in loaded.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


def test_payload_is_snapshotted_when_save_returns(tmp_path):
    weight = torch.zeros(1000)
    # "tied" is another tensor object on the same memory, as tied weights are in a state_dict
    payload = {"state_dict": {"weight": weight, "tied": weight.detach()}, "history": [1, 2]}
    with CheckpointWriter() as writer:
        # a larger write ahead in the queue keeps the second one pending while we mutate
        writer.save(tmp_path / "big.th", {"blob": torch.zeros(4 << 20)})
        writer.save(tmp_path / "small.th", payload)
        weight.fill_(7)
        payload["history"].append(3)
        payload["state_dict"]["new"] = torch.ones(1)
    loaded = load_checkpoint(tmp_path / "small.th")
    assert torch.equal(loaded["state_dict"]["weight"], torch.zeros(1000))
    assert loaded["history"] == [1, 2]
    assert set(loaded["state_dict"]) == {"weight", "tied"}
    # tied tensors stay one tensor in the file
    assert loaded["state_dict"]["weight"].data_ptr() == loaded["state_dict"]["tied"].data_ptr()


def test_repeated_saves_reuse_buffers_and_last_wins(tmp_path):
    weights = torch.zeros(1024, 512)  # 2 MiB: copied into buffers (smaller payloads are serialized in save)
    path = tmp_path / "cp=latest_model.th"
    with CheckpointWriter(max_pending_bytes=2 * weights.numel() * weights.element_size()) as writer:
        pointers = set()
        for step in range(5):
            weights.fill_(step)
            writer.save(path, {"step": step, "weights": weights})
            writer.wait()
            # a periodic name with the same structure does not allocate either
            writer.save(tmp_path / f"cp=S{step}_model.th", {"step": step, "weights": weights})
            writer.wait()
            ((buffer_set,),) = writer._pool.values()
            pointers.add(buffer_set.tensors[0].data_ptr())
        assert len(pointers) == 1

        for step in range(5, 25):  # back to back, without waiting
            weights.fill_(step)
            writer.save(path, {"step": step, "weights": weights})
        assert len(writer._pool) == 1
        assert len(next(iter(writer._pool.values()))) <= 2
    loaded = load_checkpoint(path)
    assert loaded["step"] == 24 and torch.equal(loaded["weights"], torch.full((1024, 512), 24.0))


@pytest.mark.parametrize("asynchronous", [True, False])
def test_failed_write_is_reported_and_keeps_previous_file(tmp_path, asynchronous):
    path = tmp_path / "cp=latest_model.th"
    writer = CheckpointWriter(asynchronous=asynchronous)
    writer.save(path, {"step": 1, "weights": torch.ones(10)})
    writer.wait()

    # fails half-way through torch.save, after the temporary file was created
    with pytest.raises(CheckpointWriteError, match=re.escape(str(path))):
        writer.save(path, {"step": 2, "weights": torch.zeros(10), "bad": lambda: None})
        writer.wait()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["weights"], torch.ones(10))
    assert tmp_files(tmp_path) == []

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(CheckpointWriteError, match=re.escape(str(not_a_dir / "x.th"))):
        writer.save(not_a_dir / "x.th", {"step": 3})
        writer.wait()
    writer.close()


def test_a_small_payload_that_cannot_be_serialized_fails_in_save_and_the_writer_goes_on(tmp_path):
    path = tmp_path / "cp=latest_trainer.th"
    with CheckpointWriter() as writer:
        with pytest.raises(CheckpointWriteError, match=re.escape(str(path))):
            writer.save(path, {"step": 1, "bad": lambda: None})  # serialized in save: no wait needed to see it
        writer.save(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 2}
    assert tmp_files(tmp_path) == []


def test_background_error_surfaces_from_next_save(tmp_path):
    with CheckpointWriter() as writer:
        writer.save(tmp_path / "missing_dir" / "a.th", {"step": 1})
        writer.save(tmp_path / "b.th", {"step": 2})
        written = threading.Event()
        writer.call_after_writes(written.set)
        assert written.wait(30)
        with pytest.raises(CheckpointWriteError, match="missing_dir"):
            writer.save(tmp_path / "c.th", {"step": 3})
        writer.save(tmp_path / "c.th", {"step": 3})  # reported once, then the writer goes on
    assert load_checkpoint(tmp_path / "b.th") == {"step": 2}
    assert load_checkpoint(tmp_path / "c.th") == {"step": 3}


@pytest.mark.parametrize("asynchronous", [True, False])
def test_actions_run_after_the_writes_before_them_and_report_errors(tmp_path, asynchronous):
    seen = []
    with CheckpointWriter(asynchronous=asynchronous) as writer:
        writer.save(tmp_path / "a.th", {"step": 1})
        writer.call_after_writes(lambda: seen.append(load_checkpoint(tmp_path / "a.th")["step"]))
        writer.wait()
        assert seen == [1]

        def fail() -> None:
            raise OSError("disk gone")

        with pytest.raises(CheckpointWriteError, match="disk gone"):
            writer.call_after_writes(fail)
            writer.wait()


def test_bytes_in_flight_are_bounded(tmp_path):
    weights = torch.zeros(512, 1024)  # 2 MiB
    with CheckpointWriter(max_pending_bytes=weights.numel() * weights.element_size()) as writer:
        for step in range(6):
            writer.save(tmp_path / f"cp=S{step}_model.th", {"weights": weights})
            # one payload fills the budget: the next save waited until the previous one was written
            assert writer._pending_bytes <= writer.max_pending_bytes
        assert len(next(iter(writer._pool.values()))) == 1
    assert len(list(tmp_path.glob("cp=S*_model.th"))) == 6


def test_closed_writer_refuses_saves(tmp_path):
    writer = CheckpointWriter()
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.save(tmp_path / "a.th", {})


def test_stale_tmp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = storage.HOST
    stale = f".a.th~{host}~{dead.pid}~0.tmp"
    kept = [
        f".a.th~{host}~{os.getpid()}~0.tmp",  # a live process (us)
        f".a.th~other-host~{dead.pid}~0.tmp",  # maybe alive on a shared filesystem
        ".notes.tmp",  # not ours
    ]
    for name in [stale, *kept]:
        (tmp_path / name).write_bytes(b"partial")
    with CheckpointWriter(asynchronous=False) as writer:
        writer.save(tmp_path / "b.th", {"step": 1})
    assert tmp_files(tmp_path) == sorted(kept)


def test_load_checkpoint_errors(tmp_path):
    def load_error(path: Path) -> str:
        with pytest.raises(CheckpointLoadError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message
        return message

    assert load_error(tmp_path / "cp=latest_model.th").startswith("checkpoint file not found:")

    good = tmp_path / "good.th"
    CheckpointWriter(asynchronous=False).save(good, {"weights": torch.randn(1000)})
    data = good.read_bytes()
    for cut in [len(data) // 2, 10, 0]:
        truncated = tmp_path / f"truncated_{cut}.th"
        truncated.write_bytes(data[:cut])
        assert "truncated or corrupt" in load_error(truncated)

    custom = tmp_path / "custom.th"
    torch.save({"object": Custom()}, custom)
    message = load_error(custom)
    assert "refusing to load" in message and "Custom" in message

    pickled = tmp_path / "pickled.th"
    pickled.write_bytes(pickle.dumps(Custom(), protocol=2))
    assert "weights_only=True rejected it" in load_error(pickled)

    text = tmp_path / "notes.th"
    text.write_text("hello\n")
    assert "not a torch checkpoint" in load_error(text)

    tensor = tmp_path / "tensor.th"
    torch.save(torch.ones(2), tensor)
    assert "not a checkpoint dict" in load_error(tensor)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_reported_as_corrupt_not_as_unsafe(tmp_path, seed):
    path = tmp_path / "noise.th"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointLoadError) as info:
        load_checkpoint(path)
    assert str(info.value) in (
        f"corrupt or not a torch checkpoint file (no zip archive): {path}",
        f"checkpoint file is truncated or corrupt: {path}",
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_payload_is_snapshotted(tmp_path):
    expected = torch.arange(1 << 20, dtype=torch.float32)
    weights = expected.cuda()
    with CheckpointWriter() as writer:
        writer.save(tmp_path / "a.th", {"weights": weights})
        weights.zero_()
    assert torch.equal(load_checkpoint(tmp_path / "a.th")["weights"], expected)


def assert_checkpoints_consistent(directory: Path) -> int:
    """Every file under a final name loads and holds the step its name says; returns latest's step.

    Writes complete in submission order and latest is saved before the periodic checkpoint of the
    same step, so no periodic checkpoint may be ahead of latest.
    """
    steps = {}
    for path in directory.iterdir():
        if path.name.startswith("."):
            continue
        checkpoint = load_checkpoint(path)
        step = checkpoint["step"]
        tag = "latest" if path.name == "cp=latest_model.th" else f"S{step}"
        assert path.name == f"cp={tag}_model.th" and checkpoint["checkpoint_tag"] == tag
        weights = checkpoint["state_dict"]["weights"]
        assert weights.numel() == 1 << 20 and bool((weights == step).all()), path
        steps[tag] = step
    latest = steps.pop("latest", 0)
    assert all(step <= latest for step in steps.values())
    return latest


def test_sigkill_never_leaves_a_torn_checkpoint(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    src = Path(checkpoint_writer.__file__).parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [sys.executable, str(KILL_TARGET), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        latest_step = 0
        for _ in range(24):
            server.stdin.write("run\n")
            server.stdin.flush()
            line = server.stdout.readline()
            assert line.startswith("running"), f"kill target failed (seed {seed}): {line!r}"
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(int(line.split()[1]), signal.SIGKILL)
            server.stdin.write("reap\n")
            server.stdin.flush()
            line = server.stdout.readline()
            assert line.startswith("reaped"), f"kill target failed (seed {seed}): {line!r}"
            status = int(line.split()[1])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"seed {seed}"
            step = assert_checkpoints_consistent(tmp_path)
            assert step >= latest_step, f"seed {seed}: latest went back from {latest_step} to {step}"
            latest_step = step
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    assert latest_step > 2 * 8, "the children wrote too few checkpoints to test anything"
    # a new writer in that directory clears what the killed processes left behind
    CheckpointWriter(asynchronous=False).save(tmp_path / "cp=latest_model.th", {"step": 0})
    assert tmp_files(tmp_path) == []


def interrupt_at_line(function, line: int):
    """A trace function raising KeyboardInterrupt when `function` reaches `line`, where a Ctrl-C may land."""

    def trace_calls(frame, event, arg):
        return trace_lines if frame.f_code is function.__code__ else None

    def trace_lines(frame, event, arg):
        if event == "line" and frame.f_lineno == line:
            raise KeyboardInterrupt
        return trace_lines

    return trace_calls


@pytest.mark.parametrize("method", ["save", "call_after_writes"])
def test_a_keyboard_interrupt_at_any_line_of_a_save_leaves_nothing_pending(tmp_path, method):
    """Ctrl-C at every line of `save` / `call_after_writes` in turn: `wait` and `close` still return and the
    writer goes on writing (a write counted as pending but never queued would make them hang).

    Not inside the `finally:` that queues: a signal handler runs only at a call or a backward jump, and that
    block makes none before its `put`, while a line tracer would stop it at its first line."""
    function = getattr(CheckpointWriter, method)
    source_lines, first_line = inspect.getsourcelines(function)
    finally_line = first_line + next((i for i, text in enumerate(source_lines) if text.strip() == "finally:"), len(source_lines))
    lines = sorted({line for _, _, line in function.__code__.co_lines() if line is not None and first_line < line < finally_line})
    interrupted = 0
    for line in lines:
        writer = CheckpointWriter(asynchronous=True)
        target = tmp_path / f"line{line}.th"
        sys.settrace(interrupt_at_line(function, line))
        try:
            if method == "save":
                writer.save(target, {"weights": torch.ones(3)})
            else:
                writer.call_after_writes(lambda: None)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        waiter = threading.Thread(target=writer.close, daemon=True)
        waiter.start()
        waiter.join(timeout=10)
        assert not waiter.is_alive(), f"close() hangs after a KeyboardInterrupt at line {line} of {method}"
        after = CheckpointWriter(asynchronous=True)
        after.save(target, {"weights": torch.zeros(3)})
        after.close()
        assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.zeros(3))
    assert interrupted >= 3  # the lines run on the asynchronous path were reached and interrupted
