"""LogWriter: every step in metrics.jsonl, summary.json kept current at a bounded cost; a file that cannot be
written is one LogWriteError naming it."""

from __future__ import annotations

import json

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


def test_every_step_reaches_metrics_jsonl_and_the_summary_is_current_after_close(tmp_path):
    writer = LogWriter(tmp_path / "metrics.jsonl", tmp_path / "summary.json")
    for loss in (3.0, 2.0, 1.0):
        writer.add_scalar("loss", loss)
        writer.flush(counter())
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3.0, 2.0, 1.0]
    assert json.loads((tmp_path / "summary.json").read_text())["loss"] == 3.0  # rewritten at most every 10 s
    writer.close()
    assert json.loads((tmp_path / "summary.json").read_text()) == {"loss": 1.0}
