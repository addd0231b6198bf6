"""Time per update: a bare PyTorch loop vs this trainer, without and with the full callback stack,
and with the default callbacks plus the TensorBoard tracker; and the floor under the full stack: the
bare loop plus the EMA updates and plain `torch.save` calls a hand-written loop needs for its files.

The full stack saves every epoch: periodic checkpoint with optimizer state, `latest`, best model
by the training loss with two tolerances, and an EMA with two factors. No evaluation passes: this
measures bookkeeping, not evaluation. Time per update is the steady-state time: from the end of the
first epoch to the end of the last update, read off a clock at the end of every update (in the
trainer, a one-line probe callback, `UpdateClock`), so start-up and the final wait for pending
writes are left out, while every save inside the window is in. Each round runs every variant once,
in alternating order; a ratio is the median over rounds of that round's ratio, so that the
machine's slow drifts hit both sides of each ratio alike.

    python benchmarks/training_throughput.py [--rounds 9] [--epochs 8] [--device cuda] [--json out.json]
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

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.config import build
from noether.core.providers.path import PathProvider
from noether.core.writers.log_writer import LogWriter
from noether.examples.digits import DigitsClassifier, DigitsClassifierConfig, DigitsDataset, DigitsDatasetConfig
from noether.training.run import build_trainer, parse_run_config

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"

FULL_STACK = [
    {
        "kind": "noether.core.callbacks.CheckpointCallback",
        "every_n_epochs": 1,
        "save_latest_weights": True,
        "save_latest_optim": True,
    },
    {
        "kind": "noether.core.callbacks.BestCheckpointCallback",
        "every_n_epochs": 1,
        "metric_key": "loss/online/total",
        "tolerances": [2, 5],
    },
    {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.99, 0.999]},
]
SAVING_LOOP_EMA_FACTORS = (0.99, 0.999)
CLOCK = {"kind": f"{__name__}.UpdateClock", "every_n_epochs": 1}

TENSORBOARD = [{"kind": "noether.core.trackers.TensorBoardTracker"}]

SIZES = {"example": {"hidden_dim": 128, "depth": 2}, "large": {"hidden_dim": 1024, "depth": 4}}


class UpdateClockConfig(CallBackBaseConfig):
    pass


class UpdateClock(PeriodicCallback):
    """Benchmark probe: `time.perf_counter()` at the end of every update (listed last, after the other callbacks' work)."""

    def __init__(self, callback_config: UpdateClockConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.times: list[float] = []

    def track_after_update_step(self, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())


def steady_seconds_per_update(times: list[float], updates_per_epoch: int) -> float:
    """From the end of the first epoch to the end of the last update."""
    return (times[-1] - times[updates_per_epoch - 1]) / (len(times) - updates_per_epoch)


def config_tree(
    output_path: Path,
    size: str,
    epochs: int,
    callbacks: list[dict[str, Any]],
    trackers: list[dict[str, Any]] = (),
    device: str = "cpu",
) -> dict[str, Any]:
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["output_path"] = str(output_path)
    tree["trackers"] = list(trackers)
    tree["device"] = device
    tree["model"].update(SIZES[size], dropout=0.0)
    tree["trainer"].update({"max_epochs": epochs, "callbacks": callbacks})
    return tree


def time_trainer(tree: dict[str, Any], run_id: str) -> float:
    """Steady-state seconds per update of `BaseTrainer.train`, read off an UpdateClock listed last."""
    tree = {**tree, "run_id": run_id}
    tree["trainer"] = {**tree["trainer"], "callbacks": [*tree["trainer"]["callbacks"], CLOCK]}
    config = parse_run_config(tree)
    paths = PathProvider(config.output_path, run_id)
    paths.create()
    trackers = [build(tracker_config, paths, tree) for tracker_config in config.trackers]
    log_writer = LogWriter(paths.metrics_file, paths.summary_file, trackers=trackers)
    trainer = build_trainer(config, paths, log_writer)
    clock = trainer.callbacks[-1]
    trainer.train()
    log_writer.close()
    trainer.context.checkpoints.close()
    return steady_seconds_per_update(clock.times, trainer.batching.updates_per_epoch)


def time_bare_loop(tree: dict[str, Any], run_id: str) -> float:
    """The same model, data, optimizer and batches in a plain loop, as a user would write it."""
    return _time_plain_loop(tree, saves_to=None)


def time_saving_loop(tree: dict[str, Any], run_id: str) -> float:
    """The plain loop plus the least a hand-written loop does for the full stack's files, the floor under
    it: the same two EMAs updated after every update (one fused lerp per factor), and after every epoch a
    plain `torch.save` of model + optimizer (the checkpoint `latest` names too), of the model (the best),
    and of each EMA, into a folder of their own: no atomic rename, no fsync, no hashes, no trainer state."""
    folder = Path(tree["output_path"]) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return _time_plain_loop(tree, saves_to=folder)


def _time_plain_loop(tree: dict[str, Any], saves_to: Path | None) -> float:
    config = parse_run_config({**tree, "run_id": "bare"})
    torch.manual_seed(config.seed)
    dataset = DigitsDataset(DigitsDatasetConfig(split="train"))
    model = DigitsClassifier(DigitsClassifierConfig(**config.model.model_dump(exclude={"kind"}))).to(config.device)
    optimizer = config.model.optimizer.build(model.parameters())
    loader = DataLoader(
        dataset,
        batch_size=config.trainer.effective_batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    parameters = [parameter.detach() for parameter in model.parameters()]
    emas = {factor: [parameter.clone() for parameter in parameters] for factor in SAVING_LOOP_EMA_FACTORS}
    times = []
    for _ in range(config.trainer.max_epochs):
        for batch in loader:
            x, y = batch["x"].to(config.device, non_blocking=True), batch["y"].to(config.device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if saves_to is not None:
                for factor, ema in emas.items():
                    torch._foreach_lerp_(ema, parameters, 1.0 - factor)
            _synchronize(config.device)
            times.append(time.perf_counter())
        if saves_to is not None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saves_to / "checkpoint.th")
            torch.save(model.state_dict(), saves_to / "best.th")
            for factor, ema in emas.items():
                torch.save(dict(zip(model.state_dict(), ema)), saves_to / f"ema={factor}.th")
            _synchronize(config.device)
            times[-1] = time.perf_counter()  # the epoch's last update ends after its saves, as in the trainer
    return steady_seconds_per_update(times, len(loader))


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(size: str = "example", rounds: int = 9, epochs: int = 8, device: str = "cpu") -> dict[str, float]:
    logging.getLogger("noether").setLevel(logging.ERROR)  # variants without optimizer saves warn on every run
    variants = {
        "bare_loop": (time_bare_loop, [], []),
        "saving_loop": (time_saving_loop, [], []),
        "trainer_defaults": (time_trainer, [], []),
        "trainer_defaults_tensorboard": (time_trainer, [], TENSORBOARD),
        "trainer_full_stack": (time_trainer, FULL_STACK, []),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as output:
        time_trainer(config_tree(Path(output), size, 2, FULL_STACK, TENSORBOARD, device), "warm-up")  # imports, first allocations
        for round_index in range(rounds):
            order = list(variants.items())
            for name, (timer, callbacks, trackers) in order if round_index % 2 == 0 else reversed(order):
                times[name].append(
                    timer(config_tree(Path(output), size, epochs, callbacks, trackers, device), f"{name}{round_index}")
                )
    results = {f"{name}_ms_per_update": statistics.median(values) * 1e3 for name, values in times.items()}

    def paired(numerator: str, denominator: str) -> float:
        return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))

    results["defaults_vs_bare"] = paired("trainer_defaults", "bare_loop")
    results["full_stack_vs_bare"] = paired("trainer_full_stack", "bare_loop")
    results["saving_loop_vs_bare"] = paired("saving_loop", "bare_loop")
    results["full_stack_vs_saving_loop"] = paired("trainer_full_stack", "saving_loop")
    results["tensorboard_vs_defaults"] = paired("trainer_defaults_tensorboard", "trainer_defaults")
    results["rounds"] = rounds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="example")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=8)
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
