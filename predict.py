"""Predict chromosome instances on images with a trained checkpoint (Mask R-CNN or DaCSeg).

    python predict.py --weights-path save_weights/best.pth metaphase.tif more_images/ "batch_*/*.png" --output-dir P

The model is rebuilt from the checkpoint alone. Writes ``P/<stem>_pred.png`` per image, ``P/predictions.json`` (COCO
results), ``P/images.json`` (image ids to files) and ``P/summary.csv`` (one row per image), with ``--crops DIR``
each chromosome upright as its own image, and with ``--export labelme imagej geojson coco`` outlines to correct in
an annotation tool; see ``train_utils/jobs/predict.py`` for the formats. An unreadable image, or one too large for
the memory, is reported and skipped; the others are predicted, and the exit status is then 2. The JSON files are
complete after every image.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from errors import DaCSegError, print_error  # noqa: E402
from train_utils.cli import get_predict_parser, parse_predict_args  # noqa: E402,F401 (test_cli reads the parser)
from train_utils.jobs.predict import run_prediction  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_predict_args(argv)
    try:
        summary, num_inputs = run_prediction(args)
    except DaCSegError as exc:
        print_error(exc)
        return 2
    done = len(summary.images)
    mean_ms = 1000 * summary.seconds / done if done else 0.0
    print(f"{done} image(s), {summary.num_detections} detection(s), {mean_ms:.0f} ms per image; "
          f"results in {Path(args.output_dir) / 'predictions.json'}, one row per image in "
          f"{Path(args.output_dir) / 'summary.csv'}")
    if summary.failed:
        names = ", ".join(Path(f["file_name"]).name for f in summary.failed[:5])
        more = " ..." if len(summary.failed) > 5 else ""
        print_error(f"{len(summary.failed)} of {num_inputs} image(s) could not be predicted: {names}{more} "
                    f"(the reasons are in {Path(args.output_dir) / 'images.json'})")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
