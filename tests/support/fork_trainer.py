"""Fork server for tests that kill training processes: `python -m tests.support.fork_trainer`.

Importing torch takes seconds, so this process imports the trainer once and forks a fresh
process for every job. A job is one JSON line on stdin, `{"tree": ..., "resume": RUN or null,
"log": PATH}`: the child runs `noether.training.run.train(tree, resume=RUN)` (from `latest`) with
its output in PATH. The server answers `started <pid>`, then `ended <exit code>` once the child is
gone (negative: killed by that signal).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch._dynamo  # noqa: F401 - imported by the first optimizer; here once, not in every child

import noether.examples.digits  # noqa: F401 - likewise
from noether.training.run import train


def run_job(job: dict) -> None:
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        train(job["tree"], resume=job["resume"])
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    else:
        exit_code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        child = os.fork()
        if child == 0:
            run_job(job)
        print(f"started {child}", flush=True)
        _, status = os.waitpid(child, 0)
        print(f"ended {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
