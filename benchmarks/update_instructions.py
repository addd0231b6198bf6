"""Instructions per update: the bare loop against the trainer, counted by valgrind, not timed.

Wall-clock ratios on a shared 2-core VM move by 10% from run to run, too much to tell a 3%
overhead apart. Valgrind's callgrind counts the instructions every thread of the process executes,
the same on every run. Each variant runs single-threaded
(OMP_NUM_THREADS=1) under callgrind for `--epochs` and for twice as many epochs; the difference,
divided by the extra updates, is what one steady-state update costs, start-up and imports left out.

It counts work, not time: cache misses, waits on the disk and the writer thread's fsyncs do not
show. Slow (valgrind runs code about 50x slower): about 15 minutes on 2 cores for the default
variants; not part of `make bench`.

The `quickstart_*` variants count the job of peer_lightning.py (the hand-written loop, this project
and Lightning, bare and full), so that its ratios can be read without the machine's noise:

    python benchmarks/update_instructions.py --variants quickstart_plain_loop quickstart_bare quickstart_lightning_bare

    python benchmarks/update_instructions.py [--epochs 2] [--variants bare_loop trainer_defaults]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import training_throughput


def _throughput(timer: Callable[..., float], callbacks: list[dict[str, Any]]) -> Callable[[Path, int], Any]:
    return lambda output, epochs: timer(training_throughput.config_tree(output, "example", epochs, callbacks), "counted")


def _peer(timer_name: str, full: bool) -> Callable[[Path, int], Any]:
    def run_peer(output: Path, epochs: int) -> Any:
        import peer_lightning

        for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        return getattr(peer_lightning, timer_name)(output, epochs, full, "counted", "cpu")

    return run_peer


VARIANTS = {
    "bare_loop": _throughput(training_throughput.time_bare_loop, []),
    "trainer_defaults": _throughput(training_throughput.time_trainer, []),
    "trainer_full_stack": _throughput(training_throughput.time_trainer, training_throughput.FULL_STACK),
    # the quickstart job of peer_lightning.py (a validation pass every epoch); Lightning's need the [bench] extra
    "quickstart_plain_loop": _peer("time_plain_loop", full=False),
    "quickstart_bare": _peer("time_noether", full=False),
    "quickstart_full": _peer("time_noether", full=True),
    "quickstart_lightning_bare": _peer("time_lightning", full=False),
    "quickstart_lightning_full": _peer("time_lightning", full=True),
}


def run_variant(name: str, epochs: int) -> None:
    """In the child process under valgrind: one run of `name`."""
    logging.getLogger("noether").setLevel(logging.ERROR)  # variants without optimizer saves warn on every run
    with tempfile.TemporaryDirectory() as output:
        VARIANTS[name](Path(output), epochs)


def count_instructions(name: str, epochs: int, directory: Path) -> int:
    out_file = directory / f"callgrind.{name}.{epochs}"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out_file}",
        sys.executable,
        __file__,
        "--child",
        name,
        str(epochs),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"{name} ({epochs} epochs) failed under valgrind:\n{finished.stderr[-2000:]}")
    for line in out_file.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction count in {out_file}")


def run(variants: list[str], epochs: int) -> dict[str, float]:
    updates_per_epoch = _updates_per_epoch()
    jobs = [(name, e) for name in variants for e in (epochs, 2 * epochs)]
    with tempfile.TemporaryDirectory() as directory, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: count_instructions(*job, Path(directory)), jobs)))
    results = {
        f"{name}_instructions_per_update": (counts[name, 2 * epochs] - counts[name, epochs]) / (epochs * updates_per_epoch)
        for name in variants
    }
    for name in variants[1:]:
        results[f"{name}_vs_{variants[0]}"] = (
            results[f"{name}_instructions_per_update"] / results[f"{variants[0]}_instructions_per_update"]
        )
    return results


def _updates_per_epoch() -> int:
    from noether.examples.digits import DigitsDataset, DigitsDatasetConfig

    tree = training_throughput.config_tree(Path("unused"), "example", 1, [])
    return len(DigitsDataset(DigitsDatasetConfig(split="train"))) // tree["trainer"]["effective_batch_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["bare_loop", "trainer_defaults"])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "EPOCHS"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        run_variant(arguments.child[0], int(arguments.child[1]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed; nothing measured")
    for key, value in run(arguments.variants, arguments.epochs).items():
        print(f"{key:50s} {value:14.4f}")


if __name__ == "__main__":
    main()
