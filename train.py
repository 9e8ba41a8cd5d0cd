"""Train Mask R-CNN or DaCSeg on a COCO-layout chromosome dataset (one process; train_multi_GPU.py for several).

    python train.py --data-path data/synth --epochs 26 -b 4 --output-dir save_weights

Writes checkpoints, det_results.txt / seg_results.txt, metrics.jsonl and plots into --output-dir
(see train_utils/engine/trainer.py). Exit status: 0 done, 1 training failed (e.g. a non-finite loss), 2 a usage error.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_utils.engine import trainer  # noqa: E402
from train_utils.cli import get_args_parser, parse_args  # noqa: E402,F401 (get_args_parser: tests/test_cli.py reads it)


def main(argv: list[str] | None = None) -> int:
    return trainer.main(parse_args(argv, prog="train.py", description=__doc__.splitlines()[0]))


if __name__ == "__main__":
    sys.exit(main())
