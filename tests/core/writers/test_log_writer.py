"""LogWriter: a metrics or summary file that cannot be written is one LogWriteError naming it."""

from __future__ import annotations

import pytest

from noether.core.utils.training.counter import UpdateCounter
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.log_writer import LogWriteError, LogWriter


def counter() -> UpdateCounter:
    return UpdateCounter(
        start_iteration=TrainingIteration(), end_iteration=TrainingIteration(epoch=1), updates_per_epoch=1, effective_batch_size=1
    )


def test_a_metrics_file_that_cannot_be_written_is_named_in_the_error(tmp_path):
    metrics_file = tmp_path / "removed" / "metrics.jsonl"  # its directory is gone: a real write failure
    writer = LogWriter(metrics_file, tmp_path / "summary.json")
    writer.add_scalar("loss", 1.0)
    with pytest.raises(LogWriteError) as error:
        writer.flush(counter())
    assert str(error.value) == f"could not write {metrics_file}: No such file or directory"


def test_a_summary_file_that_cannot_be_written_is_named_in_the_error(tmp_path):
    (tmp_path / "summary.json.tmp").mkdir()  # a directory where the summary is staged
    writer = LogWriter(tmp_path / "metrics.jsonl", tmp_path / "summary.json")
    writer.add_scalar("loss", 1.0)
    with pytest.raises(LogWriteError) as error:
        writer.flush(counter())
    assert str(error.value) == f"could not write {tmp_path / 'summary.json'}: Is a directory"
