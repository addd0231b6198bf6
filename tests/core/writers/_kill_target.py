"""Fork server for the SIGKILL test of CheckpointWriter.

Importing torch takes seconds, so this process imports it once and forks a fresh training-like
process for every "run" line on stdin. Each child resumes from the latest checkpoint in the
directory and then writes checkpoints as fast as it can until it is killed; it prints
"running <pid>" once it is about to write, or "failed <error>". A "reap" line waits for that child
and prints "reaped <wait status>".

Every checkpoint holds its step and a tensor filled with that step, so a reader can tell a
consistent file from a torn one.
"""

import os
import sys
import traceback
from pathlib import Path

import torch

from noether.core.writers.checkpoint_writer import CheckpointWriter, load_checkpoint

NUMEL = 1 << 20  # 4 MB of float32 per checkpoint
PERIOD = 8  # steps between periodic (never overwritten) checkpoints


def train(directory: Path) -> None:
    latest = directory / "cp=latest_model.th"
    step = load_checkpoint(latest)["step"] if latest.exists() else 0
    weights = torch.empty(NUMEL)
    writer = CheckpointWriter()
    print(f"running {os.getpid()}", flush=True)
    while True:
        step += 1
        weights.fill_(step)
        payload = {"step": step, "state_dict": {"weights": weights}, "checkpoint_tag": "latest"}
        writer.save(latest, payload)
        if step % PERIOD == 0:
            writer.save(directory / f"cp=S{step}_model.th", {**payload, "checkpoint_tag": f"S{step}"})
        writer.check()


def main() -> None:
    directory = Path(sys.argv[1])
    child = None
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            child = os.fork()
            if child == 0:
                try:
                    train(directory)
                except BaseException as e:
                    print(f"failed {e!r}", flush=True)
                    traceback.print_exc()
                os._exit(1)
        elif command == "reap":
            _, status = os.waitpid(child, 0)
            print(f"reaped {status}", flush=True)


if __name__ == "__main__":
    main()
