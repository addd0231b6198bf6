"""Run as a script (CHECKPOINT_DIR RUN_ID): save a new set under `latest` through the real store, and SIGKILL this
process right after its commit moved the first file into place: a stop in the middle of a set's commit."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointWriter

NEW_ITERATION = TrainingIteration(2, 12, 1536)


class KilledAfterTheFirstMove(CheckpointWriter):
    def replace(self, source: Path, path: Path) -> None:
        super().replace(source, path)
        os.kill(os.getpid(), signal.SIGKILL)


def main(checkpoint_dir: Path, run_id: str) -> None:
    reader = CheckpointStore(checkpoint_dir, run_id)
    members = {member: reader.load(member, "latest") for member in reader.info("latest").files if member.part != "trainer"}
    trainer_state = reader.load(Member("classifier", "trainer"), "latest")
    store = CheckpointStore(checkpoint_dir, run_id, KilledAfterTheFirstMove(asynchronous=False))
    store.save("latest", NEW_ITERATION, members, trainer_state, trainer_model_name="classifier")
    store.wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
