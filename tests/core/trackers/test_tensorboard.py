"""TensorBoard shows exactly metrics.jsonl: every key, every step, once, also after a resume."""

from __future__ import annotations

import pytest

from noether.training.run import train
from tests.support.trackers import (
    EARLIER_TAG,
    INTERRUPT_TAG,
    expected_scalars,
    metrics_rows,
    read_event_files,
    tensorboard_scalars,
    tracked_tree,
    train_stopped_and_resumed,
)

TENSORBOARD = [{"kind": "noether.core.trackers.TensorBoardTracker"}]


def test_every_metrics_row_is_a_scalar_at_its_update_and_the_config_is_recorded_once(tmp_path):
    paths = train(tracked_tree(tmp_path, TENSORBOARD))

    rows = metrics_rows(paths)
    assert rows[-1]["update"] == 18
    assert tensorboard_scalars(paths.run_dir / "tensorboard") == expected_scalars(rows)
    assert {"epoch", "sample", "loss/online/total", "best/loss/online/total"} <= expected_scalars(rows).keys()
    events = read_event_files(paths.run_dir / "tensorboard")
    (config_event,) = events.Tensors("config/text_summary")
    assert config_event.step == 0
    config_text = config_event.tensor_proto.string_val[0].decode()
    assert "run_id: run" in config_text and "kind: noether.core.trackers.TensorBoardTracker" in config_text


@pytest.mark.parametrize("resume_tag", [INTERRUPT_TAG, EARLIER_TAG])
def test_a_run_stopped_by_sigterm_and_resumed_shows_every_step_once_with_the_values_of_metrics_jsonl(tmp_path, resume_tag):
    paths, stopped_rows = train_stopped_and_resumed(tmp_path, TENSORBOARD, resume_tag)

    rows = metrics_rows(paths)
    assert rows[-1]["update"] == 18
    # the stopped run logged rows that the resume dropped from metrics.jsonl: they must not show either
    assert len(stopped_rows) > len([row for row in rows if row["update"] <= 11])
    assert tensorboard_scalars(paths.run_dir / "tensorboard") == expected_scalars(rows)
    assert len(read_event_files(paths.run_dir / "tensorboard").Tensors("config/text_summary")) == 1
