#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU check: fetches the wheels the GPU machine lacks (Python 3.12 there) into
# .whl/ and copies BioImLab's labelme files into .gpu_data/ (both ignored by git; the device tool carries them).
# Then call the device tool with carry [".whl", ".gpu_data"] and the command `bash bench/gpu_run.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
for package in pycocotools==2.0.10 faster-coco-eval==1.8.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$package"
done
rm -rf .gpu_data && mkdir -p .gpu_data
cp -r ../shared/data/bioimlab/labelme .gpu_data/
du -sh .whl .gpu_data
