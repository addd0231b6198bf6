"""How much training state does one process hold under FSDP, and how long does a sharded checkpoint stall it?

Runs the same model (a stack of ``--layers`` Linear(``--width``, ``--width``) layers, AdamW, one EMA
factor) once in one process and once under ``torchrun --nproc_per_node 2`` (gloo, CPU), sharded the
way ``trainer.parallelism: fsdp`` shards it (each direct child, then the root), and prints per rank:

- the bytes of parameters + optimizer state + EMA weights this rank holds after a few updates
  (its local shards; the target ratio 2 processes / 1 process is <= 0.55);
- the stall of a sharded checkpoint of weights, optimizer state and EMA through the CheckpointStore
  (median of ``--repeats`` saves; every rank writes its own shards).

    python benchmarks/fsdp_memory.py [--width 1024] [--layers 8] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from noether.core import distributed, fsdp
from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.models.ema import ModuleEma
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointWriter


def local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if isinstance(t, torch.Tensor))


def worker(args: argparse.Namespace) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    if distributed.is_distributed():
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = ModuleEma(model, [0.999])
    for _ in range(3):
        model(torch.randn(8, args.width)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
    state_bytes = (
        local_bytes(model.parameters())
        + local_bytes(value for state in optimizer.state.values() for value in state.values())
        + local_bytes(ema.state_dict(0.999).values())
    )
    directory = Path(distributed.broadcast_from_main(tempfile.mkdtemp()))
    store = CheckpointStore(directory, "bench", CheckpointWriter(asynchronous=True), sharded=True)
    stalls = []
    for repeat in range(args.repeats):
        members = {
            Member("net", "model"): {"state_dict": model.state_dict()},
            Member("net", "optim"): {"state_dict": fsdp.optimizer_state(model, optimizer)},
            Member("net", "model", 0.999): {"state_dict": ema.state_dict(0.999)},
        }
        distributed.barrier()
        start = time.perf_counter()
        store.save("latest", TrainingIteration(0, repeat + 1, 8), members, {"note": repeat} if distributed.rank() == 0 else None)
        stalls.append(time.perf_counter() - start)
        if distributed.rank() == 0:
            store.wait()
    if distributed.rank() == 0:
        store.wait()
    print(json.dumps({"rank": distributed.rank(), "state_bytes": state_bytes, "stall_s": statistics.median(stalls)}), flush=True)
    distributed.teardown()


def run_workers(command: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def run(width: int = 1024, layers: int = 8, repeats: int = 3) -> dict:
    """The figures of one process and of two, side by side."""
    options = ["--width", str(width), "--layers", str(layers), "--repeats", str(repeats), "--worker"]
    [single] = run_workers([sys.executable, __file__, *options])
    torchrun = str(Path(sys.executable).parent / "torchrun")
    sharded = sorted(
        run_workers([torchrun, "--standalone", "--nproc_per_node", "2", __file__, *options]), key=lambda row: row["rank"]
    )
    peak = max(row["state_bytes"] for row in sharded)
    return {
        "state_bytes_one_process": single["state_bytes"],
        "state_bytes_per_rank_two_processes": peak,
        "state_two_over_one": peak / single["state_bytes"],
        "stall_s_one_process": single["stall_s"],
        "stall_s_per_rank_two_processes": [row["stall_s"] for row in sharded],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    result = run(args.width, args.layers, args.repeats)
    one, two = result["state_bytes_one_process"], result["state_bytes_per_rank_two_processes"]
    print(
        f"parameters+optimizer+EMA per rank: 1 process {one / 2**20:.1f} MiB, 2 processes {two / 2**20:.1f} MiB "
        f"(max over ranks); ratio {result['state_two_over_one']:.3f} (target <= 0.55)"
    )
    stalls = ", ".join(f"rank {rank} {stall * 1e3:.0f} ms" for rank, stall in enumerate(result["stall_s_per_rank_two_processes"]))
    print(f"sharded checkpoint stall: 1 process {result['stall_s_one_process'] * 1e3:.0f} ms; 2 processes {stalls}")


if __name__ == "__main__":
    main()
