"""`noether-ckpt export` and `noether-plot` where they cannot write: one line on stderr and exit code 2, not a traceback,
and nothing written. Exports are atomic: a killed export leaves the previous file whole and nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from noether.cli import ckpt_main
from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointWriter
from tests.conftest import cli_command, cli_env, run_cli


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """`directory` as a process of this user sees a read-only one: a read-only bind mount for root, else its mode."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o755)
        return
    view = directory.with_name(f"{directory.name}-read-only")
    view.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(view)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only view here")
    try:
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False)


def assert_one_line_error(result: subprocess.CompletedProcess, prog: str, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"{prog}: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(fragment in result.stderr for fragment in fragments), result.stderr


def export(run_dir: Path, output: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("noether-ckpt", "export", str(run_dir), "--checkpoint", "last", "--output", str(output), cwd=cwd, check=False)


def test_export_into_a_read_only_directory(full_run, tmp_path):
    (tmp_path / "weights").mkdir()
    with read_only(tmp_path / "weights") as directory:
        result = export(full_run.run_dir, directory / "last.pt", tmp_path)
        assert_one_line_error(result, "noether-ckpt", f"cannot write {directory / 'last.pt'}: ")
    assert not list((tmp_path / "weights").iterdir())


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("missing/last.pt", "missing does not exist; create that directory first"),
        ("taken.pt", "taken.pt is a directory; name a file in it"),
    ],
    ids=["into-a-missing-directory", "onto-a-directory"],
)
def test_export_to_an_output_that_cannot_become_the_file(full_run, tmp_path, output, fragment):
    (tmp_path / "taken.pt").mkdir()
    result = export(full_run.run_dir, tmp_path / output, tmp_path)
    assert_one_line_error(result, "noether-ckpt", fragment)
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["taken.pt"]


def test_plot_of_a_read_only_run(full_run, tmp_path):
    with read_only(full_run.run_dir) as run_dir:
        result = run_cli("noether-plot", str(run_dir), cwd=tmp_path, check=False)
        assert_one_line_error(result, "noether-plot", f"cannot write the plots into {run_dir / 'plots'}: ", "pass --output DIR")
    assert not (full_run.run_dir / "plots").exists()


def test_plot_with_an_output_that_is_a_file(full_run, tmp_path):
    (tmp_path / "figures").write_text("mine")
    result = run_cli("noether-plot", str(full_run.run_dir), "--output", str(tmp_path / "figures"), cwd=tmp_path, check=False)
    assert_one_line_error(result, "noether-plot", "figures is a file; name a directory for the plots")
    assert (tmp_path / "figures").read_text() == "mine"


ELEMENTS = 8 * 2**20  # float32: a 32 MiB export, long enough to be killed while it is being written


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """A run directory whose `last` weights are one large tensor, saved through the store (no training)."""
    run_dir = tmp_path_factory.mktemp("outputs") / "big"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run_id: big\n")
    store = CheckpointStore(run_dir / "checkpoints", "big", CheckpointWriter(asynchronous=False))
    weights = {"weight": torch.randn(ELEMENTS, generator=torch.Generator().manual_seed(0))}
    store.save("last", TrainingIteration(1, 10, 1280), {Member("big", "model"): {"state_dict": weights}})
    store.wait()
    return run_dir


def is_being_written(directory: Path, previous: Path, before: os.stat_result) -> bool:
    """Bytes of the export are on disk: a new file in `directory` is growing, or `previous` is being overwritten in place."""
    with contextlib.suppress(FileNotFoundError):
        now = previous.stat()
        if now.st_ino == before.st_ino and (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return True
    for path in directory.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if path != previous and path.is_file() and path.stat().st_size > 0:
                return True
    return False


def kill_while_writing(command: list[str], output: Path, attempts: int = 5) -> None:
    """Start `command` and SIGKILL it once it is writing `output` (started again where it finished first)."""
    for _ in range(attempts):
        before = output.stat()
        process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None:
            if is_being_written(output.parent, output, before):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return
        # it finished before it was seen writing (a busy machine): nothing was tested, so again
    pytest.fail(f"the export finished {attempts} times before it could be killed while writing")


def test_a_killed_export_leaves_the_previous_file_whole_and_the_next_one_nothing_behind(big_run, tmp_path):
    """The .pt case, which torch.save used to overwrite in place; a .safetensors export is written the same way."""
    output = tmp_path / "exported.pt"
    previous = {"weight": torch.arange(4.0)}
    torch.save(previous, output)
    command = [cli_command("noether-ckpt"), "export", str(big_run), "--checkpoint", "last", "--output", str(output)]

    kill_while_writing(command, output)

    weights = CheckpointStore(big_run / "checkpoints", "big").load(Member("big", "model"), "last")["state_dict"]
    kept = torch.load(output, weights_only=True)  # the previous file, or (killed after its rename) the new one: never a torn one
    assert kept.keys() == {"weight"} and (kept["weight"].equal(previous["weight"]) or kept["weight"].equal(weights["weight"]))

    assert ckpt_main(["export", str(big_run), "--checkpoint", "last", "--output", str(output)]) == 0  # the next export
    assert sorted(path.name for path in tmp_path.iterdir()) == [output.name]  # the killed export's temporary is gone
    assert torch.load(output, weights_only=True)["weight"].equal(weights["weight"])
