"""Every benchmark in one run: a table of the ratios the project's speed claims rest on.

    python benchmarks/run_all.py [--quick] [--device cuda] [--json benchmarks/results/latest.json]

Each ratio is measured side by side in this one run (the variants interleaved), so machine noise
hits both sides alike. `--quick` uses smaller models for a smoke run; the targets refer to the
full sizes (100M parameters for EMA and checkpoint figures). `--device cuda` runs the models on
the GPU (EMA on the device, snapshots copied into pinned buffers on a side stream); the peer
comparison needs the `[bench]` extra (PyTorch Lightning) and is skipped without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checkpoint_set  # noqa: E402
import checkpoint_stall  # noqa: E402
import ema_idle_children  # noqa: E402
import ema_update  # noqa: E402
import fsdp_memory  # noqa: E402
import peer_lightning  # noqa: E402
import saving_job  # noqa: E402
import training_throughput  # noqa: E402
import writer_gil  # noqa: E402

# (label, benchmark key, ratio key, target, "<=" or ">=")
ROWS = [
    ("EMA update per factor / flat lerp_ (1 factor)", "ema_1_factor", "module_ema_over_flat", 1.1, "<="),
    ("EMA update per factor / flat lerp_ (3 factors)", "ema_3_factors", "module_ema_over_flat", 1.1, "<="),
    ("per-parameter loop / flat lerp_ (1 factor)", "ema_1_factor", "loop_over_flat", None, ""),
    ("EMA with idle children / EMA alone", "ema_idle_children", "idle_children_vs_alone", 1.02, "<="),
    ("checkpoint stall: writer / memory copy", "checkpoint", "stall_async_over_memcopy", 1.5, "<="),
    ("checkpoint stall: torch.save / writer", "checkpoint", "stall_sync_over_async", None, ""),
    ("durable throughput: writer / write+fsync", "checkpoint", "durable_throughput_over_plain_write_fsync", 0.9, ">="),
    ("Python work beside the writer thread / beside a plain write", "writer_gil", "python_work_writer_vs_plain_write", 0.9, ">="),
    ("checkpoint set of the example: one barrier / one fsync per file", "checkpoint_set", "one_barrier_vs_per_file", None, ""),
    ("example: full callback stack / bare loop", "throughput_example", "full_stack_vs_bare", 1.3, "<="),
    (
        "example: hand-written loop with the full stack's saves / bare loop (the floor)",
        "throughput_example",
        "saving_loop_vs_bare",
        None,
        "",
    ),
    (
        "example: full callback stack / hand-written loop with its saves",
        "throughput_example",
        "full_stack_vs_saving_loop",
        None,
        "",
    ),
    ("example: trainer, default callbacks / bare loop", "throughput_example", "defaults_vs_bare", 1.03, "<="),
    ("example: default callbacks + TensorBoard / default callbacks", "throughput_example", "tensorboard_vs_defaults", 1.02, "<="),
    ("larger model: full callback stack / bare loop", "throughput_large", "full_stack_vs_bare", None, ""),
    ("quickstart job, this project: full / bare (validation only)", "peer_lightning", "noether_full_vs_bare", 1.2, "<="),
    ("quickstart job, Lightning: full / bare", "peer_lightning", "lightning_full_vs_bare", None, ""),
    ("quickstart job, bare: this project / Lightning", "peer_lightning", "bare_noether_vs_lightning", 0.5, "<="),
    ("quickstart job, full: this project / Lightning", "peer_lightning", "full_noether_vs_lightning", 0.5, "<="),
    (
        "quickstart job, bare: hand-written loop / Lightning (the floor)",
        "peer_lightning",
        "bare_plain_loop_vs_lightning",
        None,
        "",
    ),
    ("quickstart job, bare: this project / hand-written loop", "peer_lightning", "bare_noether_vs_plain_loop", None, ""),
    ("residual MLP saving every 100 updates (20 with --quick) / bare", "saving_job", "saving_vs_bare", 1.05, "<="),
    ("FSDP params+optim+EMA per rank: 2 processes / 1", "fsdp_memory", "state_two_over_one", 0.55, "<="),
]


def run(quick: bool, device: str = "cpu") -> dict[str, dict]:
    params = 5_000_000 if quick else 100_000_000
    benchmarks = {
        "ema_1_factor": lambda: ema_update.run(params, 1, device),
        "ema_3_factors": lambda: ema_update.run(params, 3, device),
        "ema_idle_children": lambda: ema_idle_children.run(100 if quick else 300),
        "checkpoint": lambda: checkpoint_stall.run(params, repeats=3 if quick else 5, device=device),
        "writer_gil": lambda: writer_gil.run(params, repeats=1 if quick else 3),
        "checkpoint_set": lambda: checkpoint_set.run(rounds=5 if quick else 30),
        "throughput_example": lambda: training_throughput.run(
            "example", rounds=1 if quick else 15, epochs=2 if quick else 8, device=device
        ),
        "throughput_large": lambda: training_throughput.run(
            "large", rounds=1 if quick else 5, epochs=2 if quick else 4, device=device
        ),
        "peer_lightning": lambda: peer_lightning.run(rounds=1 if quick else 9, epochs=2 if quick else 5, device=device),
        "saving_job": lambda: saving_job.run(
            "gpu" if device == "cuda" else "cpu", device, rounds=1 if quick else 3, every=20 if quick else 100
        ),
        "fsdp_memory": lambda: fsdp_memory.run(256 if quick else 1024, layers=8, repeats=1 if quick else 3),
    }
    if importlib.util.find_spec("pytorch_lightning") is None:
        print(
            "skipping peer_lightning: PyTorch Lightning is not installed (pip install 'noether-trainkit[bench]')", file=sys.stderr
        )
        del benchmarks["peer_lightning"]
    results = {}
    for name, benchmark in benchmarks.items():
        start = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = benchmark()
        results[name]["benchmark_seconds"] = time.perf_counter() - start
    return results


def table(results: dict[str, dict]) -> str:
    lines = ["| measurement | ratio | target | met |", "| --- | ---: | ---: | :---: |"]
    for label, benchmark, key, target, direction in ROWS:
        if benchmark not in results:
            lines.append(f"| {label} | skipped | | |")
            continue
        ratio = results[benchmark][key]
        if target is None:
            lines.append(f"| {label} | {ratio:.3f} | | |")
        else:
            met = ratio <= target if direction == "<=" else ratio >= target
            lines.append(f"| {label} | {ratio:.3f} | {direction} {target} | {'yes' if met else 'NO'} |")
    checkpoint = results["checkpoint"]
    lines.append(
        f"\nThe writer's snapshot buffers hold {checkpoint['writer_buffer_bytes'] / 1e9:.2f} GB of host memory "
        f"({'pinned' if checkpoint['device'] != 'cpu' else 'pageable'}) for a {checkpoint['state_bytes'] / 1e9:.2f} GB checkpoint."
    )
    if "peer_lightning" in results:
        lines.append("\n" + peer_lightning.table(results["peer_lightning"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run, not the figures of record")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "latest.json")
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: skipped, no CUDA device on this machine (torch.cuda.is_available() is False)", file=sys.stderr)
        return
    results = run(arguments.quick, arguments.device)
    print(table(results))
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "quick": arguments.quick,
        "device": arguments.device,
    }
    arguments.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"wrote {arguments.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
