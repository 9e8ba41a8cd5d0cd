#!/usr/bin/env bash
# Run THERE (the GPU machine, through the device tool, after bench/gpu_prepare.sh here): the crossings comparison at a
# budget the 2-core CPU cannot afford (STEPS optimizer steps per run, 1500 by default), maskrcnn, dacseg and the
# calibration maskrcnn_mask14, seeds 0 1 2, seed by seed so that a run cut short still leaves whole seeds. Every
# finished run is saved under $OUT/crossings at once (what a timeout leaves comes back); the report ends the log.
# Bring the runs back into a folder here and `python bench/bench_crossings.py --report DIR` prints the tables again.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
RUNS=${OUT:-.}/crossings
LOG=${OUT:-.}/gpu_crossings.log
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 bench/bench_crossings.py --device cuda --variants maskrcnn dacseg maskrcnn_mask14 --seeds 0 1 2 \
        --steps "${STEPS:-1500}" --evals 3 --train-data crops --crop-size 128 --rois-per-image 64 \
        --data-path .gpu_data --out "$RUNS"
    python3 bench/bench_crossings.py --report "$RUNS"
} 2>&1 | tee "$LOG"
