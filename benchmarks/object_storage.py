"""Checkpoints into an S3 bucket: upload throughput, and the training stall while an upload runs.

Both against moto's S3 server, started here in a process of its own on 127.0.0.1 (no network):

- **Upload throughput.** A checkpoint file of ``--size`` bytes (a torch.save of float32 tensors) is
  committed into a run directory and uploaded the way a run uploads a committed set
  (``BucketMirror.committed``, then ``close`` waits for it), against boto3's managed multipart upload
  of the same file with its default transfer settings (what ``aws s3 cp`` does). Ratio: boto3's
  seconds / ours (higher is better; target >= 0.9). Beside it, the CPU seconds each upload costs
  this process and moto's server: here both share the machine's cores, and the server's share sets
  the pace, while against a real endpoint only the client's share is spent on the training machine.
- **Training stall.** Median time per step of a CPU training loop (an MLP, forward, backward, AdamW)
  while such an upload runs in the background, against the same loop without one. Ratio: with /
  without (target <= 1.05). The server is pinned to the machine's last core, and the loop runs with
  one torch thread per other core: the endpoint is off the loop's cores, as a real one is. The
  uploader's threads are not pinned. Beside it, the same with the loop on every core, the server's
  too (there a torch thread shares its core with the server's parsing, and every step waits for that
  thread), and both figures while boto3 uploads from a thread of the process instead.

Each round runs every variant once, alternating their order; a figure is the median over rounds.

    python benchmarks/object_storage.py [--size 1_000_000_000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET_THROUGHPUT_RATIO = 0.9
TARGET_STALL_RATIO = 1.05
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
STEP_WIDTH = 512


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_core() -> int | None:
    """The core moto's server is pinned to: the last one, where the machine has more than one."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return cores[-1] if len(cores) > 1 else None


def loop_threads() -> int:
    """Torch threads for the loop on the cores the server leaves it."""
    return max(1, len(os.sched_getaffinity(0)) - 1) if server_core() is not None else torch.get_num_threads()


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    core = server_core()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=None if core is None else functools.partial(os.sched_setaffinity, 0, {core}),
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def write_checkpoint(path: Path, size: int) -> None:
    tensors = {f"layer{index}": torch.randn(size // 4 // 16) for index in range(16)}
    torch.save(tensors, path)


def upload_ours(run_dir: Path, checkpoint: Path, bucket_url: str) -> float:
    from noether.core.object_storage import Bucket, BucketMirror

    mirror = BucketMirror(Bucket(bucket_url), run_dir, give_up_after_seconds=60)
    started = time.perf_counter()
    mirror.committed([checkpoint])
    mirror.close()
    return time.perf_counter() - started


def upload_boto3(checkpoint: Path, bucket: str, key: str, endpoint: str) -> float:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=endpoint)
    started = time.perf_counter()
    client.upload_file(str(checkpoint), bucket, key, Config=TransferConfig())
    return time.perf_counter() - started


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux's /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(upload: callable, server_pid: int) -> tuple[float, float, float]:
    """(wall seconds, this process's CPU seconds, the server's CPU seconds) of one upload."""
    client, server = time.process_time(), server_cpu_seconds(server_pid)
    wall = upload()
    return wall, time.process_time() - client, server_cpu_seconds(server_pid) - server


def step_times(seconds: float, busy: callable | None = None, threads: int | None = None) -> list[float]:
    """Times of training steps for `seconds` (or, with `busy`, until it returns True), on `threads`
    torch threads (all cores by default)."""
    all_threads = torch.get_num_threads()
    torch.set_num_threads(threads or all_threads)
    try:
        return _step_times(seconds, busy)
    finally:
        torch.set_num_threads(all_threads)


def _step_times(seconds: float, busy: callable | None) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(STEP_WIDTH, STEP_WIDTH), torch.nn.ReLU(), torch.nn.Linear(STEP_WIDTH, 10))
    optimizer = torch.optim.AdamW(model.parameters())
    batch = torch.randn(256, STEP_WIDTH)
    times = []
    end = time.monotonic() + seconds
    while (busy() if busy is not None else time.monotonic() < end) or len(times) < 5:
        started = time.perf_counter()
        model(batch).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def stall_with_upload(run_dir: Path, checkpoint: Path, bucket_url: str, threads: int | None) -> list[float]:
    from noether.core.object_storage import Bucket, BucketMirror

    mirror = BucketMirror(Bucket(bucket_url), run_dir, give_up_after_seconds=60)
    mirror.committed([checkpoint])
    times = step_times(0, busy=lambda: bool(mirror.uploader._jobs), threads=threads)
    mirror.close()
    return times


def stall_with_boto3(checkpoint: Path, bucket: str, key: str, endpoint: str, threads: int | None) -> list[float]:
    """The same loop while boto3 uploads the file from a thread of this process: what any in-process
    upload costs the loop on this machine."""
    import threading

    uploading = threading.Thread(target=upload_boto3, args=(checkpoint, bucket, key, endpoint))
    uploading.start()
    times = step_times(0, busy=uploading.is_alive, threads=threads)
    uploading.join()
    return times


def empty_bucket(endpoint: str) -> None:
    """moto keeps objects in memory: each round starts with an empty bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench"):
        for item in page.get("Contents", []):
            client.delete_object(Bucket="bench", Key=item["Key"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000_000, help="bytes of the checkpoint file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()

    os.environ.update(CREDENTIALS)
    server, endpoint = start_server()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as folder:
            run_dir = Path(folder) / "run"
            (run_dir / "checkpoints").mkdir(parents=True)
            checkpoint = run_dir / "checkpoints" / "model_cp=E0_U1_S1_model.th"
            write_checkpoint(checkpoint, arguments.size)
            size = checkpoint.stat().st_size
            ours, theirs = [], []
            cpu: dict[str, list[tuple[float, float]]] = {"ours": [], "boto3": []}  # (client, server) seconds
            placements = {"off": loop_threads(), "shared": torch.get_num_threads()}  # the loop's torch threads
            steps = {placement: {"ours": [], "boto3": [], "alone": []} for placement in placements}  # median s
            for round_index in range(arguments.rounds):
                order = ["ours", "boto3"] if round_index % 2 == 0 else ["boto3", "ours"]
                for variant in order:
                    empty_bucket(endpoint)
                    if variant == "ours":
                        upload = functools.partial(upload_ours, run_dir, checkpoint, f"s3://bench/ours{round_index}")
                    else:
                        upload = functools.partial(upload_boto3, checkpoint, "bench", f"boto3{round_index}/c.th", endpoint)
                    wall, client_cpu, server_cpu = with_cpu(upload, server.pid)
                    (ours if variant == "ours" else theirs).append(wall)
                    cpu[variant].append((client_cpu, server_cpu))
                line = f"round {round_index + 1}: ours {ours[-1]:.2f} s, boto3 {theirs[-1]:.2f} s"
                for placement, threads in placements.items():
                    step = steps[placement]
                    empty_bucket(endpoint)
                    with_upload = stall_with_upload(run_dir, checkpoint, f"s3://bench/stall{round_index}", threads)
                    step["ours"].append(statistics.median(with_upload))
                    empty_bucket(endpoint)
                    key = f"stall-boto3{round_index}/c.th"
                    step["boto3"].append(statistics.median(stall_with_boto3(checkpoint, "bench", key, endpoint, threads)))
                    step["alone"].append(statistics.median(step_times(sum(with_upload), threads=threads)))
                    line += (
                        f"; step on {threads} thread(s) {step['alone'][-1] * 1e3:.2f} ms alone, "
                        f"{step['ours'][-1] * 1e3:.2f} while we upload ({sum(with_upload):.1f} s), "
                        f"{step['boto3'][-1] * 1e3:.2f} while boto3 does"
                    )
                print(line, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    throughput = statistics.median(t / o for t, o in zip(theirs, ours))
    print(f"checkpoint of {size / 1e9:.2f} GB to moto's S3 server on 127.0.0.1")
    print(f"upload throughput, this project / boto3 multipart: {throughput:.3f} (target >= {TARGET_THROUGHPUT_RATIO})")
    print(f"  MB/s: this project {size / 1e6 / statistics.median(ours):.0f}, boto3 {size / 1e6 / statistics.median(theirs):.0f}")
    for side, name in (("ours", "this project"), ("boto3", "boto3")):
        client_cpu = statistics.median(client for client, _ in cpu[side]) * 1e9 / size
        server_cpu = statistics.median(server for _, server in cpu[side]) * 1e9 / size
        print(f"  CPU s/GB, {name}: client {client_cpu:.2f}, moto's server {server_cpu:.2f}")
    client_ratio = statistics.median(b[0] / o[0] for b, o in zip(cpu["boto3"], cpu["ours"]))
    print(f"client CPU, boto3 / this project: {client_ratio:.3f} (what an upload costs the training machine)")
    stall = {
        placement: {side: statistics.median(s / a for s, a in zip(step[side], step["alone"])) for side in ("ours", "boto3")}
        for placement, step in steps.items()
    }
    core = server_core()
    print(
        f"training step while uploading / without, the server on core {core}, the loop on {placements['off']} "
        f"thread(s): {stall['off']['ours']:.3f} (target <= {TARGET_STALL_RATIO}); while boto3 uploads: "
        f"{stall['off']['boto3']:.3f}"
    )
    print(
        f"  the loop on every core ({placements['shared']} threads), the server's too: {stall['shared']['ours']:.3f}; "
        f"while boto3 uploads: {stall['shared']['boto3']:.3f}"
    )
    if arguments.json:
        figures = {
            "bytes": size,
            "throughput_ratio": throughput,
            "stall_ratio": stall["off"]["ours"],
            "stall_ratios": stall,
            "ours_s": ours,
            "boto3_s": theirs,
            "client_cpu_ratio": client_ratio,
            "cpu_s": cpu,
        }
        arguments.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
