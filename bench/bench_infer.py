"""Inference speed of ``predict.py``'s path against stock torchvision, lever by lever, on real-size images.

    python bench/bench_infer.py                                    # BioImLab val images, untrained weights
    python bench/bench_infer.py --weights-path runs/dacseg/best.pth --levers all
    python bench/bench_infer.py --model dacseg --onnx d.onnx       # also time an exported model
    python bench/bench_infer.py --weights-path best.pth --levers channels_last --compile --rpn-proposals 500 300 \
        --onnx m.onnx --openvino m.xml --openvino-static
    python bench/bench_infer.py --weights-path best.pth --folder 100              # a folder end to end instead

Ours runs ``train_utils.jobs.predict.predict_image`` (``inference.detect``: bounded pasting, masks thresholded), with
each set of levers in ``--levers``; stock runs ``torchvision.models.detection.maskrcnn_resnet50_fpn``'s own forward
with the same weights (our ``maskrcnn`` has stock's modules, so its state dict loads as it is; for ``dacseg``, stock
gets the Mask R-CNN part; a ``maskrcnn`` on another backbone is torchvision's ``MaskRCNN`` already, and stock is a
copy of it run by torchvision's own forward). Both keep exactly ``--detections`` detections per image (score
threshold 0), so both paste the same number of masks. Runs are interleaved image by image (ours, stock, ours, ...)
after one untimed call per input size (the first-call column also gives each configuration's setup: OpenVINO's
conversion, for instance), and each configuration's time is the median over ``--repeats`` rounds of the
mean seconds per image.

Each configuration is also compared with our plain float32 path on the same images: how many of the detections
scoring at least ``--score-thresh`` differ (no twin at mask IoU >= 0.5 on the other side), the lowest and median mask
IoU of the matched pairs, and how many of those stay below ``--min-iou``; on BioImLab val, also segm AP and recall
(IoU 0.5, score >= ``--score-thresh``) against the ground truth of the timed images. With untrained weights (no
``--weights-path``) the scores are noise and the check says little; give a trained checkpoint to judge it.

More configurations: ``--compile`` (``torch.compile`` of the backbone and FPN with inductor and freezing, on top of
channels-last; the untimed first call per input size pays the compilation and is printed); ``--rpn-proposals N ...``
(the RPN's test-time proposals kept before and after NMS, 1000 by default; channels-last, and with the ``openvino``
lever in ``--levers`` also on OpenVINO); ``--onnx FILE`` (the
exported model under onnxruntime, with onnxruntime's own session options and with ours,
``inference.exported.OrtOptions``); ``--openvino FILE`` (an ``.xml`` from ``tools/export.py --format openvino``, or
the ``.onnx`` itself) compiled in float32 for any size, and with ``--openvino-static`` also once per input size. An
exported graph keeps the checkpoint's own detection limit, not ``--detections``. A configuration that fails (a
compilation, a conversion) prints one line and the run goes on without it.

``--folder N`` measures a whole folder instead: N image files (the inputs repeated, copied into a temporary folder)
go end to end (reading, inference, overlay PNG, COCO JSON; crops and exports off) through ``predict_files`` with
``predict.py``'s CPU defaults (channels-last, the next image read and the last one's files written on threads while
one is predicted), and through the plain loop over stock: ``torchvision.io.read_image``, the stock forward, an
overlay by ``draw_segmentation_masks`` and ``draw_bounding_boxes`` saved as PNG, and one JSON of results with
pycocotools RLE. Both keep at most ``--detections`` detections scoring at least ``--score-thresh``. After one
untimed image each, the two alternate for ``--repeats`` rounds; each prints the median images/s by the wall clock
and the detections it wrote, then the ratio ours / stock. The load average is printed at the start and the end.
Run by hand, on an otherwise idle machine; never from CI or pytest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from errors import DaCSegError, one_line, print_error  # noqa: E402
from my_dataset_chromosome import read_image  # noqa: E402
from network_files import ModelConfig, build_model  # noqa: E402
from tools.labelme2coco import convert_labelme  # noqa: E402
from train_utils.cli import ArgumentParser, expand_inputs, number_arg  # noqa: E402
from train_utils.engine.checkpoint import load_model_from_checkpoint  # noqa: E402
from train_utils.evaluation.coco_eval import evaluate_results  # noqa: E402
from train_utils.inference.detect import Speedups, apply_speedups, default_speedups, prepare_model  # noqa: E402
from train_utils.inference.exported import OnnxDetector, OpenVinoDetector, OrtOptions  # noqa: E402
from train_utils.jobs.predict import PredictOptions, label_maps, predict_files, predict_image  # noqa: E402
from train_utils.outputs.predictions import outputs_to_coco_results  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bioimlab"
LEVER_SETS = {"fp32": (), "bf16": ("bf16",), "channels_last": ("channels_last",), "no_upscale": ("no_upscale",),
              "bf16+channels_last": ("bf16", "channels_last"), "openvino": ("openvino",),
              "all": ("bf16", "channels_last", "no_upscale")}
Runner = Callable[[torch.Tensor], tuple[dict[str, Any], float]]  # one image -> (our outputs, seconds)


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def load_images(args) -> tuple[list[Path], list[torch.Tensor], Any]:
    """``--images`` inputs, or the first ``--num-images`` BioImLab val images (converted into a temporary folder):
    their files, the images, and their ground truth (a pycocotools ``COCO``; None for ``--images``)."""
    if args.images:
        paths = expand_inputs(args.images)[:args.num_images]
        return paths, [read_image(p) for p in paths], None
    from pycocotools.coco import COCO

    work = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    convert_labelme([args.data_path / "labelme" / "val"], work, split="val")
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        coco = COCO(str(work / "annotations" / "instances_val.json"))
    infos = sorted(coco.dataset["images"], key=lambda info: info["file_name"])[:args.num_images]
    coco.bench_ids = [info["id"] for info in infos]
    paths = [work / "images" / info["file_name"] for info in infos]
    return paths, [read_image(p) for p in paths], coco


def our_model(args) -> tuple[torch.nn.Module, ModelConfig]:
    """The checkpoint's model (at ``--min-size``/``--max-size`` where given, else its own size range), or an
    untrained one."""
    if args.weights_path:
        model, config, _ = load_model_from_checkpoint(args.weights_path, "cpu")
        sizes = {"min_size": args.min_size or config.min_size, "max_size": args.max_size or config.max_size}
        config = dataclasses.replace(config, **sizes)
        model.transform.min_size, model.transform.max_size = (config.min_size,), config.max_size
        return model, config
    torch.manual_seed(0)
    try:
        config = ModelConfig(name=args.model, min_size=args.min_size or 800, max_size=args.max_size or 1333,
                             overlap_cls_head=args.overlap_cls_head, shape_prior=args.shape_prior)
    except ValueError as exc:
        raise SystemExit(f"bench_infer.py: error: {exc}") from None
    return build_model(config).eval(), config


def stock_model(ours: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """torchvision's Mask R-CNN with our weights (the Mask R-CNN part of a DaCSeg model); a copy of a ``maskrcnn`` on
    another backbone, which is torchvision's ``MaskRCNN`` already."""
    if config.name == "maskrcnn" and config.backbone != "resnet50":
        import copy

        return apply_speedups(copy.deepcopy(ours), Speedups()).eval()
    stock = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=config.num_classes + 1, min_size=config.min_size,
        max_size=config.max_size)
    missing, _ = stock.load_state_dict(ours.state_dict(), strict=False)
    if config.backbone != "resnet50" or missing:
        raise SystemExit(f"bench_infer.py: error: stock torchvision is resnet50; this {config.backbone} model "
                         f"does not fit it ({len(missing)} missing tensors)")
    return stock.eval()


def keep_detections(model: torch.nn.Module, count: int, score_thresh: float = 0.0) -> None:
    heads = model.roi_heads
    heads.score_thresh, heads.detections_per_img = score_thresh, count


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


@contextlib.contextmanager
def lever_runner(ours: torch.nn.Module, names: tuple[str, ...]) -> Iterator[Runner]:
    """``predict_image`` with the levers ``names``; RuntimeError where openvino is asked for and does not run."""
    apply_speedups(ours, Speedups.from_names(names))
    if "openvino" in names and not ours.speedups.openvino:
        raise RuntimeError("OpenVINO does not run this model here (the line above says why)")
    try:
        yield lambda image: predict_image(ours, image, "cpu")
    finally:
        apply_speedups(ours, Speedups())


@contextlib.contextmanager
def rpn_runner(ours: torch.nn.Module, proposals: int, levers: tuple[str, ...] = ("channels_last",)
               ) -> Iterator[Runner]:
    """``levers`` (predict's CPU default, channels-last) with ``proposals`` RPN proposals kept before and after NMS
    at test time."""
    rpn = ours.rpn
    saved = rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"]
    rpn._pre_nms_top_n["testing"] = rpn._post_nms_top_n["testing"] = proposals
    try:
        with lever_runner(ours, levers) as run:
            yield run
    finally:
        rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = saved


@contextlib.contextmanager
def compile_runner(ours: torch.nn.Module) -> Iterator[Runner]:
    """Channels-last with the backbone and FPN compiled by inductor with freezing (weights folded in as constants),
    one graph per input size (``dynamic=False``)."""
    import torch._inductor.config as inductor_config

    saved_backbone, saved_freezing = ours.backbone, inductor_config.freezing
    inductor_config.freezing = True
    ours.backbone = torch.compile(saved_backbone, backend="inductor", dynamic=False)
    try:
        with lever_runner(ours, ("channels_last",)) as run:
            yield run
    finally:
        ours.backbone, inductor_config.freezing = saved_backbone, saved_freezing


@contextlib.contextmanager
def exported_runner(make: Callable[[], Any], config: ModelConfig) -> Iterator[Runner]:
    detector = make()
    prepare_model(detector, config, 0.0)
    yield lambda image: predict_image(detector, image, "cpu")


def configurations(args, ours: torch.nn.Module, config: ModelConfig
                   ) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    """Name -> a function that sets one configuration up, as a context manager yielding its runner."""
    found: dict[str, Callable] = {name: (lambda n=name: lever_runner(ours, LEVER_SETS[n]))
                                  for name in args.levers or ("fp32", "bf16")}
    if args.compile:
        found["compile (inductor, freezing)"] = lambda: compile_runner(ours)
    for count in args.rpn_proposals:
        found[f"rpn {count} proposals"] = lambda n=count: rpn_runner(ours, n)
        if "openvino" in (args.levers or ()):
            found[f"openvino, rpn {count} proposals"] = lambda n=count: rpn_runner(ours, n, ("openvino",))
    threads = torch.get_num_threads()
    if args.onnx:
        found["onnxruntime, its own options"] = lambda: exported_runner(
            lambda: OnnxDetector(args.onnx, threads, OrtOptions(spinning=True)), config)
        found["onnxruntime, OrtOptions()"] = lambda: exported_runner(lambda: OnnxDetector(args.onnx, threads), config)
    if args.openvino:
        found["openvino f32, any size"] = lambda: exported_runner(lambda: OpenVinoDetector(args.openvino, threads),
                                                                  config)
        if args.openvino_static:
            found["openvino f32, a shape per size"] = lambda: exported_runner(
                lambda: OpenVinoDetector(args.openvino, threads, static_shapes=True), config)
    return found


def segm_scores(outputs: list[dict], coco: Any, score_thresh: float) -> str:
    """segm AP and recall at IoU 0.5 (score >= ``score_thresh``) against BioImLab's ground truth ("" without)."""
    if coco is None:
        return ""
    results = outputs_to_coco_results(outputs, coco.bench_ids, {1: 1})
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        record = evaluate_results(coco, results, score_thresh, image_ids=coco.bench_ids)
    return f"{record['segm']['AP']:.3f}, {record['recall']:.3f}"


def time_configurations(args, ours, config, images, coco) -> tuple[list[tuple], Timing]:
    """Per configuration, interleaved image by image with stock: (name, its Timing, the agreement with our float32
    outputs, segm AP and recall, the first call's seconds per input size); and stock's Timing."""
    stock = stock_model(ours, config)
    for model in (ours, stock):
        keep_detections(model, args.detections)
    reference = [predict_image(ours, image, "cpu")[0] for image in images]
    rows, stock_timing = [], Timing("stock", [])
    for name, setup in configurations(args, ours, config).items():
        try:
            start = time.perf_counter()
            with setup() as run:
                first_calls = {"setup": time.perf_counter() - start}  # converting, for openvino
                for image in images:  # one untimed call per input size (where it compiles, the compilation)
                    size = "x".join(map(str, image.shape[:0:-1]))
                    if size not in first_calls:
                        start = time.perf_counter()
                        run(image)
                        first_calls[size] = time.perf_counter() - start
                outputs, rounds = [], []
                for _ in range(args.repeats):
                    ours_s, stock_s = [], []
                    for image in images:
                        output, seconds = run(image)
                        ours_s.append(seconds)
                        if len(outputs) < len(images):
                            outputs.append(output)
                        stock_s.append(run_stock(stock, image))
                    rounds.append(statistics.fmean(ours_s))
                    stock_timing.seconds.append(statistics.fmean(stock_s))
        except Exception as exc:  # a configuration that cannot run here (compile, convert): one line, then the rest
            print(f"# {name}: failed, left out ({type(exc).__name__}: {one_line(exc)[:300]})", flush=True)
            continue
        checks = [agreement(r, o, args.score_thresh) for r, o in zip(reference, outputs)]
        ious = sorted(iou for _, _, found in checks for iou in found)
        agreed = (sum(n for n, _, _ in checks), sum(d for _, d, _ in checks), ious)
        rows.append((name, Timing(name, rounds), agreed, segm_scores(outputs, coco, args.score_thresh), first_calls))
        print(f"# {name}: {Timing(name, rounds).median:.3f} s/image, first calls {first_calls}", flush=True)
    return rows, stock_timing


def _stage_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The stages of a torchvision ``GeneralizedRCNN`` that ``--profile`` times: its resize, backbone (ResNet and
    FPN) and RPN, and each module of its RoI heads (box branch, mask branch, DaCSeg's overlap modules)."""
    stages = {"transform": model.transform, "backbone": model.backbone, "rpn": model.rpn}
    stages.update({f"roi_heads.{name}": child for name, child in model.roi_heads.named_children()})
    return stages


def stage_profile(model: torch.nn.Module, images: list[torch.Tensor], repeats: int = 1
                  ) -> list[tuple[str, float, float]]:
    """Where our path spends an image: per stage (``_stage_modules``; ``roi_heads, the rest`` is box decoding and
    NMS between the RoI heads' modules; ``pasting and the rest`` what ``detect`` does after the model), the mean
    over images and ``repeats`` rounds of its seconds (means, so the stages add up to the total), and its GFLOP per image (``torch.utils.flop_counter``, two
    per multiply-add), as (stage, seconds, GFLOP) rows with the total last."""
    from torch.utils.flop_counter import FlopCounterMode

    stages = _stage_modules(model)
    spent: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name, module in [*stages.items(), ("roi_heads", model.roi_heads)]:
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: started.__setitem__(n, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda *_, n=name: spent.__setitem__(n, spent.get(n, 0.0) + time.perf_counter() - started[n])))
    per_image: dict[str, list[float]] = {}
    try:
        for _ in range(repeats):
            for image in images:
                spent.clear()
                _, seconds = predict_image(model, image, "cpu")
                inner = {name: spent.get(name, 0.0) for name in stages}
                heads = spent.get("roi_heads", 0.0)
                inner["roi_heads, the rest"] = heads - sum(v for k, v in inner.items() if k.startswith("roi_heads."))
                inner["pasting and the rest"] = seconds - sum(spent.get(k, 0.0) for k in
                                                              ("transform", "backbone", "rpn", "roi_heads"))
                inner["total"] = seconds
                for name, value in inner.items():
                    per_image.setdefault(name, []).append(value)
    finally:
        for handle in handles:
            handle.remove()
    with FlopCounterMode(display=False) as counter:
        predict_image(model, images[0], "cpu")
    counts = counter.get_flop_counts()  # keyed by module path from the class of each module detect calls
    heads = type(model.roi_heads).__name__

    def gflop(name: str) -> float:
        key = {"total": "Global"}.get(name) or (f"{heads}.{name.split('.', 1)[1]}" if name.startswith("roi_heads.")
                                                else type(stages[name]).__name__)
        if key not in counts and name in ("total", "backbone"):  # these always count work; a missing key is a bug
            raise KeyError(f"FlopCounterMode counted no {key!r}; it counted {sorted(counts)}")
        return sum(counts.get(key, {}).values()) / 1e9

    return [(name, statistics.fmean(values), gflop(name) if "the rest" not in name else float("nan"))
            for name, values in per_image.items()]


def float32_rate(seconds: float = 2.0) -> dict[str, float]:
    """The machine's measured float32 GFLOP/s at the current thread count: a 2048x2048 matmul and a 3x3 256-channel
    convolution at a 1/8-scale feature map of a 1067x800 input (channels-last), each the best of repeated runs
    within about ``seconds``."""
    def best(fn: Callable[[], Any], flop: float) -> float:
        fn()
        times, deadline = [], time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline or len(times) < 3:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return flop / min(times) / 1e9

    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 256, 100, 136).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return {"matmul": best(lambda: a @ b, 2 * 2048 ** 3),
                "conv3x3": best(lambda: conv(x), 2 * 256 * 256 * 9 * 100 * 136)}


def print_profile(args, ours: torch.nn.Module, config: ModelConfig, images: list[torch.Tensor]) -> None:
    """``--profile``: the stage table of our path at predict's CPU default (``default_speedups``), with each stage's
    rate, the machine's float32 rates, and the time the counted work would take at the best of them."""
    keep_detections(ours, args.detections)
    default = default_speedups(config, on_cpu=True)
    apply_speedups(ours, default)
    predict_image(ours, images[0], "cpu")  # untimed
    rows = stage_profile(ours, images, args.repeats)
    rates = float32_rate()
    layout = "channels-last" if default.channels_last else "float32"
    print(f"| stage ({layout}, {args.detections} detections) | s/image | share | GFLOP/image | GFLOP/s |")
    print("|---|---|---|---|---|")
    total_s, total_gflop = rows[-1][1], rows[-1][2]
    for name, seconds, gflop in rows:
        rate = f"{gflop / seconds:.0f}" if gflop == gflop and seconds > 0 and gflop > 0 else "-"
        work = f"{gflop:.1f}" if gflop == gflop else "-"
        print(f"| {name} | {seconds:.3f} | {seconds / total_s:.0%} | {work} | {rate} |")
    peak = max(rates.values())
    print(f"# float32 rate here: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
          + f"; the {total_gflop:.1f} GFLOP of an image take at least {total_gflop / peak:.3f} s at {peak:.0f} GFLOP/s")


def stock_folder(model: torch.nn.Module, files: list[Path], out_dir: Path) -> int:
    """The plain loop over stock torchvision for ``--folder``: read, forward, overlay PNG, then the results as COCO
    JSON with pycocotools RLE; returns the number of detections written."""
    from pycocotools import mask as mask_util

    out_dir.mkdir()
    results = []
    for image_id, path in enumerate(files, start=1):
        image = torchvision.io.read_image(str(path), torchvision.io.ImageReadMode.RGB)
        with torch.inference_mode():
            output = model([image.float() / 255])[0]
        masks = output["masks"][:, 0] > 0.5
        scores = output["scores"].tolist()
        picture = torchvision.utils.draw_segmentation_masks(image, masks, alpha=0.5)
        picture = torchvision.utils.draw_bounding_boxes(picture, output["boxes"], [f"{s:.2f}" for s in scores])
        torchvision.transforms.functional.to_pil_image(picture).save(out_dir / f"{path.stem}_pred.png")
        rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
        for (x0, y0, x1, y1), label, score, rle in zip(output["boxes"].tolist(), output["labels"].tolist(), scores,
                                                       rles):
            results.append({"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    (out_dir / "predictions.json").write_text(json.dumps(results))
    return len(results)


def our_folder(model: torch.nn.Module, config: ModelConfig, files: list[Path], out_dir: Path,
               speedups: Speedups) -> int:
    """``predict_files`` for ``--folder`` with ``speedups`` (its per-image lines silenced); returns the number of
    detections written."""
    names, to_cat = label_maps({}, config)
    apply_speedups(model, speedups)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return predict_files(model, files, out_dir, names, to_cat, "cpu", PredictOptions()).num_detections


def folder_throughput(args, ours: torch.nn.Module, config: ModelConfig, paths: list[Path]) -> None:
    """``--folder N``: images/s of ``predict_files`` (predict.py's CPU default, ``default_speedups``, and each lever set in
    ``--levers``, on top of it) and of the stock loop over the same N files, alternated."""
    stock = stock_model(ours, config)
    for model in (ours, stock):
        keep_detections(model, args.detections, args.score_thresh)
    default = default_speedups(config, on_cpu=True)
    runs = {"ours (predict_files)": lambda files, out: our_folder(ours, config, files, out, default)}
    for name in args.levers or ():
        levers = dataclasses.replace(default, **{lever: True for lever in LEVER_SETS[name]})
        runs[f"ours (predict_files, {name})"] = lambda files, out, s=levers: our_folder(ours, config, files, out, s)
    runs["stock loop"] = lambda files, out: stock_folder(stock, files, out)
    with tempfile.TemporaryDirectory(prefix="bench_folder_") as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        files = [work / "in" / f"{k:04d}_{paths[k % len(paths)].name}" for k in range(args.folder)]
        for k, file in enumerate(files):
            shutil.copyfile(paths[k % len(paths)], file)
        for name, run in runs.items():  # one untimed image each
            run(files[:1], work / "warm")
            shutil.rmtree(work / "warm")
        rates: dict[str, list[float]] = {name: [] for name in runs}
        found: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                found[name] = run(files, work / "out")
                rates[name].append(len(files) / (time.perf_counter() - start))
                shutil.rmtree(work / "out")
    print(f"| folder of {args.folder} images | images/s | detections written |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | {statistics.median(rates[name]):.3f} | {found[name]} |")
    stock_rate = statistics.median(rates["stock loop"])
    for name in runs:
        if name != "stock loop":
            print(f"# {name} / stock: {statistics.median(rates[name]) / stock_rate:.2f}x images/s")


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-path", default=None, help="a trained checkpoint (default: untrained weights)")
    parser.add_argument("--model", choices=("maskrcnn", "dacseg"), default="maskrcnn",
                        help="model to build without --weights-path")
    parser.add_argument("--overlap-cls-head", choices=("fc", "conv"), default="fc")
    parser.add_argument("--shape-prior", default=None, metavar="CODEBOOK",
                        help="with --model dacseg and untrained weights: add the shape prior of this codebook")
    parser.add_argument("--min-size", type=number_arg(int, low=32), default=None,
                        help="default: the checkpoint's, or 800 for untrained weights")
    parser.add_argument("--max-size", type=number_arg(int, low=32), default=None,
                        help="default: the checkpoint's, or 1333 for untrained weights")
    parser.add_argument("--data-path", type=Path, default=DEFAULT_DATA, help="BioImLab root (default: %(default)s)")
    parser.add_argument("--images", nargs="*", default=None, help="image files or folders instead of BioImLab val")
    parser.add_argument("--num-images", type=number_arg(int, low=1), default=6)
    parser.add_argument("--detections", type=number_arg(int, low=1), default=50, help="kept per image")
    parser.add_argument("--repeats", type=number_arg(int, low=1), default=3)
    parser.add_argument("--levers", nargs="+", choices=sorted(LEVER_SETS), default=None,
                        help="lever sets to time (default: fp32 bf16; with --folder, none besides predict's default)")
    parser.add_argument("--threads", type=number_arg(int, low=1), default=None)
    parser.add_argument("--score-thresh", type=number_arg(float, 0.0, 1.0), default=0.5)
    parser.add_argument("--min-iou", type=number_arg(float, 0.0, 1.0), default=0.98)
    parser.add_argument("--onnx", default=None, metavar="FILE", help="also time this exported model (onnxruntime)")
    parser.add_argument("--openvino", default=None, metavar="FILE",
                        help="also time this model (.xml or .onnx) under OpenVINO in float32")
    parser.add_argument("--openvino-static", action="store_true",
                        help="with --openvino: also compiled once per input size")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the backbone and FPN")
    parser.add_argument("--rpn-proposals", nargs="*", type=number_arg(int, low=1), default=[], metavar="N",
                        help="also time these test-time RPN proposal counts (default 1000)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: where our path spends an image, stage by stage, against the float32 rate")
    parser.add_argument("--folder", type=number_arg(int, low=1), default=None, metavar="N",
                        help="instead: N image files end to end, predict_files against a stock loop (images/s)")
    return parser


def load_text() -> str:
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def backend_versions() -> str:
    """The versions of the optional runtimes installed."""
    import importlib.metadata

    found = []
    for package in ("onnxruntime", "openvino"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{package} {importlib.metadata.version(package)}")
    return ", ".join(found) or "no exported-model runtime"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths, images, coco = load_images(args)
        ours, config = our_model(args)
    except DaCSegError as exc:
        print_error(exc, "bench_infer.py")
        return 2
    size = "x".join(map(str, images[0].shape[:0:-1]))
    weights = f"weights from {args.weights_path}" if args.weights_path else "untrained"
    kept = f"<= {args.detections} detections scoring >= {args.score_thresh:g}" if args.folder else \
        f"{args.detections} detections kept"
    print(f"# bench_infer: {config.name} ({config.backbone}, {weights}), {len(images)} image(s) of {size}, "
          f"min-size {config.min_size}, {kept}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {backend_versions()}; load average {load_text()}", flush=True)
    if args.profile:
        print_profile(args, ours, config, images)
        print(f"# load average at the end: {load_text()}")
        return 0
    if args.folder:
        folder_throughput(args, ours, config, paths)
        print(f"# load average at the end: {load_text()}")
        return 0
    rows, stock = time_configurations(args, ours, config, images, coco)
    base = stock.median
    print(f"| ours | s/image | stock s/image | ours / stock | detections >= {args.score_thresh:g} differing "
          f"| matched mask IoU: lowest, median | below {args.min_iou:g} | segm AP, recall | first call s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, timing, (count, differing, ious), scores, first_calls in rows:
        low, median = (ious[0], statistics.median(ious)) if ious else (float("nan"), float("nan"))
        below = sum(iou < args.min_iou for iou in ious)
        firsts = ", ".join(f"{size}: {seconds:.1f}" for size, seconds in first_calls.items())
        print(f"| {name} | {timing.median:.3f} | {base:.3f} | {timing.median / base:.2f} | {differing} of {count} | "
              f"{low:.3f}, {median:.3f} | {below} | {scores} | {firsts} |")
    print(f"# load average at the end: {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
