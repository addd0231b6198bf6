"""Command-line entry points `noether-train`, `noether-eval`, `noether-ckpt` and `noether-plot`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from noether.core.config import ConfigError, load_yaml
from noether.core.object_storage import UploadError
from noether.core.writers.checkpoint_writer import CheckpointLoadError, CheckpointWriteError
from noether.core.writers.log_writer import LogWriteError
from noether.data.container import UnknownDatasetKeyError
from noether.tools.checkpoints import RunToolError
from noether.training.trainers.nonfinite import NonFiniteLossError

VERIFY_DAMAGED = 1
VERIFY_INTERRUPTED = 3
"""`noether-ckpt verify` exit codes (2: bad input, like every user error)."""
USER_ERRORS = (
    ConfigError,
    CheckpointLoadError,
    CheckpointWriteError,
    LogWriteError,
    UnknownDatasetKeyError,
    FileNotFoundError,
    RunToolError,
)


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
        "--resume",
        metavar="RUN",
        help="continue this run (id or directory); 'auto': the config's run_id if it has a checkpoint, else start it",
    )
    parser.add_argument("--checkpoint", metavar="TAG", help="checkpoint to resume from (default: the newest complete one)")
    arguments = parser.parse_intermixed_args(argv)
    if arguments.checkpoint is not None and arguments.resume is None:
        parser.error("--checkpoint needs --resume RUN")
    from noether.training.run import train

    def train_and_print() -> None:
        paths = train(_load_config(arguments.args), resume=arguments.resume, checkpoint=arguments.checkpoint)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line rather than one per process
            print(paths.location)

    return _report_user_errors(parser.prog, train_and_print)


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noether-eval", description="Evaluate a checkpoint with the config's callbacks.")
    parser.add_argument("args", nargs="*", metavar="CONFIG [dotted.key=value ...]")
    parser.add_argument(
        "--run",
        "--run-id",
        dest="run",
        required=True,
        metavar="RUN",
        help="run id, directory or run URL (s3://...); under torchrun write --run-id (torchrun takes --run for its --run-path)",
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="TAG", help="checkpoint tag, e.g. latest or best_model.loss.val.total"
    )
    arguments = parser.parse_intermixed_args(argv)
    from noether.training.run import evaluate

    def evaluate_and_print() -> None:
        summary = evaluate(_load_config(arguments.args), run=arguments.run, checkpoint=arguments.checkpoint)
        for key, value in summary.items():
            print(f"{key}: {value}")

    return _report_user_errors(parser.prog, evaluate_and_print)


def ckpt_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noether-ckpt", description="List, verify or export the checkpoints of a run.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_arguments(commands.add_parser("list", help="one line per checkpoint tag"))
    verify = commands.add_parser(
        "verify",
        help="load every checkpoint file and check its stamps (exit 1: damage, 3: an interrupted commit)",
        description="Load every checkpoint file of RUN and check that the files of each tag agree. Exit codes: "
        f"0 all sound; {VERIFY_DAMAGED} a file is damaged or does not belong with its tag (one line names each); "
        f"{VERIFY_INTERRUPTED} all sound but a set's commit was interrupted by a stop (one line per set): "
        "not damage, the next start of the run (--resume) completes it; 2 bad input.",
    )
    _add_run_arguments(verify)
    export = commands.add_parser("export", help="write a checkpoint's weights as .safetensors or a plain state_dict .pt")
    _add_run_arguments(export)
    export.add_argument("--checkpoint", required=True, metavar="TAG", help="checkpoint tag, e.g. best_model.loss.val.total")
    export.add_argument("--ema", metavar="FACTOR", help="the EMA weights of this factor instead of the weights")
    export.add_argument("--model", metavar="NAME", help="one submodel of a composite model (default: the whole model)")
    export.add_argument("--output", required=True, type=Path, metavar="FILE", help="ends in .safetensors or .pt")
    arguments = parser.parse_args(argv)
    from noether.tools import checkpoints

    verify_status = 0

    def run_command() -> None:
        nonlocal verify_status
        paths, store = checkpoints.open_run(arguments.run, arguments.output_path)
        if arguments.command == "list":
            print("\n".join(checkpoints.list_checkpoints(paths, store)) or f"no checkpoints in {store.directory}")
        elif arguments.command == "export":
            written = checkpoints.export_weights(
                paths, store, arguments.checkpoint, arguments.output, ema=arguments.ema, model=arguments.model
            )
            print(written)
        else:
            problems, leftovers, interrupted = checkpoints.verify_checkpoints(store)
            for line in [*problems, *(commit.describe() for commit in interrupted), *leftovers]:
                print(line)
            verify_status = VERIFY_DAMAGED if problems else VERIFY_INTERRUPTED if interrupted else 0
            if not problems:
                infos = store.tags()
                but = f", apart from the {len(interrupted)} interrupted commit(s) above (the next start completes them)"
                but = but if interrupted else ""
                print(f"ok: all {sum(len(info.files) for info in infos)} files of {len(infos)} checkpoints load and agree{but}")

    return _report_user_errors(parser.prog, run_command) or verify_status


def plot_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noether-plot", description="PNG plots of a run's metrics, one per metric group.")
    _add_run_arguments(parser)
    parser.add_argument("--output", type=Path, metavar="DIR", help="where to write the PNGs (default: {run_dir}/plots)")
    arguments = parser.parse_args(argv)
    from noether.tools.checkpoints import open_run
    from noether.tools.plot import plot_run

    def plot_and_print() -> None:
        paths, _ = open_run(arguments.run, arguments.output_path)
        default = (
            Path(f"{paths.run_id}-plots") if paths.remote_url else paths.run_dir / "plots"
        )  # a bucket's run is a temporary copy
        for path in plot_run(paths, arguments.output or default):
            print(path)

    return _report_user_errors(parser.prog, plot_and_print)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id (under --output-path), run directory or run URL (s3://...)")
    parser.add_argument("--output-path", default="outputs", help="where run ids are looked up (default: outputs)")


def _load_config(positionals: list[str]) -> dict:
    config_path, overrides = _split_config_and_overrides(positionals)
    return load_yaml(config_path, overrides)


def _report_user_errors(prog: str, command: Callable[[], None]) -> int:
    """A user's mistake ends in one line on stderr and exit code 2, not a traceback."""
    try:
        command()
    except USER_ERRORS as error:
        return _report(prog, error, exit_code=2)
    except (NonFiniteLossError, UploadError) as error:  # the run stopped as configured / its files are in the cache
        return _report(prog, error, exit_code=1)
    return 0


def _report(prog: str, error: Exception, exit_code: int) -> int:
    # one write, so that the lines of processes sharing stderr (torchrun) do not interleave
    sys.stderr.write(f"{prog}: error: {_one_line(error)}\n")
    sys.stderr.flush()
    return exit_code
