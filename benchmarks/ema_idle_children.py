"""EmaCallback with evaluation children on steps where no child is due, versus EmaCallback alone.

Both callbacks live in one real trainer context; each step calls the hooks the trainer calls
after an update (`track_after_update_step`, `after_update`). The children are scheduled far in
the future, so the difference is what configuring children costs between evaluations.

    python benchmarks/ema_idle_children.py [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from noether.core.providers.path import PathProvider
from noether.core.utils.training import TrainingIteration
from noether.core.writers.log_writer import LogWriter
from noether.training.run import build_trainer, parse_run_config

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
IDLE_CHILDREN = [
    {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1000, "dataset_key": "val"},
    {"kind": "noether.training.callbacks.AccuracyCallback", "every_n_updates": 100_000, "dataset_key": "val"},
]


def ema_callback(output: Path, run_id: str, children: list[dict[str, Any]]) -> tuple[Any, Any]:
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree.update(output_path=str(output), run_id=run_id)
    tree["model"].update(hidden_dim=2048, depth=4)  # ~13M parameters in 10 tensors
    ema = {
        "kind": "noether.core.callbacks.EmaCallback",
        "every_n_epochs": 1000,
        "target_factors": [0.99, 0.999],
        "save_latest_weights": False,
        "save_last_weights": False,
        "eval_callbacks": children,
    }
    tree["trainer"]["callbacks"] = [ema]
    config = parse_run_config(tree)
    paths = PathProvider(config.output_path, run_id)
    paths.create()
    trainer = build_trainer(config, paths, LogWriter(paths.metrics_file, paths.summary_file))
    counter = trainer.create_update_counter(TrainingIteration())
    callback = trainer.callbacks[-1]
    callback.before_training(update_counter=counter)
    return callback, counter


def step(callback: Any, counter: Any) -> None:
    counter.add_update()
    with torch.no_grad():
        callback.track_after_update_step(update_counter=counter)
        callback.after_update(update_counter=counter)
        if counter.is_full_epoch:
            callback.after_epoch(update_counter=counter)


def run(steps: int = 300) -> dict[str, float]:
    logging.getLogger("noether").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as output:
        alone = ema_callback(Path(output), "alone", [])
        with_children = ema_callback(Path(output), "children", IDLE_CHILDREN)
        times: dict[str, list[float]] = {"ema_alone": [], "ema_idle_children": []}
        for _ in range(steps):
            for name, (callback, counter) in (("ema_alone", alone), ("ema_idle_children", with_children)):
                start = time.perf_counter()
                step(callback, counter)
                times[name].append(time.perf_counter() - start)
        copies = sum(ema.copy_count for ema in with_children[0].emas.values())
    results = {f"{name}_ms": statistics.median(values) * 1e3 for name, values in times.items()}
    results["idle_children_vs_alone"] = results["ema_idle_children_ms"] / results["ema_alone_ms"]
    results["swaps_on_idle_steps"] = copies
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    results = run(arguments.steps)
    for key, value in results.items():
        print(f"{key:30s} {value:10.4f}")
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
