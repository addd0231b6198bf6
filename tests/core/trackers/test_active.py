"""A tracker that fails is switched off with one warning; training and metrics.jsonl go on."""

from __future__ import annotations

import pytest
import torch

from noether.training.run import train
from tests.support.checkpoints import checkpoint_path
from tests.support.trackers import expected_scalars, metrics_rows, tensorboard_scalars, tracked_tree


@pytest.mark.parametrize(("fail_in", "calls_before_off"), [("start", 0), ("log", 5)])
def test_a_failing_tracker_is_switched_off_with_one_warning_and_training_goes_on(tmp_path, fail_in, calls_before_off):
    failing = {"kind": "tests.support.trackers.FailingTracker", "fail_in": fail_in, "at_update": 5}
    paths = train(tracked_tree(tmp_path, [failing, {"kind": "noether.core.trackers.TensorBoardTracker"}]))

    rows = metrics_rows(paths)
    assert rows[-1]["update"] == 18
    last = torch.load(checkpoint_path(paths, "classifier", "last", "trainer"), weights_only=True)
    assert last["training_iteration"]["update"] == 18
    warnings = [line for line in paths.log_file.read_text().splitlines() if "tracker FailingTracker failed" in line]
    expected = (
        "ConnectionError('tracking server unreachable')" if fail_in == "start" else "OSError(28, 'No space left on device')"
    )
    assert len(warnings) == 1 and f"failed to {fail_in} ({expected}); it is switched off" in warnings[0]
    calls_file = paths.run_dir / "failing_tracker_calls"
    assert (int(calls_file.read_text()) if calls_file.exists() else 0) == calls_before_off  # never called again
    # the other tracker is not affected
    assert tensorboard_scalars(paths.run_dir / "tensorboard") == expected_scalars(rows)
