"""Training and inference throughput of our Mask R-CNN / DaCSeg, against the reference and against stock torchvision.

Measures, for one model (or ours and stock torchvision's with ``--compare-stock``):

* training: ``--steps`` steps of the real training step (``train_utils.engine.loop.train_one_epoch``, AMP with a gradient
  scaler, SGD with train.py's lr warmup) after ``--warmup-steps`` untimed ones, fed by the training
  DataLoader of ``train.py`` (aspect-ratio grouping sampler, ``collate_fn``, the ``flip`` augmentation, ``-j``
  worker processes; a new pass over the data starts when one runs out, workers restarting as in training).
  Prints steps/s, images/s, the share of the time spent waiting for the next batch (data loading the step did not
  hide), the peak GPU memory on CUDA, and images/s relative to the reference;
* inference: ``model.eval()`` without gradients over the val split (``--synthetic``: over the N synthetic images)
  through ``train_utils.evaluation.score.iter_predictions`` (outputs copied to the CPU, as evaluation does), with batch 1
  and batch 4, after a few untimed batches. It also prints the detections per image: pasting the masks of each
  detection is a good part of inference, and a barely trained model keeps up to 100 low-scoring ones.

Reference: stock torchvision ``maskrcnn_resnet50_fpn`` trained from scratch on the 109 BioImLab train images
(768x576) with AMP, batch 4, SGD lr 0.02 and a cosine schedule ran 121 epochs in 6.5 minutes on one H100:
109 * 121 / 390 s = 33.8 training images/s. ``--model stock`` (or ``--compare-stock``) measures that model on this
machine with this script, so ours / stock separates our code from the machine. The reference is a whole run's
wall time (per-epoch evaluation included, if it had any) while this script times training steps only, so the ratio
to 33.8 img/s flatters both models a little; ours / stock does not.

On a GPU machine with the real data (converted outside the repository):

    python tools/labelme2coco.py ../shared/data/bioimlab/labelme/train --out data/bioimlab --split train
    python tools/labelme2coco.py ../shared/data/bioimlab/labelme/val --out data/bioimlab --split val
    python bench/bench_train.py --data-path data/bioimlab --model maskrcnn --compare-stock
    python bench/bench_train.py --data-path data/bioimlab --model dacseg --overlap-cls-head conv --compare-stock

Without the real data, ``--synthetic 109`` renders 109 synthetic 768x576 spreads into a temporary folder first.
A CPU smoke run: ``--synthetic 4 --steps 3 --warmup-steps 1 --min-size 256 --max-size 320 -b 2 --device cpu``.

Training speed depends a little on how far training is: an untrained RPN yields fewer positive proposals, so the
mask head has less to do in the first steps than later. Run by hand; never from CI or pytest.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from my_dataset_chromosome import ChromosomeDataset  # noqa: E402
from network_files.config import MODEL_NAMES, OVERLAP_CLS_HEADS  # noqa: E402
from tools.synth_metaphase import SynthConfig, generate  # noqa: E402
from network_files import build_model  # noqa: E402
from train_utils.data.loaders import collate_fn, training_loader  # noqa: E402
from train_utils.engine import loop, schedule  # noqa: E402
from train_utils.evaluation import score  # noqa: E402
from errors import DaCSegError, UserError, print_error  # noqa: E402
from train_utils.cli import ArgumentParser, add_data_args, add_device_args, number_arg, parse_args  # noqa: E402
from train_utils.engine.setup import (  # noqa: E402
    fresh_model_config,
    make_optimizer,
    resolve_optimization,
    seed_everything,
)
from transforms import get_transform  # noqa: E402

REFERENCE_IMAGES_PER_S = 109 * 121 / 390  # stock Mask R-CNN, BioImLab train, AMP, batch 4, one H100: 33.8
INFERENCE_BATCH_SIZES = (1, 4)
STOCK = "stock"
GIB = 1024 ** 3

# torch.backends.cudnn.benchmark is deliberately left off: Mask R-CNN's RoI counts (and so the head input shapes)
# change every step, and cuDNN's autotuner re-benchmarks each new shape, which made training 4-7x slower.


@dataclass
class TrainResult:
    steps: int
    images: int
    seconds: float
    data_wait_s: float
    peak_gib: float | None
    loss: float


@dataclass
class InferenceResult:
    batch_size: int
    images: int
    detections: int
    seconds: float
    peak_gib: float | None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


class TimedBatches:
    """``warmup + steps`` batches of a training loader (a new pass, with the next sampler epoch, when one runs out),
    timing the last ``steps``: wall time from the CUDA-synchronised end of the warm-up to the synchronised end of
    the last step (the engine asks for the next batch only when a step is done), the time spent waiting for
    batches, and the images seen."""

    def __init__(self, loader: DataLoader, warmup: int, steps: int, device: torch.device) -> None:
        self.loader, self.warmup, self.steps, self.device = loader, warmup, steps, device
        self.images = 0
        self.data_wait_s = 0.0
        self.seconds: float | None = None

    def __len__(self) -> int:
        return self.warmup + self.steps

    def __iter__(self) -> Iterator[Any]:
        epoch = 0
        self.loader.batch_sampler.set_epoch(epoch)
        batches = iter(self.loader)
        start = 0.0
        for index in range(len(self)):
            if index == self.warmup:
                _synchronize(self.device)
                _reset_peak_memory(self.device)
                start = time.perf_counter()
            fetch_start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                epoch += 1
                self.loader.batch_sampler.set_epoch(epoch)
                batches = iter(self.loader)
                batch = next(batches)
            if index >= self.warmup:
                self.data_wait_s += time.perf_counter() - fetch_start
                self.images += len(batch[0])
            yield batch
        _synchronize(self.device)
        self.seconds = time.perf_counter() - start


def training_args(args: argparse.Namespace, model_name: str, data_path: Path) -> argparse.Namespace:
    """``train.py``'s flags for a training run of ``model_name`` with this benchmark's settings (lr, momentum,
    weight decay, warmup, augmentation, aspect-ratio grouping, AMP: all train.py's defaults), resolved by the
    engine's builders as a run resolves them."""
    argv = ["--data-path", str(data_path), "--device", args.device, "--model", model_name,
            "-b", str(args.batch_size), "--min-size", str(args.min_size), "--max-size", str(args.max_size),
            "--overlap-cls-head", args.overlap_cls_head, "--workers", str(args.workers), "--seed", str(args.seed)]
    if args.amp is not None:
        argv.append("--amp" if args.amp else "--no-amp")
    return parse_args(argv, prog="bench_train.py")


def make_model(name: str, train_args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """Our model as ``train.py`` builds it from scratch, or stock torchvision's ``maskrcnn_resnet50_fpn``."""
    if name == STOCK:
        return torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=num_classes + 1,
            min_size=train_args.min_size, max_size=train_args.max_size,
        )
    return build_model(fresh_model_config(train_args, num_classes))


def measure_training(model: torch.nn.Module, train_args: argparse.Namespace, dataset: ChromosomeDataset,
                     device: torch.device, warmup: int, steps: int) -> TrainResult:
    """Time ``steps`` steps of ``loop.train_one_epoch`` after ``warmup`` untimed ones."""
    loader = training_loader(dataset, dataset.aspect_ratios(), batch_size=train_args.batch_size,
                             group_factor=train_args.aspect_ratio_group_factor, workers=train_args.workers,
                             seed=train_args.seed, device=device)
    optimization, settings, _ = resolve_optimization(train_args, None, len(dataset), world_size=1)
    optimizer = make_optimizer(model, optimization)
    # train.py's schedule laid over the timed steps; the warmup stays the run's 300 steps, so this short run stays
    # near its start: ramping to lr 0.02 within a few steps makes a model trained from scratch diverge (a
    # non-finite loss would end the benchmark), and the lr hardly changes the work a step does
    over_timed = dataclasses.replace(settings, steps_per_epoch=warmup + steps)
    if train_args.warmup_iters is None:
        over_timed = dataclasses.replace(over_timed,
                                         warmup_iters=schedule.default_warmup_iters(over_timed.total_steps))
    lr_scheduler = schedule.make_schedule(optimizer, over_timed)
    amp_dtype = loop.resolve_amp(train_args.amp, train_args.amp_dtype, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    batches = TimedBatches(loader, warmup, steps, device)
    seed_everything(train_args.seed, 1, 0)
    stats = loop.train_one_epoch(
        model, optimizer, batches, device, 0, lr_scheduler=lr_scheduler, scaler=scaler, amp_dtype=amp_dtype,
        clip_grad_norm=optimization.clip_grad_norm,
        print_freq=train_args.print_freq, show_progress=False,
    )
    return TrainResult(steps, batches.images, batches.seconds, batches.data_wait_s, _peak_gib(device), stats["loss"])


def measure_inference(model: torch.nn.Module, dataset: ChromosomeDataset, batch_size: int, device: torch.device,
                      amp_dtype: torch.dtype | None, workers: int, warmup: int) -> InferenceResult:
    """Time one pass of ``score.iter_predictions`` over ``dataset`` after ``warmup`` untimed batches."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_fn, pin_memory=device.type == "cuda")
    for index, _ in enumerate(score.iter_predictions(model, loader, device, amp_dtype)):
        if index + 1 >= warmup:
            break
    _synchronize(device)
    _reset_peak_memory(device)
    start = time.perf_counter()
    images = detections = 0
    for outputs, ids in score.iter_predictions(model, loader, device, amp_dtype):
        images += len(ids)
        detections += sum(len(output["scores"]) for output in outputs)
    _synchronize(device)
    return InferenceResult(batch_size, images, detections, time.perf_counter() - start, _peak_gib(device))


def _memory(peak_gib: float | None) -> str:
    return f"  peak {peak_gib:.2f} GiB" if peak_gib is not None else ""


def format_train(name: str, result: TrainResult, train_args: argparse.Namespace, device: torch.device) -> str:
    rate = result.images / result.seconds
    amp = loop.resolve_amp(train_args.amp, train_args.amp_dtype, device) is not None
    precision = train_args.amp_dtype if amp else "float32"
    return (f"train {name:<8} b{train_args.batch_size} {precision}: {result.steps / result.seconds:.3f} steps/s  "
            f"{rate:.2f} img/s  data wait {100 * result.data_wait_s / result.seconds:.1f}%{_memory(result.peak_gib)}"
            f"  loss {result.loss:.3f}  ({result.steps} steps, {result.images} images, {result.seconds:.1f} s)  "
            f"{rate / REFERENCE_IMAGES_PER_S:.3f}x the reference {REFERENCE_IMAGES_PER_S:.1f} img/s")


def format_inference(name: str, result: InferenceResult) -> str:
    return (f"infer {name:<8} b{result.batch_size}: {result.images / result.seconds:.2f} img/s"
            f"{_memory(result.peak_gib)}  {result.detections / result.images:.1f} detections/img  "
            f"({result.images} images, {result.seconds:.1f} s)")


def benchmark(name: str, args: argparse.Namespace, train_ds: ChromosomeDataset,
              infer_ds: ChromosomeDataset | None, device: torch.device) -> dict[str, float]:
    """Measure one model, print a line per measurement; returns images/s per measurement ("train", "infer b1", ...)."""
    train_args = training_args(args, "maskrcnn" if name == STOCK else name, train_ds.root)
    seed_everything(args.seed, 0, 0)
    model = make_model(name, train_args, train_ds.num_classes).to(device)
    rates: dict[str, float] = {}
    try:
        if args.train:
            result = measure_training(model, train_args, train_ds, device, args.warmup_steps, args.steps)
            print(format_train(name, result, train_args, device), flush=True)
            rates["train"] = result.images / result.seconds
        if infer_ds is not None:
            amp_dtype = loop.resolve_amp(train_args.amp, train_args.amp_dtype, device)
            for batch_size in INFERENCE_BATCH_SIZES:
                result = measure_inference(model, infer_ds, batch_size, device, amp_dtype, args.workers,
                                           max(1, args.warmup_steps))
                print(format_inference(name, result), flush=True)
                rates[f"infer b{batch_size}"] = result.images / result.seconds
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rates


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="bench_train.py", description=__doc__.split("\n\n")[0])
    add_data_args(parser, required=False)
    parser.add_argument("--synthetic", type=number_arg(int, low=1), default=None, metavar="N",
                        help="train on N synthetic 768x576 spreads rendered into a temporary folder instead")
    parser.add_argument("--split", default="train", help="training split (default: %(default)s)")
    parser.add_argument("--val-split", default="val",
                        help="split timed for inference with --data-path (default: %(default)s)")
    parser.add_argument("--model", choices=(*MODEL_NAMES, STOCK), default="maskrcnn",
                        help="ours (maskrcnn, dacseg) or stock torchvision maskrcnn_resnet50_fpn "
                             "(default: %(default)s)")
    parser.add_argument("--compare-stock", action="store_true",
                        help="also measure stock torchvision Mask R-CNN and print ours / stock")
    add_device_args(parser)
    parser.add_argument("-b", "--batch-size", type=number_arg(int, low=1), default=4, help="training images per step (default: 4)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision as train.py (default: on for CUDA, off on the CPU)")
    parser.add_argument("--steps", type=number_arg(int, low=1), default=30, help="timed training steps (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=number_arg(int, low=0), default=5,
                        help="untimed training steps (and inference batches) first (default: %(default)s)")
    parser.add_argument("--min-size", type=number_arg(int, low=32), default=800, help="model's shorter side (default: %(default)s)")
    parser.add_argument("--max-size", type=number_arg(int, low=32), default=1333, help="model's longer side limit (default: %(default)s)")
    parser.add_argument("--overlap-cls-head", choices=OVERLAP_CLS_HEADS, default="fc",
                        help="DaCSeg overlap classifier (default: %(default)s)")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="measure training (default: on)")
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                        help="measure inference with batch 1 and 4 (default: on)")
    parser.add_argument("--seed", type=number_arg(int, low=0), default=0, help="seed of the weights and the batch order")
    return parser


def _check_args(parser: ArgumentParser, args: argparse.Namespace) -> None:
    if (args.data_path is None) == (args.synthetic is None):
        parser.error("give exactly one of --data-path DIR and --synthetic N")
    if args.max_size < args.min_size:
        parser.error(f"--max-size {args.max_size} is smaller than --min-size {args.min_size}")
    if args.compare_stock and args.model == STOCK:
        parser.error("--compare-stock compares our model with stock; pick --model maskrcnn or dacseg")
    if not (args.train or args.inference):
        parser.error("--no-train and --no-inference leave nothing to measure")


def load_data(args: argparse.Namespace, stack: ExitStack) -> tuple[ChromosomeDataset, ChromosomeDataset | None]:
    """The training dataset (``flip`` preset) and the inference dataset (no augmentation; None with --no-inference);
    with ``--synthetic`` first renders the images into a temporary folder that ``stack`` removes."""
    if args.synthetic is not None:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_")))
        generate(root, args.synthetic, args.split, args.seed, SynthConfig(), workers=max(1, args.workers))
        infer_split = args.split
    else:
        root, infer_split = Path(args.data_path), args.val_split
        if not root.is_dir():
            raise UserError(f"--data-path {root}: no such directory")
    train_args = training_args(args, "maskrcnn", root)
    train_ds = ChromosomeDataset(root, split=args.split, transforms=get_transform(train_args.data_augmentation, True))
    if len(train_ds) == 0:
        raise UserError(f"{train_ds.ann_file} has no images")
    infer_ds = None
    if args.inference:
        infer_ds = ChromosomeDataset(root, split=infer_split, transforms=get_transform("none", False))
    return train_ds, infer_ds


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    device = torch.device(args.device)
    try:
        with ExitStack() as stack:
            train_ds, infer_ds = load_data(args, stack)
            where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"cpu, {torch.get_num_threads()} threads")
            infer_what = f", inference on {infer_ds.split} ({len(infer_ds)} images)" if infer_ds is not None else ""
            print(f"{where}; torch {torch.__version__}, torchvision {torchvision.__version__}; "
                  f"{'synthetic' if args.synthetic else args.data_path} {train_ds.split} ({len(train_ds)} images)"
                  f"{infer_what}; min/max size {args.min_size}/{args.max_size}, {args.workers} worker(s)", flush=True)
            ours = benchmark(args.model, args, train_ds, infer_ds, device)
            if args.compare_stock:
                stock = benchmark(STOCK, args, train_ds, infer_ds, device)
                ratios = "  ".join(f"{what} {ours[what] / stock[what]:.3f}x" for what in ours)
                print(f"ratio {args.model} / stock: {ratios}", flush=True)
    except DaCSegError as exc:
        print_error(exc)
        return 2
    except loop.NonFiniteLossError as exc:
        print_error(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
