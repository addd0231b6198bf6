"""Time per update on the quickstart job: this project against PyTorch Lightning, bare and with a full stack.

The job: the digits MLP of `examples/quickstart.yaml`, AdamW, batch 64, a validation pass every
epoch. "bare" is that alone; "full" adds a best checkpoint by the validation loss, a checkpoint
with optimizer state every epoch, a `latest` checkpoint and an EMA of the weights:

- this project: BestCheckpointCallback (metric `loss/val/total`), CheckpointCallback (every epoch,
  with optimizer, `save_latest_weights/optim`) and EmaCallback (one factor);
- Lightning: ModelCheckpoint on `val_loss` (best), ModelCheckpoint every epoch with `save_last`
  (periodic and latest, optimizer state included) and EMAWeightAveraging.

A hand-written PyTorch loop doing the same work (training, a validation pass every epoch, no
checkpoints) runs in the same rounds: the floor any trainer of this job can reach.

Time per update is the steady-state time, from the end of the first epoch to the end of the last
update, read off a clock at the end of every update (this project: the `UpdateClock` probe of
training_throughput.py; Lightning: `on_train_batch_end`), so start-up is left out and every
validation pass and save inside the window is in. Variants alternate within each round; times are
medians over rounds, ratios medians of each round's ratio. Needs the `[bench]` extra (`pytorch-lightning`).

    python benchmarks/peer_lightning.py [--rounds 9] [--epochs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from training_throughput import CLOCK, steady_seconds_per_update

from noether.core.providers.path import PathProvider
from noether.core.writers.log_writer import LogWriter
from noether.examples.digits import DigitsClassifier, DigitsClassifierConfig, DigitsDataset, DigitsDatasetConfig
from noether.training.run import build_trainer, parse_run_config

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
EMA_FACTOR = 0.999
VALIDATION = [{"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"}]
FULL_STACK = VALIDATION + [
    {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": "loss/val/total"},
    {
        "kind": "noether.core.callbacks.CheckpointCallback",
        "every_n_epochs": 1,
        "save_latest_weights": True,
        "save_latest_optim": True,
    },
    {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [EMA_FACTOR]},
]


def quickstart_tree(output: Path, epochs: int, callbacks: list[dict[str, Any]], device: str = "cpu") -> dict[str, Any]:
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["output_path"] = str(output)
    tree["trackers"] = []  # like Lightning's logger=False: bookkeeping of checkpoints, not of experiment tracking
    tree["device"] = device
    tree["trainer"].update({"max_epochs": epochs, "callbacks": callbacks})
    return tree


def time_noether(output: Path, epochs: int, full: bool, run_id: str, device: str) -> float:
    """Steady-state seconds per update of `BaseTrainer.train`."""
    callbacks = (FULL_STACK if full else VALIDATION) + [CLOCK]
    config = parse_run_config({**quickstart_tree(output, epochs, callbacks, device), "run_id": run_id})
    paths = PathProvider(config.output_path, run_id)
    paths.create()
    log_writer = LogWriter(paths.metrics_file, paths.summary_file)
    trainer = build_trainer(config, paths, log_writer)
    trainer.train()
    log_writer.close()
    trainer.context.checkpoints.close()
    return steady_seconds_per_update(trainer.callbacks[-1].times, trainer.batching.updates_per_epoch)


def hand_built_job(output: Path, epochs: int) -> tuple[dict[str, Any], dict[str, Any], DataLoader, DataLoader]:
    """The quickstart job's model and optimizer options and its training and validation loaders, for the
    variants that build the job by hand (the plain loop, Lightning)."""
    tree = quickstart_tree(output, epochs, [])
    model_options = {key: value for key, value in tree["model"].items() if key not in ("kind", "name", "optimizer")}
    optimizer_options = {key: value for key, value in tree["model"]["optimizer"].items() if key not in ("kind", "schedule")}
    batch_size = tree["trainer"]["effective_batch_size"]
    train = DataLoader(DigitsDataset(DigitsDatasetConfig(split="train")), batch_size=batch_size, shuffle=True, drop_last=True)
    val = DataLoader(DigitsDataset(DigitsDatasetConfig(split="val")), batch_size=batch_size)
    return model_options, optimizer_options, train, val


def time_plain_loop(output: Path, epochs: int, full: bool, run_id: str, device: str) -> float:
    """The job as a user would write it by hand: the floor for both frameworks' bare variant (`full` is
    there for the common signature; the loop writes no checkpoints)."""
    model_options, optimizer_options, train, val = hand_built_job(output, epochs)
    torch.manual_seed(0)
    model = DigitsClassifier(DigitsClassifierConfig(**model_options)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), **optimizer_options)
    times = []
    for _ in range(epochs):
        model.train()
        for batch in train:
            loss = F.cross_entropy(model(batch["x"].to(device)), batch["y"].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
        model.eval()
        with torch.no_grad():
            val_loss = sum(F.cross_entropy(model(b["x"].to(device)), b["y"].to(device), reduction="sum") for b in val) / len(
                val.dataset
            )
        float(val_loss)  # read, as a logger would
    return steady_seconds_per_update(times, len(train))


def time_lightning(output: Path, epochs: int, full: bool, run_id: str, device: str) -> float:
    """The same model, optimizer, data and validation as a LightningModule; steady-state seconds per update of `Trainer.fit`."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint

    model_options, optimizer_options, train, val = hand_built_job(output, epochs)

    class DigitsModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = DigitsClassifier(DigitsClassifierConfig(**model_options))

        def training_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> torch.Tensor:
            loss = F.cross_entropy(self.model(batch["x"]), batch["y"])
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> None:
            self.log("val_loss", F.cross_entropy(self.model(batch["x"]), batch["y"]), on_epoch=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), **optimizer_options)

    torch.manual_seed(0)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter())

    clock = Clock()
    callbacks: list[pl.Callback] = []
    if full:
        callbacks = [
            ModelCheckpoint(dirpath=output / run_id, filename="best", monitor="val_loss", save_top_k=1),
            ModelCheckpoint(dirpath=output / run_id, filename="{epoch}", every_n_epochs=1, save_top_k=-1, save_last=True),
            EMAWeightAveraging(decay=EMA_FACTOR),
        ]
    callbacks.append(clock)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        enable_checkpointing=full,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=output / run_id,
    )
    trainer.fit(DigitsModule(), train, val)
    return steady_seconds_per_update(clock.times, len(train))


VARIANTS = {
    ("plain_loop", "bare"): lambda out, e, rid, device: time_plain_loop(out, e, False, rid, device),
    ("noether", "bare"): lambda out, e, rid, device: time_noether(out, e, False, rid, device),
    ("noether", "full"): lambda out, e, rid, device: time_noether(out, e, True, rid, device),
    ("lightning", "bare"): lambda out, e, rid, device: time_lightning(out, e, False, rid, device),
    ("lightning", "full"): lambda out, e, rid, device: time_lightning(out, e, True, rid, device),
}


def run(rounds: int = 9, epochs: int = 5, device: str = "cpu") -> dict[str, float]:
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        raise SystemExit("peer_lightning needs PyTorch Lightning: pip install 'noether-trainkit[bench]'") from None
    logging.getLogger("noether").setLevel(logging.ERROR)  # variants without optimizer saves warn on every run
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    times: dict[tuple[str, str], list[float]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory)
        for variant, timer in VARIANTS.items():  # warm-up: imports, first allocations
            timer(output, 2, f"warm-{'-'.join(variant)}", device)
        for round_index in range(rounds):
            order = list(VARIANTS.items())
            for variant, timer in order if round_index % 2 == 0 else reversed(order):
                times[variant].append(timer(output, epochs, f"{'-'.join(variant)}-{round_index}", device))
    results = {
        f"{framework}_{stack}_ms_per_update": statistics.median(values) * 1e3 for (framework, stack), values in times.items()
    }

    def paired(numerator: tuple[str, str], denominator: tuple[str, str]) -> float:
        return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))

    results["bare_plain_loop_vs_lightning"] = paired(("plain_loop", "bare"), ("lightning", "bare"))
    results["bare_noether_vs_plain_loop"] = paired(("noether", "bare"), ("plain_loop", "bare"))
    for framework in ("noether", "lightning"):
        results[f"{framework}_full_vs_bare"] = paired((framework, "full"), (framework, "bare"))
    for stack in ("bare", "full"):
        results[f"{stack}_noether_vs_lightning"] = paired(("noether", stack), ("lightning", stack))
    results["rounds"] = rounds
    results["lightning_version"] = sys.modules["pytorch_lightning"].__version__
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        f"| ms per update (medians of {results['rounds']} alternated rounds; ratios: medians of per-round ratios) | bare: validation only | "
        "full: best + checkpoint with optimizer every epoch + latest + EMA | full / bare |",
        "| --- | ---: | ---: | ---: |",
        f"| PyTorch Lightning {results['lightning_version']} (ModelCheckpoint x2, EMAWeightAveraging) | "
        f"{results['lightning_bare_ms_per_update']:.2f} | {results['lightning_full_ms_per_update']:.2f} | {results['lightning_full_vs_bare']:.2f} |",
        f"| this project | {results['noether_bare_ms_per_update']:.2f} | {results['noether_full_ms_per_update']:.2f} | "
        f"{results['noether_full_vs_bare']:.2f} |",
        f"| hand-written PyTorch loop (no checkpoints) | {results['plain_loop_bare_ms_per_update']:.2f} | | |",
        f"| this project / Lightning | {results['bare_noether_vs_lightning']:.2f} | {results['full_noether_vs_lightning']:.2f} | |",
        f"| hand-written loop / Lightning (the floor of the row above) | {results['bare_plain_loop_vs_lightning']:.2f} | | |",
        f"| this project / hand-written loop | {results['bare_noether_vs_plain_loop']:.2f} | | |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; nothing measured")
    results = run(arguments.rounds, arguments.epochs, arguments.device)
    print(table(results))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
