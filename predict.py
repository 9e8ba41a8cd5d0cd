"""Predict chromosome instances on images with a trained checkpoint (Mask R-CNN or DaCSeg).

    python predict.py --weights-path save_weights/best.pth metaphase.tif more_images/ "batch_*/*.png" --output-dir P

The model is rebuilt from the checkpoint alone. Writes ``P/<stem>_pred.png`` per image, ``P/predictions.json`` (COCO
results) and ``P/images.json`` (image ids to files), and with ``--crops DIR`` each chromosome upright as its own
image (see ``train_utils/crops.py``); see ``train_utils/inference.py`` for the formats. An unreadable
image, or one too large for the memory, is reported and skipped; the others are predicted, and the exit status is
then 2. The JSON files are complete after every image.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from my_dataset_chromosome import DatasetError  # noqa: E402
from train_utils.cli import (  # noqa: E402  # noqa: E402
    ArgumentParser,
    UserError,
    add_device_args,
    add_model_check_arg,
    add_stain_arg,
    add_threshold_args,
    check_model_name,
    number_arg,
    print_error,
)
from train_utils.engine.checkpoint import CheckpointError, load_model_from_checkpoint  # noqa: E402
from train_utils.inference.tta import FlipTTA  # noqa: E402
from train_utils.jobs.predict import (  # noqa: E402
    CropOptions,
    InferenceError,
    expand_inputs,
    label_maps,
    predict_files,
    prepare_model,  # noqa: E402
)
from train_utils.outputs.crops import CROP_BACKGROUNDS  # noqa: E402
from train_utils.stain import checkpoint_polarity  # noqa: E402


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="predict.py", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders of images, or quoted globs (e.g. 'data/**/*.tif')")
    parser.add_argument("--weights-path", required=True, metavar="CKPT",
                        help="checkpoint written by train.py (model_<epoch>.pth or best.pth)")
    parser.add_argument("--output-dir", default="predictions", metavar="DIR",
                        help="where the pictures and JSON files go (default: %(default)s)")
    parser.add_argument("--label-json-path", default=None, metavar="JSON",
                        help='class names {"1": "chromosome", ...} (default: the names stored in the checkpoint)')
    parser.add_argument("--overlap-thresh", type=float, default=0.5, metavar="P",
                        help="DaCSeg: outline detections whose overlap score is at least P (default: %(default)s)")
    parser.add_argument("--save-overlap-maps", action="store_true",
                        help="DaCSeg: also write each image's four overlap probability maps as grey PNGs")
    parser.add_argument("--tta", action="store_true",
                        help="test-time flips: predict the image and its three flips and merge them by mask matching "
                             "(about 4x the time)")
    crops = parser.add_argument_group("karyotype crops")
    crops.add_argument("--crops", default=None, metavar="DIR",
                       help="also write each detected chromosome upright on a clean background, a contact sheet per "
                            "image and crops.json into DIR")
    crops.add_argument("--crop-background", choices=CROP_BACKGROUNDS, default="auto",
                       help="colour around each crop; auto: white for dark-on-bright (G-band) images, black for "
                            "bright-on-dark (Q-band) ones (default: %(default)s)")
    crops.add_argument("--crop-margin", type=number_arg(int, low=0), default=8, metavar="PX",
                       help="background pixels around each chromosome (default: %(default)s)")
    crops.add_argument("--crop-height", type=number_arg(int, low=1), default=None, metavar="PX",
                       help="scale every crop to this height (default: keep the image's pixel scale)")
    add_device_args(parser)
    add_threshold_args(parser)
    add_model_check_arg(parser)
    add_stain_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.save_overlap_maps and args.tta:
        parser.error("argument --tta: not with --save-overlap-maps (the maps are not merged over flips)")
    if not 0.0 <= args.overlap_thresh <= 1.0:
        parser.error(f"argument --overlap-thresh: {args.overlap_thresh} is not in 0..1")
    try:
        paths = expand_inputs(args.inputs)
        model, config, checkpoint = load_model_from_checkpoint(args.weights_path, args.device)
        check_model_name(args.model, config, args.weights_path)
        label_names, label_to_cat_id = label_maps(checkpoint, config, args.label_json_path)
        if args.save_overlap_maps and config.name != "dacseg":
            raise UserError(
                f"--save-overlap-maps needs a DaCSeg checkpoint; {args.weights_path} holds a {config.name} model"
            )
        prepare_model(model, config, args.score_thresh, overlap_maps=args.save_overlap_maps)
        if args.tta:
            model = FlipTTA(model, score_thresh=args.score_thresh, mask_thresh=args.mask_thresh).eval()
        summary = predict_files(
            model, paths, args.output_dir, label_names, label_to_cat_id, device=args.device,
            overlap_thresh=args.overlap_thresh, mask_thresh=args.mask_thresh,
            save_overlap_maps=args.save_overlap_maps, stain_mode=args.stain,
            model_polarity=checkpoint_polarity(checkpoint, args.weights_path, args.stain, announce=False),
            weights_path=args.weights_path,
            crops=None if args.crops is None else CropOptions(Path(args.crops), args.crop_background, args.crop_margin,
                                                              args.crop_height),
        )
    except (CheckpointError, DatasetError, InferenceError, UserError) as exc:
        print_error(exc)
        return 2
    done = len(summary.images)
    mean_ms = 1000 * summary.seconds / done if done else 0.0
    print(f"{done} image(s), {summary.num_detections} detection(s), {mean_ms:.0f} ms per image; "
          f"results in {Path(args.output_dir) / 'predictions.json'}")
    if summary.failed:
        names = ", ".join(Path(f["file_name"]).name for f in summary.failed[:5])
        more = " ..." if len(summary.failed) > 5 else ""
        print_error(f"{len(summary.failed)} of {len(paths)} image(s) could not be predicted: {names}{more} "
                    f"(the reasons are in {Path(args.output_dir) / 'images.json'})")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
