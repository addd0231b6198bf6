"""Benchmark ModuleEma.update() against the memory-bandwidth bound of one flat lerp_ and a per-parameter loop.

    python benchmarks/ema_update.py [--params 100_000_000] [--factors 1 3] [--device cuda] [--json out.json]

Per factor, an EMA update reads two and writes one float per parameter, like a single ``lerp_`` over one flat
buffer of the same size, which is the floor to compare against. The variants run interleaved over several
repetitions, so drifts in machine load hit all of them alike; medians are reported, and the ratios of the best
repetitions too, which are less sensitive to other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from noether.core.models.ema import ModuleEma

LAYERS = 64
# Relative widths, cycled through so layers (and tensors) have varied sizes.
WIDTHS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
WARMUP = 3
REPETITIONS = 30


def build_model(params: int) -> nn.ModuleList:
    """LAYERS Linear layers of varied shapes (2 tensors each) with about ``params`` parameters in float32."""
    shapes = [(WIDTHS[i % len(WIDTHS)], WIDTHS[(i + 2) % len(WIDTHS)]) for i in range(LAYERS)]
    scale = math.sqrt(params / sum(a * b for a, b in shapes))
    torch.manual_seed(0)
    return nn.ModuleList(nn.Linear(max(8, round(a * scale)), max(8, round(b * scale))) for a, b in shapes)


def interleaved_times(variants: dict[str, Callable[[], object]], device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per variant and repetition, running one of each per repetition (GPU work waited for)."""
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repetition in range(WARMUP + REPETITIONS):
        for name, fn in variants.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            if repetition >= WARMUP:
                times[name].append(time.perf_counter() - start)
    return times


def swap_in_and_out(ema: ModuleEma, factor: float) -> None:
    with ema.swapped_in(factor):
        pass


def run(params: int, n_factors: int, device: str = "cpu") -> dict:
    """Times per factor of ModuleEma.update(), one flat lerp_ and a per-parameter loop, plus one swap."""
    model = build_model(params).to(device)
    factors = [1.0 - 10.0 ** -(i + 1) for i in range(n_factors)]
    ema = ModuleEma(model, factors)
    live = list(model.parameters())
    weight = 1.0 - factors[0]
    with torch.no_grad():
        flat_live = torch.cat([p.flatten() for p in live])
        flat_ema = flat_live.clone()
        loop_ema = [p.detach().clone() for p in live]

    def loop() -> None:
        for e, p in zip(loop_ema, live):
            e.lerp_(p, weight)

    start = time.perf_counter()
    swap_in_and_out(ema, factors[0])
    first_swap = time.perf_counter() - start
    with torch.no_grad():
        times = interleaved_times(
            {
                "module_ema": ema.update,
                "flat": lambda: flat_ema.lerp_(flat_live, weight),
                "loop": loop,
                "swap": lambda: swap_in_and_out(ema, factors[0]),
            },
            device,
        )
    times["module_ema"] = [t / n_factors for t in times["module_ema"]]
    medians = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    return {
        "params": flat_live.numel(),
        "tensors": len(live),
        "factors": n_factors,
        "threads": torch.get_num_threads(),
        "module_ema_ms_per_factor": 1e3 * medians["module_ema"],
        "flat_lerp_ms": 1e3 * medians["flat"],
        "loop_ms": 1e3 * medians["loop"],
        "module_ema_over_flat": medians["module_ema"] / medians["flat"],
        "loop_over_flat": medians["loop"] / medians["flat"],
        "best_module_ema_over_flat": best["module_ema"] / best["flat"],
        "best_loop_over_flat": best["loop"] / best["flat"],
        "swap_ms": 1e3 * medians["swap"],
        "first_swap_ms": 1e3 * first_swap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=100_000_000)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; nothing measured")

    results = [run(args.params, n, args.device) for n in args.factors]
    first = results[0]
    print(
        f"{first['params']:,} float32 params in {first['tensors']} tensors, {first['threads']} threads, "
        f"medians of {REPETITIONS} interleaved repetitions (best: ratio of the fastest ones); times per factor"
    )
    print(
        f"{'factors':>7} {'ModuleEma ms':>12} {'flat ms':>8} {'loop ms':>8} {'ModuleEma/flat':>14} "
        f"{'loop/flat':>9} {'best ModuleEma/flat':>19} {'best loop/flat':>14} {'swap ms':>8} {'first swap ms':>13}"
    )
    for r in results:
        print(
            f"{r['factors']:>7} {r['module_ema_ms_per_factor']:>12.2f} {r['flat_lerp_ms']:>8.2f} "
            f"{r['loop_ms']:>8.2f} {r['module_ema_over_flat']:>14.3f} {r['loop_over_flat']:>9.3f} "
            f"{r['best_module_ema_over_flat']:>19.3f} {r['best_loop_over_flat']:>14.3f} "
            f"{r['swap_ms']:>8.2f} {r['first_swap_ms']:>13.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
