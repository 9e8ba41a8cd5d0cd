#!/usr/bin/env bash
# Run THERE (the GPU machine, through the device tool; see bench/gpu_prepare.sh): the accuracy benchmark's GPU
# preset (stock / maskrcnn / dacseg, about 9 minutes) and the training/inference throughput against stock.
# Everything it prints is also written to $OUT/gpu_check.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
LOG=${OUT:-.}/gpu_check.log
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 bench/bench_accuracy.py --preset gpu --data-path .gpu_data --out "${OUT:-.}/accuracy.json"
    python3 tools/labelme2coco.py .gpu_data/labelme/train --out /tmp/bioimlab --split train >/dev/null
    python3 tools/labelme2coco.py .gpu_data/labelme/val --out /tmp/bioimlab --split val >/dev/null
    python3 bench/bench_train.py --data-path /tmp/bioimlab --model maskrcnn --compare-stock --steps 20
    python3 bench/bench_train.py --data-path /tmp/bioimlab --model dacseg --overlap-cls-head conv --compare-stock --steps 20
} 2>&1 | tee "$LOG"
