"""One durability barrier per checkpoint set against one fsync per file, through the writer's API.

A set is what the example's full stack writes under one tag: weights, optimizer state, two EMAs
and the trainer state of the quickstart model (`--hidden-dim` to scale it). Both variants stage the
files under hidden names, then a commit action on the writer thread renames them into place and
syncs the directory once:

- per file: every staged file fsync'ed as it is written (what checkpoint sets do today);
- one barrier: staged with `save(..., fsync=False)`, then `make_durable` on the whole set before
  the renames (one `syncfs` on Linux).

Time per set is save + wait, medians of interleaved rounds.

    python benchmarks/checkpoint_set.py [--rounds 30] [--hidden-dim 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from noether.core.storage import make_durable, sync_directory
from noether.core.writers.checkpoint_writer import CheckpointWriter
from noether.examples.digits import DigitsClassifier, DigitsClassifierConfig

EMA_FACTORS = (0.99, 0.999)


def set_payloads(hidden_dim: int) -> dict[str, dict]:
    """The files of one set, by the kind in their name."""
    model = DigitsClassifier(DigitsClassifierConfig(hidden_dim=hidden_dim))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 64)).square().mean().backward()
    optimizer.step()
    stamp = {"checkpoint_tag": "latest", "training_iteration": {"epoch": 1, "update": 19, "sample": 1216}, "run_id": "bench"}
    payloads = {"model": {"state_dict": model.state_dict(), **stamp}, "optim": {"state_dict": optimizer.state_dict(), **stamp}}
    for factor in EMA_FACTORS:
        payloads[f"ema={factor}_model"] = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, **stamp}
    payloads["trainer"] = {**stamp, "rng_states": {"torch": torch.get_rng_state()}, "callbacks": [{}]}
    return payloads


def write_set(writer: CheckpointWriter, directory: Path, payloads: dict[str, dict], one_barrier: bool) -> None:
    final = {directory / f"classifier_cp=latest_{kind}.th": payload for kind, payload in payloads.items()}
    staged = {path: path.with_name(f".{path.name}.staged") for path in final}
    for path, payload in final.items():
        writer.save(staged[path], payload, sync_directory=False, fsync=not one_barrier)

    def commit() -> None:
        if one_barrier:
            make_durable(list(staged.values()))
        for path in final:
            writer.replace(staged[path], path)
        sync_directory(directory)

    writer.call_after_writes(commit)
    writer.wait()


def run(rounds: int = 30, hidden_dim: int = 128) -> dict[str, float]:
    payloads = set_payloads(hidden_dim)
    set_bytes = sum(t.numel() * t.element_size() for p in payloads.values() for t in _tensors(p))
    times: dict[str, list[float]] = {"per_file_fsync": [], "one_barrier": []}
    with tempfile.TemporaryDirectory() as directory, CheckpointWriter() as writer:
        for round_index in range(rounds + 2):  # two warm-up rounds
            for name in times:
                start = time.perf_counter()
                write_set(writer, Path(directory), payloads, one_barrier=name == "one_barrier")
                if round_index >= 2:
                    times[name].append(time.perf_counter() - start)
    results = {f"{name}_ms_per_set": statistics.median(values) * 1e3 for name, values in times.items()}
    results["files_per_set"] = len(payloads)
    results["set_bytes"] = set_bytes
    results["one_barrier_vs_per_file"] = results["one_barrier_ms_per_set"] / results["per_file_fsync_ms_per_set"]
    return results


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for value in values for t in _tensors(value)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    results = run(arguments.rounds, arguments.hidden_dim)
    for key, value in results.items():
        print(f"{key:30s} {value:12.3f}")
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
