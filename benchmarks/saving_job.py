"""A GPU-sized job that saves as a long run does: what saving costs the updates around each save.

A residual MLP (34M parameters with `--size gpu`, 2.2M with `--size cpu`) trained in bf16 autocast
on fixed random data, once bare (no callbacks) and once saving every `--every` updates: weights
and AdamW state, both again as `latest`, and one EMA (0.54 GB per save at the GPU size). Both runs
use the trainer, so the ratio is what saving adds, not what the trainer adds.

Besides full / bare over the whole run, it prints the profile around a save: the median over saves
of the time of the update `k` updates after the save (k = 0 is the saving update), divided by the
median update time of the bare runs. A writer that competes with training (for the GIL, memory
bandwidth or the device) shows up as ratios above 1 after k = 0, not only at k = 0. Minor page
faults per update are reported too: they are not noise, and a rise from saving means memory that
training reused in place before now comes fresh from the kernel every update.
Each run is a process of its own. Each round runs both variants, in alternating order; ratios are
medians over rounds.

    python benchmarks/saving_job.py [--size cpu|gpu] [--device cpu|cuda] [--rounds 3] [--every 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import PositiveInt
from torch import nn
from training_throughput import UpdateClock

from noether.core.models import Model, ModelBaseConfig
from noether.core.providers.path import PathProvider
from noether.core.writers.log_writer import LogWriter
from noether.data import DatasetBase, DatasetBaseConfig
from noether.training.run import build_trainer, parse_run_config

# width, residual blocks, input features, batch size, data loader workers
SIZES = {
    "gpu": {"width": 1024, "blocks": 4, "features": 256, "batch": 1024, "workers": 4},
    "cpu": {"width": 256, "blocks": 4, "features": 64, "batch": 128, "workers": 0},
}
OFFSETS = (0, 1, 2, 3, 5, 10, 20)


class ResidualMLPConfig(ModelBaseConfig):
    features: PositiveInt
    width: PositiveInt
    blocks: PositiveInt
    classes: PositiveInt = 10


class ResidualMLP(Model):
    """Blocks of LayerNorm -> Linear(width, 4 width) -> GELU -> Linear(4 width, width), each added to its input."""

    def __init__(self, model_config: ResidualMLPConfig) -> None:
        super().__init__(model_config)
        width = model_config.width
        self.embed = nn.Linear(model_config.features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            for _ in range(model_config.blocks)
        )
        self.head = nn.Linear(width, model_config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class NoiseDatasetConfig(DatasetBaseConfig):
    samples: PositiveInt
    features: PositiveInt
    classes: PositiveInt = 10


class NoiseDataset(DatasetBase):
    """Fixed random inputs and labels: the job measures training and saving, not learning."""

    def __init__(self, dataset_config: NoiseDatasetConfig) -> None:
        super().__init__(dataset_config)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(dataset_config.samples, dataset_config.features, generator=generator)
        self.y = torch.randint(dataset_config.classes, (dataset_config.samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


def saving_callbacks(every: int) -> list[dict[str, Any]]:
    return [
        {
            "kind": "noether.core.callbacks.CheckpointCallback",
            "every_n_updates": every,
            "save_weights": True,
            "save_optim": True,
            "save_latest_weights": True,
            "save_latest_optim": True,
            "keep_last_n": 1,
        },
        {"kind": "noether.core.callbacks.EmaCallback", "every_n_updates": every, "target_factors": [0.999]},
    ]


def config_tree(output: Path, size: str, device: str, updates: int, callbacks: list[dict[str, Any]]) -> dict[str, Any]:
    shape = SIZES[size]
    module = ResidualMLP.__module__
    return {
        "output_path": str(output),
        "seed": 0,
        "device": device,
        "trackers": [],
        "datasets": {
            "train": {
                "kind": f"{module}.NoiseDataset",
                "samples": shape["batch"] * 50,
                "features": shape["features"],
            }
        },
        "model": {
            "kind": f"{module}.ResidualMLP",
            "features": shape["features"],
            "width": shape["width"],
            "blocks": shape["blocks"],
            "optimizer": {"kind": "torch.optim.AdamW", "lr": 1e-4},
        },
        "trainer": {
            "kind": "noether.training.trainers.ClassificationTrainer",
            "max_updates": updates,
            "effective_batch_size": shape["batch"],
            "precision": "bfloat16",
            "num_workers": shape["workers"],
            "callbacks": [*callbacks, {"kind": f"{UpdateClock.__module__}.UpdateClock", "every_n_updates": 1}],
        },
    }


def one_run(tree: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Trains one run in this process: the duration of every update (from the end of the previous one, the
    first update left out) and the minor page faults per update."""
    logging.getLogger("noether").setLevel(logging.ERROR)
    config = parse_run_config({**tree, "run_id": run_id})
    paths = PathProvider(config.output_path, run_id)
    paths.create()
    log_writer = LogWriter(paths.metrics_file, paths.summary_file, trackers=[])
    trainer = build_trainer(config, paths, log_writer)
    clock = trainer.callbacks[-1]
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    trainer.train()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    log_writer.close()
    trainer.context.checkpoints.close()
    seconds = [later - earlier for earlier, later in zip(clock.times, clock.times[1:])]
    return {"seconds": seconds, "page_faults_per_update": faults / len(clock.times)}


def run_in_process(tree: dict[str, Any], run_id: str) -> dict[str, Any]:
    """`one_run` in a fresh process, as a training job runs: the allocator's state is the run's own, not left
    over from the runs before it."""
    command = [sys.executable, __file__, "--one-run", json.dumps({"tree": tree, "run_id": run_id})]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"run {run_id} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def save_profile(full: list[float], every: int, bare_median: float) -> dict[int, float]:
    """For each offset k, the median over saves of update (save + k)'s time / the bare median; `full[i]` is update i + 2."""
    profile = {}
    for offset in OFFSETS:
        # update u (1-based) saves when u % every == 0; its duration is full[u - 2]
        times = [full[u + offset - 2] for u in range(every, len(full) + 2, every) if 0 <= u + offset - 2 < len(full)]
        if times:
            profile[offset] = statistics.median(times) / bare_median
    return profile


def run(size: str = "cpu", device: str = "cpu", rounds: int = 3, every: int = 100, saves: int = 5) -> dict[str, Any]:
    updates = every * saves + every // 2  # the last save is followed by updates of its own
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "saving": []}
    with tempfile.TemporaryDirectory() as output:
        for round_index in range(rounds):
            order = ["bare", "saving"] if round_index % 2 == 0 else ["saving", "bare"]
            for name in order:
                callbacks = saving_callbacks(every) if name == "saving" else []
                tree = config_tree(Path(output), size, device, updates, callbacks)
                runs[name].append(run_in_process(tree, f"{name}{round_index}"))
    pairs = [(bare["seconds"], saving["seconds"]) for bare, saving in zip(runs["bare"], runs["saving"])]
    profiles = [save_profile(saving, every, statistics.median(bare)) for bare, saving in pairs]
    return {
        "size": size,
        "device": device,
        "every": every,
        "checkpoint_gb": _checkpoint_bytes(size) / 1e9,
        "bare_ms_per_update": statistics.median(statistics.median(bare) for bare, _ in pairs) * 1e3,
        "saving_ms_per_update": statistics.median(sum(saving) / len(saving) for _, saving in pairs) * 1e3,
        "saving_vs_bare": statistics.median(sum(saving) / sum(bare) for bare, saving in pairs),
        "profile_after_save": {k: statistics.median(p[k] for p in profiles) for k in profiles[0]},
        "page_faults_per_update_bare": statistics.median(r["page_faults_per_update"] for r in runs["bare"]),
        "page_faults_per_update_saving": statistics.median(r["page_faults_per_update"] for r in runs["saving"]),
        "rounds": rounds,
    }


def _checkpoint_bytes(size: str) -> int:
    """Weights and AdamW's two moments (`latest` is a second name of the same files) and one EMA: all float32."""
    shape = SIZES[size]
    model = ResidualMLP(ResidualMLPConfig(features=shape["features"], width=shape["width"], blocks=shape["blocks"]))
    parameters = sum(p.numel() for p in model.parameters())
    return parameters * 4 * (3 + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpu with --device cuda, else cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=100, help="updates between saves")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one-run", help=argparse.SUPPRESS)  # internal: one run, in the process `run` starts
    arguments = parser.parse_args()
    if arguments.one_run:
        one = json.loads(arguments.one_run)
        print(json.dumps(one_run(one["tree"], one["run_id"])))
        return
    if arguments.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; nothing measured")
    size = arguments.size or ("gpu" if arguments.device == "cuda" else "cpu")
    results = run(size, arguments.device, arguments.rounds, arguments.every)
    print(json.dumps(results, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
