"""Distributed training with torchrun: the same parser, engine and outputs as train.py, one process per GPU.

    torchrun --nproc_per_node=4 train_multi_GPU.py --data-path data/bioimlab_coco -b 2     # lr 0.04 (scaled)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train_multi_GPU.py --data-path D ...
    torchrun --nproc_per_node=2 train_multi_GPU.py --device cpu ...   # gloo on CPUs (what CI runs)

-b is per process: the total batch is nproc x b; the default lr scales with it (0.02 per 4 images). Backend nccl on GPUs,
gloo with --device cpu. Only process 0 writes files and progress. Run without torchrun it is a one-process job.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_utils.engine import trainer  # noqa: E402
from train_utils.cli import get_args_parser, parse_args  # noqa: E402,F401 (get_args_parser: tests/test_cli.py reads it)


def main(argv: list[str] | None = None) -> int:
    return trainer.main(parse_args(argv, prog="train_multi_GPU.py", description=__doc__.splitlines()[0]))


if __name__ == "__main__":
    sys.exit(main())
