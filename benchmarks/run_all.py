"""Every benchmark in one run: a table of the ratios the project's speed claims rest on.

    python benchmarks/run_all.py [--quick] [--json benchmarks/results/latest.json]

Each ratio is measured side by side in this one run (the variants interleaved), so machine noise
hits both sides alike. `--quick` uses smaller models for a smoke run; the targets refer to the
full sizes (100M parameters for EMA and checkpoint figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checkpoint_stall  # noqa: E402
import ema_idle_children  # noqa: E402
import ema_update  # noqa: E402
import fsdp_memory  # noqa: E402
import training_throughput  # noqa: E402

# (label, benchmark key, ratio key, target, "<=" or ">=")
ROWS = [
    ("EMA update per factor / flat lerp_ (1 factor)", "ema_1_factor", "module_ema_over_flat", 1.1, "<="),
    ("EMA update per factor / flat lerp_ (3 factors)", "ema_3_factors", "module_ema_over_flat", 1.1, "<="),
    ("per-parameter loop / flat lerp_ (1 factor)", "ema_1_factor", "loop_over_flat", None, ""),
    ("EMA with idle children / EMA alone", "ema_idle_children", "idle_children_vs_alone", 1.02, "<="),
    ("checkpoint stall: writer / memory copy", "checkpoint", "stall_async_over_memcopy", 1.5, "<="),
    ("checkpoint stall: torch.save / writer", "checkpoint", "stall_sync_over_async", None, ""),
    ("durable throughput: writer / write+fsync", "checkpoint", "durable_throughput_over_plain_write_fsync", 0.8, ">="),
    ("example: full callback stack / bare loop", "throughput_example", "full_stack_vs_bare", 1.05, "<="),
    ("example: trainer, default callbacks / bare loop", "throughput_example", "defaults_vs_bare", None, ""),
    ("larger model: full callback stack / bare loop", "throughput_large", "full_stack_vs_bare", None, ""),
    ("FSDP params+optim+EMA per rank: 2 processes / 1", "fsdp_memory", "state_two_over_one", 0.55, "<="),
]


def run(quick: bool) -> dict[str, dict]:
    params = 5_000_000 if quick else 100_000_000
    epochs = 2 if quick else 10
    benchmarks = {
        "ema_1_factor": lambda: ema_update.run(params, 1),
        "ema_3_factors": lambda: ema_update.run(params, 3),
        "ema_idle_children": lambda: ema_idle_children.run(100 if quick else 300),
        "checkpoint": lambda: checkpoint_stall.run(params, repeats=3 if quick else 5),
        "throughput_example": lambda: training_throughput.run("example", rounds=1 if quick else 7, epochs=epochs),
        "fsdp_memory": lambda: fsdp_memory.run(256 if quick else 1024, layers=8, repeats=1 if quick else 3),
        "throughput_large": lambda: training_throughput.run("large", rounds=1 if quick else 3, epochs=max(epochs // 2, 1)),
    }
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
        ratio = results[benchmark][key]
        if target is None:
            lines.append(f"| {label} | {ratio:.3f} | | |")
        else:
            met = ratio <= target if direction == "<=" else ratio >= target
            lines.append(f"| {label} | {ratio:.3f} | {direction} {target} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run, not the figures of record")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "latest.json")
    arguments = parser.parse_args()
    results = run(arguments.quick)
    print(table(results))
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "quick": arguments.quick}
    arguments.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"wrote {arguments.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
