"""Command-line entry points `noether-train` and `noether-eval`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from noether.core.config import ConfigError, load_yaml
from noether.core.writers.checkpoint_writer import CheckpointLoadError, CheckpointWriteError
from noether.core.writers.log_writer import LogWriteError
from noether.data.container import UnknownDatasetKeyError

USER_ERRORS = (ConfigError, CheckpointLoadError, CheckpointWriteError, LogWriteError, UnknownDatasetKeyError, FileNotFoundError)


def bundled_example() -> Path:
    return Path(str(resources.files("noether.examples") / "quickstart.yaml"))


def _split_config_and_overrides(positionals: list[str]) -> tuple[Path, list[str]]:
    """The first positional is the config file unless it is a `key=value` override."""
    if positionals and not ("=" in positionals[0] and not Path(positionals[0]).exists()):
        return Path(positionals[0]), positionals[1:]
    return bundled_example(), positionals


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noether-train", description="Train from a YAML config (default: the bundled example).")
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [dotted.key=value ...]")
    parser.add_argument(
        "--resume", metavar="RUN", help="continue this run (id or directory); 'auto': the config's run_id if it has a checkpoint, else start it"
    )
    parser.add_argument("--checkpoint", metavar="TAG", help="checkpoint to resume from (default: the newest complete one)")
    arguments = parser.parse_intermixed_args(argv)
    if arguments.checkpoint is not None and arguments.resume is None:
        parser.error("--checkpoint needs --resume RUN")
    from noether.training.run import train

    def train_and_print() -> None:
        paths = train(_load_config(arguments.args), resume=arguments.resume, checkpoint=arguments.checkpoint)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line rather than one per process
            print(paths.run_dir)

    return _report_user_errors(parser.prog, train_and_print)


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noether-eval", description="Evaluate a checkpoint with the config's callbacks.")
    parser.add_argument("args", nargs="*", metavar="CONFIG [dotted.key=value ...]")
    parser.add_argument("--run", required=True, metavar="RUN", help="run id or directory")
    parser.add_argument("--checkpoint", required=True, metavar="TAG", help="checkpoint tag, e.g. latest or best_model.loss.val.total")
    arguments = parser.parse_intermixed_args(argv)
    from noether.training.run import evaluate

    def evaluate_and_print() -> None:
        summary = evaluate(_load_config(arguments.args), run=arguments.run, checkpoint=arguments.checkpoint)
        for key, value in summary.items():
            print(f"{key}: {value}")

    return _report_user_errors(parser.prog, evaluate_and_print)


def _load_config(positionals: list[str]) -> dict:
    config_path, overrides = _split_config_and_overrides(positionals)
    return load_yaml(config_path, overrides)


def _report_user_errors(prog: str, command: Callable[[], None]) -> int:
    """A user's mistake ends in one line on stderr and exit code 2, not a traceback."""
    try:
        command()
    except USER_ERRORS as error:
        # one write, so that the lines of processes sharing stderr (torchrun) do not interleave
        sys.stderr.write(f"{prog}: error: {_one_line(error)}\n")
        sys.stderr.flush()
        return 2
    return 0
