"""summary.json is derived data: one emptied or torn by a power loss is rebuilt from metrics.jsonl, not fatal; its
rewrites are fsynced before the rename, and a new run directory is made durable once."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from noether.core.writers.log_writer import LogWriter

ROWS = [
    {"epoch": 0, "update": 1, "sample": 128, "loss/online/total": 2.5, "lr/classifier": 0.1},
    {"epoch": 0, "update": 2, "sample": 256, "loss/online/total": 2.25, "loss/val/total": 2.4},
    {"epoch": 1, "update": 3, "sample": 384, "loss/online/total": 2.0, "best/loss/val/total": 2.4},
]


@pytest.mark.parametrize("summary", ["", '{\n  "loss/online/total": 2.', "\0\0\0\0"], ids=["empty", "torn", "zeroed"])
def test_a_summary_that_does_not_parse_is_rebuilt_from_metrics_jsonl(tmp_path, summary):
    metrics_file, summary_file = tmp_path / "metrics.jsonl", tmp_path / "summary.json"
    metrics_file.write_text("".join(json.dumps(row) + "\n" for row in ROWS) + '{"epoch": 1, "update": 4, "sam')
    summary_file.write_text(summary)

    writer = LogWriter(metrics_file, summary_file)

    expected = {"loss/online/total": 2.0, "lr/classifier": 0.1, "loss/val/total": 2.4, "best/loss/val/total": 2.4}
    assert writer.summary == expected
    assert json.loads(summary_file.read_text()) == expected
    assert writer.rows_written == 4  # the torn line is still counted, so a resume cuts it off
    writer.close()


STRACED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from noether.core.providers.path import PathProvider
    from noether.core.utils.training.counter import UpdateCounter
    from noether.core.utils.training.iteration import TrainingIteration
    from noether.core.writers.log_writer import LogWriter

    paths = PathProvider(Path(sys.argv[1]) / "outputs", "run")
    paths.create()
    writer = LogWriter(paths.metrics_file, paths.summary_file)
    writer.add_scalar("loss", 1.0)
    counter = UpdateCounter(
        start_iteration=TrainingIteration(), end_iteration=TrainingIteration(epoch=1), updates_per_epoch=1, effective_batch_size=1
    )
    writer.flush(counter)
    writer.close()
    paths.create()  # a second start of the same run creates nothing
    """
)
OPENED = re.compile(r'^openat\(AT_FDCWD, "(?P<path>[^"]+)", .*\) = (?P<fd>\d+)$')
FSYNC = re.compile(r"^fsync\((?P<fd>\d+)\)")
RENAMED = re.compile(r'^rename\w*\((?:AT_FDCWD, )?"(?P<source>[^"]+)", (?:AT_FDCWD, )?"(?P<target>[^"]+)"')


def file_operations(trace: str) -> list[tuple[str, ...]]:
    """("fsync", path) and ("rename", source, target) in the order the process made them."""
    paths_by_fd: dict[str, str] = {}
    operations = []
    for line in trace.splitlines():
        if opened := OPENED.match(line):
            paths_by_fd[opened["fd"]] = opened["path"]
        elif synced := FSYNC.match(line):
            operations.append(("fsync", paths_by_fd.get(synced["fd"], "?")))
        elif renamed := RENAMED.match(line):
            operations.append(("rename", renamed["source"], renamed["target"]))
    return operations


def test_the_summary_is_fsynced_before_its_rename_and_a_new_run_directory_once(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    trace = tmp_path / "trace"
    syscalls = "trace=openat,fsync,rename,renameat,renameat2"
    command = ["strace", "-qq", "-e", syscalls, "-o", str(trace), sys.executable, "-c", STRACED, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    operations = file_operations(trace.read_text())

    run_dir = tmp_path / "outputs" / "run"
    summary, staged = str(run_dir / "summary.json"), str(run_dir / "summary.json.tmp")
    renames = [index for index, operation in enumerate(operations) if operation == ("rename", staged, summary)]
    assert renames, operations
    since = 0
    for rename in renames:  # each rewrite's bytes are on disk before its rename
        assert ("fsync", staged) in operations[since:rename], operations[since:rename]
        since = rename
    for directory in (tmp_path, tmp_path / "outputs", run_dir, run_dir / "checkpoints"):
        assert operations.count(("fsync", str(directory))) == 1, directory  # once: not again by the second start
