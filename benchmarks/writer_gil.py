"""Does the checkpoint writer's thread take Python time from the training thread?

The training thread's own Python (data loading, kernel launches) runs only while it holds the
GIL, so a writer thread that serializes with the GIL held slows every update during a write, not
just the saving one. This measures how much pure-Python work the main thread gets done per second
while the writer writes a checkpoint (weights and AdamW state of ``--params`` parameters, durable),
against the same work while a plain write of the same bytes (``file.write`` of each tensor's memory,
then ``fsync``: the GIL released for all of it) runs, and with nothing written. The plain write is
the floor: on a machine with few cores any writer takes memory bandwidth and a core. It also
reports the main thread's longest pause: with the GIL released for the bulk of the bytes, about the
interpreter's switch interval (5 ms).

Torch uses one thread here, so that on a small machine the writer has a core of its own.
Each figure is the median of ``--repeats`` rounds; the rounds interleave the variants.

    python benchmarks/writer_gil.py [--params 100_000_000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from checkpoint_stall import build_payload, tensors_of

from noether.core.writers.checkpoint_writer import CheckpointWriter

IDLE_SECONDS = 2.0


def python_work(until: Callable[[], bool]) -> tuple[float, float]:
    """Runs a small pure-Python loop until `until()`; returns (loops per second, longest loop in seconds)."""
    loops, longest = 0, 0.0
    start = previous = time.perf_counter()
    while not until():
        total = 0
        for value in range(500):
            total += value
        now = time.perf_counter()
        longest = max(longest, now - previous)
        previous = now
        loops += 1
    return loops / (previous - start), longest


def measure_during(write: Callable[[], None]) -> tuple[float, float]:
    """Python work on this thread while `write` runs on another."""
    done = threading.Event()

    def writing() -> None:
        try:
            write()
        finally:
            done.set()

    thread = threading.Thread(target=writing)
    thread.start()
    result = python_work(done.is_set)
    thread.join()
    return result


def idle() -> tuple[float, float]:
    deadline = time.perf_counter() + IDLE_SECONDS
    return python_work(lambda: time.perf_counter() > deadline)


def run(params: int, repeats: int = 3, directory: str | None = None) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        payload = build_payload(params)
        tensors = tensors_of(payload)
        results: dict[str, list[tuple[float, float]]] = {"idle": [], "writer": [], "plain_write": []}
        with tempfile.TemporaryDirectory(dir=directory) as folder, CheckpointWriter(asynchronous=False) as writer:
            path = Path(folder) / "checkpoint.th"

            def with_writer() -> None:
                writer.save(path, payload)

            def plain_write() -> None:
                with open(Path(folder) / "plain.bin", "wb") as file:
                    for tensor in tensors:
                        file.write(memoryview(tensor.numpy()))
                    file.flush()
                    os.fsync(file.fileno())

            variants = {
                "idle": idle,
                "writer": lambda: measure_during(with_writer),
                "plain_write": lambda: measure_during(plain_write),
            }
            for round_index in range(repeats):
                order = list(variants.items())
                for name, variant in order if round_index % 2 == 0 else reversed(order):
                    results[name].append(variant())
    finally:
        torch.set_num_threads(threads)
    rate = {name: statistics.median(r for r, _ in values) for name, values in results.items()}
    pause = {name: statistics.median(p for _, p in values) for name, values in results.items()}
    return {
        "state_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "python_work_writer_vs_plain_write": rate["writer"] / rate["plain_write"],
        "python_work_writer_vs_idle": rate["writer"] / rate["idle"],
        "python_work_plain_write_vs_idle": rate["plain_write"] / rate["idle"],
        "longest_pause_ms_idle": pause["idle"] * 1e3,
        "longest_pause_ms_writer": pause["writer"] * 1e3,
        "longest_pause_ms_plain_write": pause["plain_write"] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: the system's temporary folder)")
    arguments = parser.parse_args()
    print(json.dumps(run(arguments.params, arguments.repeats, arguments.dir), indent=2))


if __name__ == "__main__":
    main()
