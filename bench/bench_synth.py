"""Speed of the synthetic metaphase generator on one CPU core, against the target of 200 images in 60 s.

    python bench/bench_synth.py [--num-images 20] [--size 768x576] [--stain qband]

Writes the images and their JSON to a temporary folder (PNG encoding included) with one worker, and prints
images/s by the wall clock and by process CPU time (the CPU figure is the honest one on a shared machine).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: before numpy is imported

import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.synth_metaphase import STAINS, SynthConfig, generate, parse_size  # noqa: E402
from train_utils.cli import ArgumentParser, number_arg  # noqa: E402

TARGET_IMAGES_PER_S = 200 / 60


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=number_arg(int, low=1), default=20)
    parser.add_argument("--size", type=parse_size, default=(768, 576), metavar="WxH")
    parser.add_argument("--stain", choices=STAINS, default="qband")
    parser.add_argument("--seed", type=number_arg(int, low=0), default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    width, height = args.size
    config = SynthConfig(width=width, height=height, stain=args.stain)
    with tempfile.TemporaryDirectory() as out:
        generate(out, 1, "warmup", args.seed, config)
        wall, cpu = time.perf_counter(), time.process_time()
        generate(out, args.num_images, "bench", args.seed, config)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for what, seconds in (("wall", wall), ("cpu", cpu)):
        rate = args.num_images / seconds
        print(f"{what}: {rate:.2f} images/s ({width}x{height}, 1 core, {args.num_images} images in {seconds:.1f} s); "
              f"{rate / TARGET_IMAGES_PER_S:.2f}x the target of 200 images in 60 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
