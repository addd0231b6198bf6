"""`keep_last_n` never deletes best, tolerance, interrupt or error checkpoints: one run that produces
every kind of them, all older than the periodic set it keeps, then every one of them is checked.

The run (18 updates, a periodic set every 2 updates of which the newest one stays):

1. fails after update 5 (an error checkpoint) — its best model and tolerances were written at update 2;
2. resumed from that error checkpoint, it is stopped by SIGTERM after update 7 (an interrupt checkpoint);
3. resumed from the interrupt checkpoint, it finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from noether.core.checkpoint_store import CheckpointStore
from noether.core.providers.path import PathProvider
from noether.training.run import train
from tests.conftest import tiny_config

METRIC = "loss/scripted/total"
BEST = "noether.core.callbacks.BestCheckpointCallback"
SCRIPTED = "tests.support.scripted_metric.ScriptedMetric"
SCRIPT = [float(value) for value in range(1, 10)]  # logged at updates 2, 4, ..., 18: the best at update 2
BEST_TAG = "best_model.loss.scripted.total"
ERROR_TAG = "E0_U5_S640.error"
INTERRUPT_TAG = "E0_U7_S896.signal_interrupt"
NEVER_DELETED = [BEST_TAG, f"{BEST_TAG}.tolerance=0", f"{BEST_TAG}.tolerance=3", ERROR_TAG, INTERRUPT_TAG, "latest", "last"]


def retained_tree(output_path: Path) -> dict[str, Any]:
    return tiny_config(
        output_path,
        callbacks=[
            # the best value at the first invocation (update 2), worse at every later one
            {"kind": SCRIPTED, "every_n_updates": 2, "metric_key": METRIC, "values": SCRIPT},
            {"kind": BEST, "every_n_updates": 2, "metric_key": METRIC, "tolerances": [0, 3]},
            {
                "kind": "noether.core.callbacks.CheckpointCallback",
                "every_n_updates": 2,
                "keep_last_n": 1,
                "save_latest_weights": True,
                "save_latest_optim": True,
            },
            {"kind": "tests.support.failing.FailAtUpdateCallback", "at_update": 5, "failed_file": str(output_path / "failed")},
            {"kind": "tests.support.interrupting.SignalSelfCallback", "at_update": 7, "signal_name": "SIGTERM"},
        ],
    )


@pytest.fixture(scope="module")
def retained_run(tmp_path_factory) -> PathProvider:
    tree = retained_tree(tmp_path_factory.mktemp("retained"))
    with pytest.raises(RuntimeError, match="test failure after update 5"):
        train(tree)
    paths = PathProvider(Path(tree["output_path"]), "run")
    assert CheckpointStore(paths.checkpoint_dir, "run").newest_resumable().tag == ERROR_TAG

    train(tree, resume="run")  # stopped by SIGTERM after update 7
    assert CheckpointStore(paths.checkpoint_dir, "run").newest_resumable().tag == INTERRUPT_TAG
    train(tree, resume="run")
    return paths


def test_keep_last_n_deleted_every_older_periodic_set(retained_run):
    """It did work in this run: of the nine periodic sets only the newest is left."""
    tags = [info.tag for info in CheckpointStore(retained_run.checkpoint_dir, "run").tags()]
    assert [tag for tag in tags if tag.startswith("E") and "." not in tag] == ["E2_U18_S2304"]
    assert sorted(tags) == sorted(["E2_U18_S2304", *NEVER_DELETED])
    log = retained_run.log_file.read_text()
    assert f"resuming from the newest complete checkpoint '{ERROR_TAG}'" in log
    assert f"resuming from the newest complete checkpoint '{INTERRUPT_TAG}'" in log


@pytest.mark.parametrize("tag", NEVER_DELETED)
def test_keep_last_n_never_deletes_best_tolerance_interrupt_or_error_checkpoints(retained_run, tag):
    store = CheckpointStore(retained_run.checkpoint_dir, "run")
    info = store.info(tag)
    parts = {member.part for member in info.files}
    if tag.startswith(BEST_TAG):
        assert parts == {"model"}
        assert info.iteration.update == 2
    else:  # a whole set: it can still be resumed
        assert parts == {"model", "optim", "trainer"}
        assert info.resumable, info.problem
    for member, path in info.files.items():
        payload = torch.load(path, weights_only=True)  # every file whole
        assert payload["training_iteration"] == info.iteration.to_dict(), path.name
        if member.part != "trainer":
            assert payload["state_dict"], path.name
