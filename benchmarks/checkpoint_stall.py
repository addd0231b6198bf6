"""How long does saving a checkpoint stall the training loop, and how fast is the durable write?

Compares, on the weights and AdamW state of a model with ``--params`` parameters:

- stall of a synchronous ``torch.save`` to a file;
- stall of ``CheckpointWriter.save`` (asynchronous): the first save, which allocates its host
  buffers, and repeated saves of the same path, which reuse them;
- a plain copy of the same tensors into preallocated tensors, the floor for any consistent snapshot;
- durable throughput: the writer end to end (save + wait, fsync'ed and renamed) against writing the
  same number of bytes with ``open().write()`` + fsync (the writer starts the disk write while it
  serializes, the plain write leaves it to the fsync, as most code does). Like the writer, which must keep the previous
  checkpoint until the new one is complete, the plain write goes to a new file next to the previous
  one; truncating the file in place would let it recycle the old file's page cache, which an atomic
  write cannot. Neither side waits for the previous file to be freed (the writer deletes it after
  the wait returns; the plain write deletes it after its timing); that time is reported apart.
  Both durable writes start the same way: dirty pages flushed, then a pause of ``SETTLE_SECONDS``.
  On a VM with free page reporting (this project's CI machines: ``page_reporting_order`` on the
  kernel command line) memory freed in the last two seconds is hot, while older free memory has been
  handed back to the host and costs about 1 s per GB to fault in again; without the pause, whichever
  write happened to follow a deletion got the hot pages and looked twice as fast. The pause makes
  both pay what a save an epoch after the previous one pays.
- the host memory the writer's snapshot buffers hold.

With ``--device cuda`` the model lives on the GPU: the snapshot is a device-to-host copy into
pinned buffers on a side stream, and the memory-copy floor copies into pinned host tensors.

Each figure is the median of ``--repeats`` rounds; the rounds interleave the methods so that they
see the same disk conditions.

    python benchmarks/checkpoint_stall.py [--params 100_000_000] [--repeats 5] [--json out.json]
"""

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from noether.core.writers.checkpoint_writer import CheckpointWriter

WIDTH = 1024  # many mid-sized tensors, like a real model
WRITE_CHUNK = 64 << 20
SETTLE_SECONDS = 3  # longer than the kernel's 2 s delay before it reports free pages to the host
TARGET_STALL_RATIO = 1.5
TARGET_THROUGHPUT_RATIO = 0.9


def build_payload(params: int, device: str = "cpu") -> dict:
    """A checkpoint payload: Linear weights plus AdamW state after one real step."""
    layers = max(1, params // (WIDTH * WIDTH + WIDTH))
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(8, WIDTH, device=device)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "checkpoint_tag": "latest"}


def tensors_of(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for value in values for t in tensors_of(value)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def settle() -> None:
    """Flushes dirty pages and waits until recently freed memory is as cold as any other."""
    os.sync()
    time.sleep(SETTLE_SECONDS)


def plain_write_fsync(path: Path, data: memoryview) -> None:
    with open(path, "wb") as f:
        for start in range(0, len(data), WRITE_CHUNK):
            f.write(data[start : start + WRITE_CHUNK])
        f.flush()
        os.fsync(f.fileno())


def run(params: int, repeats: int = 5, directory: str | None = None, device: str = "cpu") -> dict:
    on_gpu = device != "cpu"
    payload = build_payload(params, device)
    tensors = tensors_of(payload)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in tensors]

    def memcopy() -> None:
        for copy, tensor in zip(copies, tensors):
            copy.copy_(tensor, non_blocking=tensor.is_cuda)
        if on_gpu:
            torch.cuda.synchronize()

    memcopy()  # fault in the destination pages, as the writer's reused buffers are

    with tempfile.TemporaryDirectory(dir=directory) as tmp, CheckpointWriter() as writer:
        tmp = Path(tmp)
        latest, sync_path = tmp / "cp=latest_model.th", tmp / "sync.th"
        first_stall = timed(lambda: writer.save(latest, payload))
        first_end_to_end = first_stall + timed(writer.wait)
        file_bytes = latest.stat().st_size
        data = memoryview(torch.randint(0, 256, (file_bytes,), dtype=torch.uint8).numpy())
        plain_write_fsync(tmp / "plain1.bin", data)  # the "previous" file of round 0

        results = {"sync": [], "async": [], "end_to_end": [], "memcopy": [], "plain": [], "free_previous": []}
        for i in range(repeats):
            os.sync()
            results["sync"].append(timed(lambda: torch.save(payload, sync_path)))
            settle()
            # back to back, so that both find their source and destination memory equally warm
            results["memcopy"].append(timed(memcopy))
            results["async"].append(timed(lambda: writer.save(latest, payload)))
            results["end_to_end"].append(results["async"][-1] + timed(writer.wait))
            writer.call_after_writes(lambda: None)  # queued behind the deletion of the replaced file:
            writer.wait()  # the next measurements do not overlap it
            settle()
            plain, previous = tmp / f"plain{i % 2}.bin", tmp / f"plain{(i + 1) % 2}.bin"
            results["plain"].append(timed(functools.partial(plain_write_fsync, plain, data)))
            results["free_previous"].append(timed(previous.unlink))
        median = {name: statistics.median(times) for name, times in results.items()}
        buffer_bytes = writer.buffer_bytes

    writer_throughput = file_bytes / median["end_to_end"]
    plain_throughput = file_bytes / median["plain"]
    return {
        "device": device,
        "params": sum(t.numel() for t in payload["state_dict"].values()),
        "tensors": len(tensors),
        "state_bytes": state_bytes,
        "file_bytes": file_bytes,
        "repeats": repeats,
        "stall_sync_torch_save_s": median["sync"],
        "stall_async_first_s": first_stall,
        "stall_async_s": median["async"],
        "memcopy_s": median["memcopy"],
        "writer_end_to_end_s": median["end_to_end"],
        "writer_end_to_end_first_s": first_end_to_end,
        "plain_write_fsync_s": median["plain"],
        "free_previous_file_s": median["free_previous"],
        "writer_buffer_bytes": buffer_bytes,
        "writer_throughput_bytes_per_s": writer_throughput,
        "plain_write_fsync_throughput_bytes_per_s": plain_throughput,
        "stall_async_over_memcopy": median["async"] / median["memcopy"],
        "stall_sync_over_async": median["sync"] / median["async"],
        "durable_throughput_over_plain_write_fsync": writer_throughput / plain_throughput,
    }


def print_table(r: dict) -> None:
    print(
        f"{r['params'] / 1e6:.0f}M params on {r['device']}, {r['tensors']} tensors, {r['file_bytes'] / 1e9:.2f} GB per file, "
        f"median of {r['repeats']}; the writer's snapshot buffers hold {r['writer_buffer_bytes'] / 1e9:.2f} GB of host memory"
    )
    rows = [
        ("stall: sync torch.save", r["stall_sync_torch_save_s"]),
        ("stall: CheckpointWriter.save, first", r["stall_async_first_s"]),
        ("stall: CheckpointWriter.save, repeated", r["stall_async_s"]),
        ("memory copy into preallocated tensors", r["memcopy_s"]),
        ("writer save + wait (durable)", r["writer_end_to_end_s"]),
        ("plain write + fsync, same bytes", r["plain_write_fsync_s"]),
        ("deleting the previous file (both defer it)", r["free_previous_file_s"]),
    ]
    for label, seconds in rows:
        print(f"  {label:<40} {seconds * 1e3:10.1f} ms")
    ratios = [
        ("stall_async / memcopy", r["stall_async_over_memcopy"], f"<= {TARGET_STALL_RATIO}"),
        (
            "durable_throughput / plain_write_fsync",
            r["durable_throughput_over_plain_write_fsync"],
            f">= {TARGET_THROUGHPUT_RATIO}",
        ),
    ]
    for label, ratio, target in ratios:
        print(f"  {label:<40} {ratio:10.2f}    (target {target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", help="where to write the files (default: the system temp directory)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; nothing measured")
    result = run(args.params, args.repeats, args.dir, args.device)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
