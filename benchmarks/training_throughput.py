"""Time per update: a bare PyTorch loop vs this trainer, without and with the full callback stack,
and with the default callbacks plus the TensorBoard tracker.

The full stack saves every epoch: periodic checkpoint with optimizer state, `latest`, best model
by the training loss with two tolerances, and an EMA with two factors. No evaluation passes: this
measures bookkeeping, not evaluation. Time per update is the steady-state (marginal) time: the
difference between a run of 2E and one of E epochs, divided by the extra updates, so one-off
start-up and shutdown costs (building the optimizer, the final wait for pending writes) cancel
out. The variants are run interleaved, several rounds, and medians are compared.

    python benchmarks/training_throughput.py [--rounds 3] [--device cuda] [--json out.json]
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
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from noether.examples.digits import DigitsClassifier, DigitsClassifierConfig, DigitsDataset, DigitsDatasetConfig
from noether.training.run import build_trainer, parse_run_config
from noether.core.config import build
from noether.core.providers.path import PathProvider
from noether.core.writers.log_writer import LogWriter

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"

FULL_STACK = [
    {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_latest_weights": True, "save_latest_optim": True},
    {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": "loss/online/total", "tolerances": [2, 5]},
    {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.99, 0.999]},
]

TENSORBOARD = [{"kind": "noether.core.trackers.TensorBoardTracker"}]

SIZES = {"example": {"hidden_dim": 128, "depth": 2}, "large": {"hidden_dim": 1024, "depth": 4}}


def config_tree(
    output_path: Path, size: str, epochs: int, callbacks: list[dict[str, Any]], trackers: list[dict[str, Any]] = (), device: str = "cpu"
) -> dict[str, Any]:
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["output_path"] = str(output_path)
    tree["trackers"] = list(trackers)
    tree["device"] = device
    tree["model"].update(SIZES[size], dropout=0.0)
    tree["trainer"].update({"max_epochs": epochs, "callbacks": callbacks})
    return tree


def time_trainer(tree: dict[str, Any], run_id: str) -> tuple[float, int]:
    """Seconds and updates of one `BaseTrainer.train`, construction excluded."""
    tree = {**tree, "run_id": run_id}
    config = parse_run_config(tree)
    paths = PathProvider(config.output_path, run_id)
    paths.create()
    trackers = [build(tracker_config, paths, tree) for tracker_config in config.trackers]
    log_writer = LogWriter(paths.metrics_file, paths.summary_file, trackers=trackers)
    trainer = build_trainer(config, paths, log_writer)
    start = time.perf_counter()
    counter = trainer.train()
    log_writer.close()
    trainer.context.checkpoints.writer.close()
    _synchronize(config.device)
    return time.perf_counter() - start, counter.update


def time_bare_loop(tree: dict[str, Any], run_id: str) -> tuple[float, int]:
    """The same model, data, optimizer and batches in a plain loop, as a user would write it."""
    config = parse_run_config({**tree, "run_id": "bare"})
    torch.manual_seed(config.seed)
    dataset = DigitsDataset(DigitsDatasetConfig(split="train"))
    model = DigitsClassifier(DigitsClassifierConfig(**config.model.model_dump(exclude={"kind"}))).to(config.device)
    optimizer = config.model.optimizer.build(model.parameters())
    loader = DataLoader(dataset, batch_size=config.trainer.effective_batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    updates = 0
    start = time.perf_counter()
    for _ in range(config.trainer.max_epochs):
        for batch in loader:
            x, y = batch["x"].to(config.device, non_blocking=True), batch["y"].to(config.device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
    _synchronize(config.device)
    return time.perf_counter() - start, updates


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def marginal_time_per_update(timer: Any, trees: tuple[dict[str, Any], dict[str, Any]], run_id: str) -> float:
    """Seconds per update in steady state: (T(2E) - T(E)) / (updates(2E) - updates(E))."""
    short_seconds, short_updates = timer(trees[0], f"{run_id}_short")
    long_seconds, long_updates = timer(trees[1], f"{run_id}_long")
    return (long_seconds - short_seconds) / (long_updates - short_updates)


def run(size: str = "example", rounds: int = 3, epochs: int = 10, device: str = "cpu") -> dict[str, float]:
    logging.getLogger("noether").setLevel(logging.WARNING)
    variants = {
        "bare_loop": (time_bare_loop, [], []),
        "trainer_defaults": (time_trainer, [], []),
        "trainer_defaults_tensorboard": (time_trainer, [], TENSORBOARD),
        "trainer_full_stack": (time_trainer, FULL_STACK, []),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as output:
        time_trainer(config_tree(Path(output), size, 1, FULL_STACK, TENSORBOARD, device), "warm-up")  # imports, first allocations
        for round_index in range(rounds):
            for name, (timer, callbacks, trackers) in variants.items():
                trees = tuple(config_tree(Path(output), size, n, callbacks, trackers, device) for n in (epochs, 2 * epochs))
                times[name].append(marginal_time_per_update(timer, trees, f"{name}{round_index}"))
    medians = {f"{name}_ms_per_update": statistics.median(values) * 1e3 for name, values in times.items()}
    bare = medians["bare_loop_ms_per_update"]
    medians["defaults_vs_bare"] = medians["trainer_defaults_ms_per_update"] / bare
    medians["full_stack_vs_bare"] = medians["trainer_full_stack_ms_per_update"] / bare
    medians["tensorboard_vs_defaults"] = medians["trainer_defaults_tensorboard_ms_per_update"] / medians["trainer_defaults_ms_per_update"]
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="example")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; nothing measured")
    results = run(arguments.size, arguments.rounds, arguments.epochs, arguments.device)
    for key, value in results.items():
        print(f"{key:40s} {value:10.4f}")
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
