"""Score a checkpoint, or an existing COCO results file, on a dataset split: ``record_mAP.txt`` and ``record_mAP.json``.

    python validation.py --weights-path save_weights/best.pth --data-path data --split val --output-dir save_weights
    python validation.py --results-json predictions/predictions.json --data-path data --split val --output-dir out

The model is rebuilt from the checkpoint alone; see ``train_utils/jobs/validate.py`` and
``train_utils/outputs/record.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_utils.cli import get_validation_parser  # noqa: E402,F401 (tests/test_cli.py reads it)
from train_utils.jobs.validate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
