"""Accuracy side by side: stock torchvision Mask R-CNN, our ``maskrcnn`` and our ``dacseg``, trained with the same
data, seed, recipe and budget, scored on BioImLab val with our evaluator.

    python bench/bench_accuracy.py --preset cpu                 # at most ~40 minutes on 2 CPU cores
    python bench/bench_accuracy.py --preset gpu                 # at most ~9 minutes on one H100/H200
    python bench/bench_accuracy.py --preset cpu --seeds 0 1     # and the spread between seeds

BioImLab is read from ``../shared/data/bioimlab`` (labelme) or ``--data-path`` (labelme root, or a COCO-layout root
with ``train`` / ``val`` splits) and converted into a temporary folder. ``stock`` is
``torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)``, trained
through its own forward. All three go through the same loop (``train_utils.engine.loop.train_one_epoch``),
``train.py``'s optimizer and per-step schedule built by the engine (``setup.make_optimizer``,
``schedule.make_schedule``: SGD with the reference recipe's momentum and weight decay, linear warmup from 0.001x,
cosine to 0, gradient norms clipped at 10), the same flips, and the same evaluation
(``train_utils.evaluation.score.evaluate``). ``--models dacseg_shape`` is ``dacseg`` with the shape prior
(``--shape-codebook PT``, built from the train split by ``tools/build_shape_codebook.py``), for its ablation;
``--save-dir`` writes each model with the engine's checkpoint writer,
so it is a ``train.py`` checkpoint.

The budget is optimizer steps (``--budget-iters``) or wall-clock seconds of training (``--budget-s``): with seconds,
the first steps measure the speed and the schedule is laid over the steps that fit, so a faster pipeline trains
more steps. The ``cpu`` preset trains on random crops at the original scale (the models skip their resize in
training) and evaluates whole val images at their own size, with fewer sampled RoIs; it is a small-budget signal,
not the reference run. The ``gpu`` preset is the reference recipe (whole images, min-size 800, batch 4, AMP) on a
shorter budget.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from my_dataset_chromosome import ChromosomeDataset  # noqa: E402
from network_files import build_model, resolve_config  # noqa: E402
from network_files.config import ModelConfig  # noqa: E402
from tools.labelme2coco import convert_labelme  # noqa: E402
from train_utils.data.loaders import collate_fn  # noqa: E402
from train_utils.data.samplers import train_batch_sampler  # noqa: E402
from train_utils.engine import loop, schedule  # noqa: E402
from train_utils.engine.checkpoint import save_checkpoint, training_state  # noqa: E402
from train_utils.engine.run_config import Labels, OptimizerSettings, ScheduleSettings, StainSettings  # noqa: E402
from train_utils.engine.setup import make_optimizer, seed_everything  # noqa: E402
from train_utils.evaluation import score  # noqa: E402
from train_utils.cli import ArgumentParser, LossWeightsAction, loss_weight_arg, number_arg  # noqa: E402
from train_utils.stain import BRIGHT_ON_DARK  # noqa: E402
from transforms import get_transform, tighten_instances  # noqa: E402

MODELS = ("stock", "maskrcnn", "dacseg", "dacseg_shape")
DEFAULT_MODELS = ("stock", "maskrcnn", "dacseg")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bioimlab"


@dataclass(frozen=True)
class Preset:
    """One comparison's settings; every model gets exactly these."""

    batch_size: int
    lr: float
    budget_iters: int | None
    budget_s: float | None
    warmup_iters: int
    min_size: int
    max_size: int
    crop_size: int | None = None
    rois_per_image: int = 512
    train_images: int | None = None  # the first N train images (None: all)
    amp: bool = False
    overlap_cls_head: str = "conv"
    loss_weights: tuple[tuple[str, float], ...] = ()  # (loss name, weight) pairs as train.py --loss-weights takes
    shape_codebook: str | None = None  # dacseg_shape's codebook (tools/build_shape_codebook.py, train split only)


PRESETS = {
    # 2 CPU cores: ~10 minutes of training a model on 256 px crops at the original scale, batch 2
    "cpu": Preset(batch_size=2, lr=0.02, budget_iters=160, budget_s=None, warmup_iters=30, min_size=576,
                  max_size=768, crop_size=256, rois_per_image=128),
    # one H100/H200: the reference recipe, ~2.3 minutes of training a model (the reference trained 6.5)
    "gpu": Preset(batch_size=4, lr=0.02, budget_iters=None, budget_s=140.0, warmup_iters=300, min_size=800,
                  max_size=1333, amp=True),
}


@dataclass
class Outcome:
    model: str
    seed: int
    steps: int
    train_s: float
    images_per_s: float
    record: dict[str, Any] = field(repr=False)
    wall_s: float = 0.0


class Steps:
    """The first ``count`` batches of repeated passes over ``loader`` (the sampler's epoch advances each pass)."""

    def __init__(self, loader: DataLoader, count: int, first_pass: int = 0) -> None:
        self.loader, self.count, self.passes = loader, count, first_pass

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        def batches() -> Iterable:
            while True:
                self.loader.batch_sampler.set_epoch(self.passes)
                self.passes += 1
                yield from self.loader

        return itertools.islice(batches(), self.count)


def prepare_data(source: Path, work: Path) -> Path:
    """A COCO-layout root with ``train`` and ``val``: ``source`` itself, or its labelme folders converted."""
    if (source / "annotations" / "instances_train.json").is_file():
        return source
    labelme = source / "labelme" if (source / "labelme").is_dir() else source
    for split in ("train", "val"):
        if not (labelme / split).is_dir():
            raise SystemExit(f"bench_accuracy.py: error: {labelme / split}: no such folder (need train/ and val/)")
        convert_labelme([labelme / split], work, split=split)
    return work


def model_config(name: str, preset: Preset, num_classes: int) -> ModelConfig:
    """Our model's config for a bench model name: ``dacseg_shape`` is ``dacseg`` with the preset's shape codebook;
    ``stock``'s modules are our ``maskrcnn``'s."""
    shape_prior = None
    if name == "dacseg_shape":
        if preset.shape_codebook is None:
            raise SystemExit("bench_accuracy.py: error: dacseg_shape needs --shape-codebook PT "
                             "(tools/build_shape_codebook.py on the train split)")
        shape_prior = preset.shape_codebook
    return ModelConfig(name={"stock": "maskrcnn", "dacseg_shape": "dacseg"}.get(name, name), num_classes=num_classes,
                       min_size=preset.min_size, max_size=preset.max_size, rois_per_image=preset.rois_per_image,
                       overlap_cls_head=preset.overlap_cls_head, shape_prior=shape_prior)


def make_model(name: str, preset: Preset, num_classes: int) -> torch.nn.Module:
    """Stock torchvision's Mask R-CNN, or ours as ``train.py`` builds it from scratch."""
    if name == "stock":
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=preset.min_size,
            max_size=preset.max_size, box_batch_size_per_image=preset.rois_per_image)
    else:
        model = build_model(resolve_config(model_config(name, preset, num_classes), pretrained=False))
    # crops are trained at the original scale; torchvision's transform has this switch for training only
    model.transform._skip_resize = preset.crop_size is not None
    return model


@dataclass
class Training:
    """A model's training as ``train.py`` builds it (the engine's optimizer and schedule settings and builders),
    and what it took."""

    settings: OptimizerSettings
    lr_schedule: ScheduleSettings  # one "epoch" of all the steps
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    batch_size: int
    steps: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.steps * self.batch_size / self.seconds


def new_training(model: torch.nn.Module, preset: Preset, device: torch.device, total_steps: int,
                 start_step: int = 0, optimizer: torch.optim.Optimizer | None = None) -> Training:
    """The preset's optimizer (train.py's defaults but for the lr) and a schedule over ``total_steps`` placed at
    ``start_step``, through the engine's builders; ``optimizer`` keeps an existing one (a re-laid schedule)."""
    settings = OptimizerSettings(lr=preset.lr)
    lr_schedule = ScheduleSettings(epochs=1, steps_per_epoch=total_steps, warmup_iters=preset.warmup_iters)
    optimizer = optimizer if optimizer is not None else make_optimizer(model, settings)
    scaler = torch.amp.GradScaler(device.type) if preset.amp and device.type == "cuda" else None
    return Training(settings, lr_schedule, optimizer, schedule.make_schedule(optimizer, lr_schedule, start_step),
                    scaler, preset.batch_size)


def train_model(model: torch.nn.Module, preset: Preset, train_ds: ChromosomeDataset, device: torch.device,
                seed: int, workers: int) -> Training:
    """Train within the preset's budget; returns the training (optimizer steps, seconds, states)."""
    loader = DataLoader(
        train_ds, batch_sampler=train_batch_sampler(len(train_ds), train_ds.aspect_ratios(), preset.batch_size, 3,
                                                    seed=seed),
        num_workers=workers, collate_fn=collate_fn, pin_memory=device.type == "cuda")
    amp_dtype = torch.float16 if preset.amp and device.type == "cuda" else None
    seed_everything(seed, 1, 0)
    start = time.perf_counter()
    probe_steps = 0
    total = preset.budget_iters
    if total is None:  # a time budget: measure the speed on the warmup's first steps, then fit the schedule to it
        probe_steps = min(preset.warmup_iters, 20)
        total = 10 ** 9
    training = new_training(model, preset, device, total)
    steps = Steps(loader, probe_steps or total)
    kwargs = dict(lr_scheduler=training.lr_scheduler, scaler=training.scaler, amp_dtype=amp_dtype,
                  clip_grad_norm=training.settings.clip_grad_norm, loss_weights=dict(preset.loss_weights),
                  print_freq=10, show_progress=True)
    loop.train_one_epoch(model, training.optimizer, steps, device, 0, **kwargs)
    if probe_steps:
        _synchronize(device)
        per_step = (time.perf_counter() - start) / probe_steps
        total = max(probe_steps + 1, int(preset.budget_s / per_step))
        relaid = new_training(model, preset, device, total, start_step=probe_steps,
                              optimizer=training.optimizer)
        training = dataclasses.replace(relaid, scaler=training.scaler)
        kwargs["lr_scheduler"] = training.lr_scheduler
        loop.train_one_epoch(model, training.optimizer, Steps(loader, total - probe_steps, steps.passes), device,
                             1, **kwargs)
    _synchronize(device)
    training.steps, training.seconds = total, time.perf_counter() - start
    return training


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_trained(model: torch.nn.Module, name: str, seed: int, training: Training, preset: Preset,
                 dataset: ChromosomeDataset, save_dir: Path) -> Path:
    """The trained model as a ``train.py`` checkpoint (the engine's writer; ``epoch`` holds the optimizer steps)
    that ``validation.py``, ``predict.py`` and ``bench_infer.py`` read (stock's modules are our ``maskrcnn``'s, so it
    is saved as one)."""
    config = model_config(name, preset, dataset.num_classes)
    record = {"bench": "bench_accuracy", "model": name, "seed": seed, "opt": training.settings.name,
              "preset": dataclasses.asdict(preset)}
    state = training_state(model, training.optimizer, training.lr_scheduler, training.scaler, training.steps,
                           record=record, model_config=resolve_config(config, False), labels=Labels.of(dataset),
                           stain=StainSettings(polarity=BRIGHT_ON_DARK))
    path = save_dir / f"{name}_seed{seed}.pth"
    save_checkpoint(state, path)
    return path


def model_scale(preset: Preset, dataset: ChromosomeDataset) -> float:
    """The median over the dataset's images of the factor the model's resize applies to each (torchvision's rule:
    the shorter side to ``min_size`` unless the longer one would pass ``max_size``): 1.0 for 768x576 at min-size
    576, 1.389 at 800."""
    infos = [dataset.coco.imgs[i] for i in dataset.ids]
    return statistics.median(min(preset.min_size / min(info["width"], info["height"]),
                                 preset.max_size / max(info["width"], info["height"])) for info in infos)


def train_transform(preset: Preset, scale: float) -> Callable:
    """Flips (and the preset's random crop at the original scale); a crop is then resized by ``scale``, the factor
    the model applies to whole images, so training sees chromosomes at the size they are scored at, and its boxes
    are made tight around the resized masks again."""
    crop = get_transform("flip", train=True, crop_size=preset.crop_size)
    if preset.crop_size is None or abs(scale - 1.0) < 1e-6:
        return crop
    resize = v2.Resize(round(preset.crop_size * scale))  # crops are square

    def crop_then_resize(image, target):
        return tighten_instances(*resize(*crop(image, target)))

    return crop_then_resize


def run_one(name: str, seed: int, preset: Preset, data: Path, device: torch.device, workers: int,
            save_dir: Path | None = None) -> Outcome:
    wall = time.perf_counter()
    train_ds = ChromosomeDataset(data, "train")
    if preset.train_images is not None:
        train_ds.ids = train_ds.ids[:preset.train_images]
    scale = model_scale(preset, train_ds)
    train_ds.transforms = train_transform(preset, scale)
    if preset.crop_size is not None and abs(scale - 1.0) >= 1e-6:
        print(f"# {name} seed {seed}: {preset.crop_size} px training crops resized x{scale:.3f} (min-size "
              f"{preset.min_size}, max-size {preset.max_size})", flush=True)
    val_ds = ChromosomeDataset(data, "val", transforms=get_transform("none", train=False))
    seed_everything(seed, 0, 0)
    model = make_model(name, preset, val_ds.num_classes).to(device)
    training = train_model(model, preset, train_ds, device, seed, workers)
    if save_dir is not None:
        save_trained(model, name, seed, training, preset, val_ds, save_dir)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=workers, collate_fn=collate_fn)
    amp_dtype = torch.float16 if preset.amp and device.type == "cuda" else None
    record = score.evaluate(model, val_loader, device, val_ds.coco, val_ds.label_to_cat_id, 0.5,
                             label_names=val_ds.label_names, amp_dtype=amp_dtype, show_progress=True)
    return Outcome(name, seed, training.steps, training.seconds, training.images_per_s, record,
                   time.perf_counter() - wall)


COLUMNS = (  # (header, getter of a record)
    ("AP", lambda r: r["segm"]["AP"]),
    ("AP50", lambda r: r["segm"]["AP50"]),
    ("AP75", lambda r: r["segm"]["AP75"]),
    ("P", lambda r: r["precision"]),
    ("R", lambda r: r["recall"]),
    ("F1", lambda r: r["f1"]),
    ("ovl AP", lambda r: r["overlap_segm"]["AP"]),
    ("ovl R", lambda r: r["overlap_segm"]["recall"]),
    ("cnt MAE", lambda r: r["count_mae"]),
)


def values(outcome: Outcome) -> list[float]:
    return [get(outcome.record) for _, get in COLUMNS] + [outcome.images_per_s, outcome.wall_s]


def format_table(outcomes: list[Outcome]) -> str:
    """A Markdown table: one row per model (mean over seeds, then the max-min spread when there are several)."""
    headers = [h for h, _ in COLUMNS] + ["img/s", "wall s"]
    lines = ["| model | seeds | steps | " + " | ".join(headers) + " |", "|---" * (len(headers) + 3) + "|"]
    for name in MODELS:
        runs = [o for o in outcomes if o.model == name]
        if not runs:
            continue
        columns = list(zip(*(values(o) for o in runs)))
        means = [statistics.fmean(c) for c in columns]
        cells = [f"{m:.3f}" if i < len(COLUMNS) else f"{m:.1f}" for i, m in enumerate(means)]
        if len(runs) > 1:
            cells = [f"{cell} ±{(max(c) - min(c)) / 2:.3f}" if i < len(COLUMNS) else cell
                     for i, (cell, c) in enumerate(zip(cells, columns))]
        seeds = ",".join(str(o.seed) for o in runs)
        lines.append(f"| {name} | {seeds} | {runs[0].steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ratios(outcomes: list[Outcome]) -> str:
    """ours / stock and dacseg / maskrcnn for AP, AP50, overlap AP, overlap recall and images/s (seed means)."""
    def mean(name: str, index: int) -> float | None:
        runs = [values(o)[index] for o in outcomes if o.model == name]
        return statistics.fmean(runs) if runs else None

    picks = {"AP": 0, "AP50": 1, "ovl AP": 6, "ovl R": 7, "img/s": len(COLUMNS)}
    lines = []
    for top, bottom in (("maskrcnn", "stock"), ("dacseg", "stock"), ("dacseg", "maskrcnn"),
                        ("dacseg_shape", "dacseg")):
        parts = []
        for label, index in picks.items():
            a, b = mean(top, index), mean(bottom, index)
            if a is None or b is None:
                break
            parts.append(f"{label} {a / b:.3f}" if b else f"{label} n/a (0)")
        else:
            lines.append(f"ratio {top} / {bottom}: " + "  ".join(parts))
    return "\n".join(lines)


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="settings (default: %(default)s)")
    parser.add_argument("--data-path", type=Path, default=DEFAULT_DATA,
                        help="BioImLab labelme root or a COCO-layout root (default: %(default)s)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS),
                        help="models to train (default: %(default)s; dacseg_shape is dacseg with --shape-codebook)")
    parser.add_argument("--seeds", nargs="+", type=number_arg(int, low=0), default=[0], help="seeds; several print the spread")
    parser.add_argument("--budget-iters", type=number_arg(int, low=1), default=None, help="optimizer steps (overrides the preset)")
    parser.add_argument("--budget-s", type=number_arg(float, 0.0, low_open=True), default=None, help="training seconds (overrides the preset)")
    parser.add_argument("--overlap-cls-head", choices=("fc", "conv"), default=None,
                        help="dacseg's overlap classifier (overrides the preset's conv), for ablations")
    parser.add_argument("--loss-weights", type=loss_weight_arg, nargs="+", action=LossWeightsAction,
                        default={}, metavar="NAME=W", help="loss weights as train.py takes them, for ablations (default: 1 each)")
    parser.add_argument("--shape-codebook", type=Path, default=None, metavar="PT",
                        help="dacseg_shape's shape codebook (tools/build_shape_codebook.py), built from train only")
    parser.add_argument("--min-size", type=number_arg(int, low=32), default=None,
                        help="the model's min size (overrides the preset's; the cpu preset's crops are resized by "
                             "the factor it gives whole images), for the input-scale study")
    parser.add_argument("--max-size", type=number_arg(int, low=32), default=None,
                        help="the model's max size (overrides the preset's)")
    parser.add_argument("--train-images", type=number_arg(int, low=1), default=None, help="train on the first N images only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-j", "--workers", type=number_arg(int, low=0), default=2, help="data-loading processes (default: 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the outcomes as JSON here")
    parser.add_argument("--save-dir", type=Path, default=None,
                        help="also save each trained model here as <model>_seed<seed>.pth (a train.py checkpoint)")
    return parser


def preset_from_args(args) -> Preset:
    """``--preset`` with the flags that override it."""
    overrides: dict[str, Any] = {}
    if args.budget_iters is not None or args.budget_s is not None:
        overrides.update(budget_iters=args.budget_iters, budget_s=args.budget_s)
    if args.train_images is not None:
        overrides["train_images"] = args.train_images
    for size in ("min_size", "max_size"):
        if getattr(args, size) is not None:
            overrides[size] = getattr(args, size)
    if args.overlap_cls_head is not None:
        overrides["overlap_cls_head"] = args.overlap_cls_head
    if args.loss_weights:
        overrides["loss_weights"] = tuple(sorted(args.loss_weights.items()))
    if args.shape_codebook is not None:
        if not args.shape_codebook.is_file():
            raise SystemExit(f"bench_accuracy.py: error: --shape-codebook {args.shape_codebook}: no such file")
        overrides["shape_codebook"] = str(args.shape_codebook)
    elif "dacseg_shape" in args.models:
        raise SystemExit("bench_accuracy.py: error: --models dacseg_shape needs --shape-codebook PT "
                         "(tools/build_shape_codebook.py on the train split)")
    return dataclasses.replace(PRESETS[args.preset], **overrides)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    preset = preset_from_args(args)
    if not args.data_path.is_dir():
        print(f"bench_accuracy.py: error: --data-path {args.data_path}: no such folder", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False  # a new RoI count every step: benchmark mode is far slower here
    print(f"# bench_accuracy --preset {args.preset}: {preset}\n# device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f", torch {torch.__version__}, torchvision {torchvision.__version__}", flush=True)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as work:
        data = prepare_data(args.data_path, Path(work))
        for seed in args.seeds:
            for name in args.models:
                outcome = run_one(name, seed, preset, data, device, args.workers, args.save_dir)
                outcomes.append(outcome)
                print(f"{name} seed {seed}: {outcome.steps} steps in {outcome.train_s:.0f} s, "
                      + "  ".join(f"{h} {v:.3f}" for (h, _), v in zip(COLUMNS, values(outcome))), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(format_table(outcomes))
    print(format_ratios(outcomes))
    if args.out is not None:
        args.out.write_text(json.dumps([{k: v for k, v in o.__dict__.items() if k != "record"}
                                        | {"record": {k: v for k, v in o.record.items() if k not in ("bbox", "segm")}
                                           | {"segm": {k: v for k, v in o.record["segm"].items()
                                                       if k != "summary_lines"}}}
                                        for o in outcomes], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
