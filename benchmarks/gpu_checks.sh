#!/usr/bin/env bash
# The GPU checks of issues 25 and 27 in one command of the device tool (limit 10 minutes), each step
# under its own timeout so that one slow step leaves the others their time. The device image has
# PyTorch and most of the dependencies but not pydantic: its wheels travel in .whl (git-ignored).
#
#   here:       bash benchmarks/gpu_checks.sh fetch
#   on the GPU: bash benchmarks/gpu_checks.sh run      (device tool: carry [".whl"], timeout_s 600)
#
# What comes back under $OUT: gpu_checks.log (everything printed) and one JSON per benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."

fetch() {
    mkdir -p .whl
    for package in pydantic pydantic-core annotated-types typing-inspection; do
        version=$(.venv/bin/python -m pip show "$package" | sed -n 's/^Version: //p')
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$package==$version" || exit 1
    done
    ls .whl
}

step() {  # step SECONDS NAME COMMAND...
    local seconds=$1 name=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), at most ${seconds} s)"
    timeout "$seconds" "$@"
    echo "== $name: exit $?"
}

run() {
    local out=${OUT:-/tmp/gpu_checks}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=src:.:/tmp/site PYTHONUNBUFFERED=1
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
        # issue 25 item 1, issue 27 item 2: no synchronization between logging steps; snapshots of GPU tensors
        step 150 "CUDA tests" python3 -m pytest -q -p no:cacheprovider tests/training/test_cuda_sync.py \
            tests/core/writers/test_checkpoint_writer.py -k "cuda or never_synchronize"
        # issue 27 items 3 and 4: the 34M-parameter job saving 0.54 GB every 100 updates, full / bare <= 1.05
        step 150 "saving job" python3 benchmarks/saving_job.py --device cuda --rounds 3 --json "$out/saving_job.json"
        # issue 27 item 4: the quickstart job, this project bare / hand-written loop <= 1.05 (Lightning is in the image)
        step 120 "quickstart job" python3 benchmarks/peer_lightning.py --device cuda --rounds 3 --json "$out/peer_lightning.json"
        # issue 27 item 4: EMA update <= 1.05x one flat lerp
        step 50 "EMA update" python3 benchmarks/ema_update.py --device cuda --factors 1 3 --json "$out/ema_update.json"
        step 80 "example throughput" python3 benchmarks/training_throughput.py --device cuda --rounds 5 --json "$out/throughput.json"
    } 2>&1 | tee "$out/gpu_checks.log"
}

case "${1:-}" in
fetch) fetch ;;
run) run ;;
*)
    echo "usage: bash benchmarks/gpu_checks.sh fetch|run" >&2
    exit 2
    ;;
esac
