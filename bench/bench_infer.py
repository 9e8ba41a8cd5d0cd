"""Inference speed of ``predict.py``'s path against stock torchvision, lever by lever, on real-size images.

    python bench/bench_infer.py                                    # BioImLab val images, untrained weights
    python bench/bench_infer.py --weights-path runs/dacseg/best.pth --levers all
    python bench/bench_infer.py --model dacseg --onnx d.onnx       # also time an exported model

Ours runs ``train_utils.jobs.predict.predict_image`` (``inference.detect``: bounded pasting, masks thresholded), with
each set of levers in ``--levers``; stock runs ``torchvision.models.detection.maskrcnn_resnet50_fpn``'s own forward
with the same weights (our ``maskrcnn`` has stock's modules, so its state dict loads as it is; for ``dacseg``, stock
gets the Mask R-CNN part). Both keep exactly ``--detections`` detections per image (score threshold 0), so both
paste the same number of masks. Runs are interleaved image by image (ours, stock, ours, ...) after one untimed
round, and each configuration's time is the median over ``--repeats`` rounds of the mean seconds per image.

Each lever set is also compared with our plain float32 path on the same images: how many of the detections scoring
at least ``--score-thresh`` differ (no twin at mask IoU >= 0.5 on the other side), the lowest and median mask IoU of
the matched pairs, and how many of those stay below ``--min-iou``. With untrained weights (no ``--weights-path``)
the scores are noise and the check says little; give a trained checkpoint to judge it. Run by hand on an otherwise idle machine; never from CI or pytest.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from errors import DaCSegError, print_error  # noqa: E402
from my_dataset_chromosome import read_image  # noqa: E402
from network_files import ModelConfig, build_model  # noqa: E402
from tools.labelme2coco import convert_labelme  # noqa: E402
from train_utils.cli import ArgumentParser, expand_inputs, number_arg  # noqa: E402
from train_utils.engine.checkpoint import load_model_from_checkpoint  # noqa: E402
from train_utils.inference.detect import LEVERS, Speedups, apply_speedups  # noqa: E402
from train_utils.jobs.predict import predict_image  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bioimlab"
LEVER_SETS = {"fp32": (), "bf16": ("bf16",), "channels_last": ("channels_last",), "no_upscale": ("no_upscale",),
              "bf16+channels_last": ("bf16", "channels_last"), "all": LEVERS}


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def load_images(args) -> list[torch.Tensor]:
    """``--images`` inputs, or the first ``--num-images`` BioImLab val images (converted into a temporary folder)."""
    if args.images:
        paths = expand_inputs(args.images)
    else:
        work = Path(tempfile.mkdtemp(prefix="bench_infer_"))
        convert_labelme([args.data_path / "labelme" / "val"], work, split="val")
        paths = sorted((work / "images").iterdir())
    return [read_image(p) for p in paths[:args.num_images]]


def our_model(args) -> tuple[torch.nn.Module, ModelConfig]:
    if args.weights_path:
        model, config, _ = load_model_from_checkpoint(args.weights_path, "cpu")
        return model, config
    torch.manual_seed(0)
    config = ModelConfig(name=args.model, min_size=args.min_size, max_size=args.max_size,
                         overlap_cls_head=args.overlap_cls_head)
    return build_model(config).eval(), config


def stock_model(ours: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """torchvision's Mask R-CNN with our weights (the Mask R-CNN part of a DaCSeg model)."""
    stock = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=config.num_classes + 1, min_size=config.min_size,
        max_size=config.max_size)
    missing, _ = stock.load_state_dict(ours.state_dict(), strict=False)
    if config.backbone != "resnet50" or missing:
        raise SystemExit(f"bench_infer.py: error: stock torchvision is resnet50; this {config.backbone} model "
                         f"does not fit it ({len(missing)} missing tensors)")
    return stock.eval()


def keep_detections(model: torch.nn.Module, count: int) -> None:
    heads = model.roi_heads
    heads.score_thresh, heads.detections_per_img = 0.0, count


def run_stock(model: torch.nn.Module, image: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model([image])
    return time.perf_counter() - start


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _full_masks(masks) -> torch.Tensor:
    """``[N, 1, H, W]`` masks from our box-sized ``BoxMasks`` (``inference.detect``) or stock's full-size tensor."""
    return masks.full() if hasattr(masks, "full") else masks


def agreement(reference: dict, output: dict, score_thresh: float) -> tuple[int, int, list[float]]:
    """One image's two outputs: (detections scoring >= the threshold in the reference, how many of them have no twin
    in the output or the output has in excess, the mask IoU of each matched pair). Detections are matched greedily
    by mask IoU >= 0.5, best score first."""
    ref_masks = _full_masks(reference["masks"])[reference["scores"] >= score_thresh, 0]
    out_masks = list(_full_masks(output["masks"])[output["scores"] >= score_thresh, 0])
    ious, unmatched = [], 0
    for mask in ref_masks:
        scored = [(mask_iou(mask, other), k) for k, other in enumerate(out_masks)]
        best = max(scored, default=(0.0, -1))
        if best[0] >= 0.5:
            ious.append(best[0])
            out_masks.pop(best[1])
        else:
            unmatched += 1
    return len(ref_masks), unmatched + len(out_masks), ious


def time_levers(args, ours, config, images) -> tuple[dict[str, Timing], Timing, dict[str, tuple]]:
    """Per lever set: our seconds per image per round; stock's; and the agreement with our float32 outputs."""
    stock = stock_model(ours, config)
    for model in (ours, stock):
        keep_detections(model, args.detections)
    reference = [predict_image(ours, image, "cpu")[0] for image in images]
    timings, agreements = {}, {}
    stock_timing = Timing("stock", [])
    for name in args.levers:
        model = apply_speedups(ours, Speedups.from_names(LEVER_SETS[name]))
        for image in images[:1]:  # one untimed round of this configuration
            predict_image(model, image, "cpu")
        outputs, rounds = [], []
        for _ in range(args.repeats):
            ours_s, stock_s = [], []
            for image in images:
                output, seconds = predict_image(model, image, "cpu")
                ours_s.append(seconds)
                if len(outputs) < len(images):
                    outputs.append(output)
                stock_s.append(run_stock(stock, image))
            rounds.append(statistics.fmean(ours_s))
            stock_timing.seconds.append(statistics.fmean(stock_s))
        timings[name] = Timing(name, rounds)
        checks = [agreement(r, o, args.score_thresh) for r, o in zip(reference, outputs)]
        ious = sorted(iou for _, _, found in checks for iou in found)
        agreements[name] = (sum(n for n, _, _ in checks), sum(d for _, d, _ in checks), ious)
    return timings, stock_timing, agreements


def time_onnx(path: str, images: list[torch.Tensor], repeats: int) -> Timing:
    from train_utils.inference.exported import load_onnx_model

    detector, _, _ = load_onnx_model(path)
    detector([images[0]])
    rounds = []
    for _ in range(repeats):
        seconds = []
        for image in images:
            start = time.perf_counter()
            detector([image])
            seconds.append(time.perf_counter() - start)
        rounds.append(statistics.fmean(seconds))
    return Timing("onnx", rounds)


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-path", default=None, help="a trained checkpoint (default: untrained weights)")
    parser.add_argument("--model", choices=("maskrcnn", "dacseg"), default="maskrcnn",
                        help="model to build without --weights-path")
    parser.add_argument("--overlap-cls-head", choices=("fc", "conv"), default="fc")
    parser.add_argument("--min-size", type=number_arg(int, low=32), default=800)
    parser.add_argument("--max-size", type=number_arg(int, low=32), default=1333)
    parser.add_argument("--data-path", type=Path, default=DEFAULT_DATA, help="BioImLab root (default: %(default)s)")
    parser.add_argument("--images", nargs="*", default=None, help="image files or folders instead of BioImLab val")
    parser.add_argument("--num-images", type=number_arg(int, low=1), default=6)
    parser.add_argument("--detections", type=number_arg(int, low=1), default=50, help="kept per image")
    parser.add_argument("--repeats", type=number_arg(int, low=1), default=3)
    parser.add_argument("--levers", nargs="+", choices=sorted(LEVER_SETS), default=["fp32", "bf16"])
    parser.add_argument("--threads", type=number_arg(int, low=1), default=None)
    parser.add_argument("--score-thresh", type=number_arg(float, 0.0, 1.0), default=0.5)
    parser.add_argument("--min-iou", type=number_arg(float, 0.0, 1.0), default=0.98)
    parser.add_argument("--onnx", default=None, metavar="FILE", help="also time this exported model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        images = load_images(args)
        ours, config = our_model(args)
    except DaCSegError as exc:
        print_error(exc, "bench_infer.py")
        return 2
    size = "x".join(map(str, images[0].shape[:0:-1]))
    weights = f"weights from {args.weights_path}" if args.weights_path else "untrained"
    print(f"# bench_infer: {config.name} ({config.backbone}, {weights}), "
          f"{len(images)} image(s) of {size}, min-size {config.min_size}, {args.detections} detections kept, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    timings, stock, agreements = time_levers(args, ours, config, images)
    base = stock.median
    print(f"| ours | s/image | stock s/image | ours / stock | detections >= {args.score_thresh:g} differing "
          f"| matched mask IoU: lowest, median | below {args.min_iou:g} |")
    print("|---|---|---|---|---|---|---|")
    for name, timing in timings.items():
        count, differing, ious = agreements[name]
        low, median = (ious[0], statistics.median(ious)) if ious else (float("nan"), float("nan"))
        below = sum(iou < args.min_iou for iou in ious)
        print(f"| {name} | {timing.median:.3f} | {base:.3f} | {timing.median / base:.2f} | {differing} of {count} | "
              f"{low:.3f}, {median:.3f} | {below} |")
    if args.onnx:
        onnx = time_onnx(args.onnx, images, args.repeats)
        print(f"| onnxruntime {args.onnx} | {onnx.median:.3f} | {base:.3f} | {onnx.median / base:.2f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
