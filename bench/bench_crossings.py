"""Crossings benchmark: models trained on crops of BioImLab, scored on crops around the real crossings of val.

    python bench/bench_crossings.py --variants stock maskrcnn dacseg --seeds 0 1 2 --out runs/crossings
    python bench/bench_crossings.py --report runs/crossings                 # tables and intervals of saved runs

Data: ``tools/crossing_crops.py`` cuts one square crop (``--crop-size``, original scale) per cluster of crossing
chromosomes and as many control crops without a crossing, from train and from val. Training (``--train-data``) uses
the train crops (``crops``), random crops of the whole train images (``whole``) or both; scoring always uses the val
crops. Every variant gets the same data, step budget, optimizer and schedule (train.py's, from the engine's builders:
SGD, warmup, cosine, clipping at 10), flips and seeds, and the same loader order per seed; ``--save-dir`` models are
written by the engine's checkpoint writer. Each run is saved as ``OUT/<variant>_seed<S>.json`` (its detections on
the val crops, losses, timings) as soon as it ends, so an interrupted session keeps what finished; ``--report``
scores them with ``train_utils.evaluation.crossings`` and compares every variant with ``maskrcnn`` by a paired
bootstrap over crops (``train_utils.evaluation.stats``).

Variants: ``stock`` is torchvision's ``MaskRCNN`` on torchvision's ``resnet_fpn_backbone`` with the same backbone,
anchors and sampling as ours; ``maskrcnn`` and ``dacseg`` are ours as ``train.py`` builds them; ``maskrcnn_mask14``
(a 14x14 mask head) is the calibration: a model known to be worse at the mask's edge; ``maskrcnn_reseeded`` is the
null calibration: ``maskrcnn`` trained from other seeds (seed + 100), paired as its seed, so that identical
configurations show the interval that seed noise alone gives; the ``dacseg_*`` variants are
ablations (see ``VARIANTS``). ``dacseg_shape`` adds the shape prior (``--shape-prior``) with a codebook built from the
train split only: ``--shape-codebook PT``, or else one built once by ``tools/build_shape_codebook.py`` from the whole
train images into ``OUT/shape_codebook.pt`` (kept, and reused by later runs into the same ``OUT``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_accuracy import DEFAULT_DATA, Steps, prepare_data  # noqa: E402
from my_dataset_chromosome import ChromosomeDataset  # noqa: E402
from network_files import build_model, resolve_config  # noqa: E402
from network_files.config import ModelConfig  # noqa: E402
from tools.crossing_crops import cut_crops  # noqa: E402
from train_utils.cli import ArgumentParser, number_arg  # noqa: E402
from train_utils.data.loaders import collate_fn  # noqa: E402
from train_utils.engine import loop, schedule  # noqa: E402
from train_utils.engine.checkpoint import save_checkpoint, training_state  # noqa: E402
from train_utils.engine.run_config import Labels, OptimizerSettings, ScheduleSettings, StainSettings  # noqa: E402
from train_utils.engine.setup import make_optimizer, seed_everything  # noqa: E402
from train_utils.evaluation import score  # noqa: E402
from train_utils.evaluation.crossings import crop_scores, summarize  # noqa: E402
from train_utils.stain import BRIGHT_ON_DARK  # noqa: E402
from transforms import get_transform  # noqa: E402

VAL_CROPS = "val_crops.json"  # the scored crops' ground truth, beside the runs
AUX_TERMS = ("loss_overlap", "loss_overlap_edge", "loss_overlap_else", "loss_overlap_else_edge")


@dataclass(frozen=True)
class Variant:
    """One compared model: ours (``model``) with config overrides and loss weights, or torchvision's (stock)."""

    model: str  # "stock", "maskrcnn" or "dacseg"
    config: tuple[tuple[str, Any], ...] = ()  # ModelConfig fields over the bench's
    loss_weights: tuple[tuple[str, float], ...] = ()
    mask_resolution: int = 28  # 14: the calibration's coarser mask head (RoIAlign 7x7)
    shape_prior: bool = False  # DaCSeg's shape prior, with the bench's train-split codebook
    seed_offset: int = 0  # trained from seed + this (weights and batch order), scored and paired as seed
    note: str = ""


VARIANTS = {
    "stock": Variant("stock", note="torchvision MaskRCNN + resnet_fpn_backbone, same settings"),
    "maskrcnn": Variant("maskrcnn", note="ours"),
    "maskrcnn_reseeded": Variant("maskrcnn", seed_offset=100,
                                 note="calibration: maskrcnn again from other seeds (seed + 100), paired as seed"),
    "maskrcnn_mask14": Variant("maskrcnn", mask_resolution=14, note="calibration: 14x14 mask head"),
    "dacseg": Variant("dacseg", (("overlap_cls_head", "conv"),), note="conv overlap classifier"),
    "dacseg_fc": Variant("dacseg", (("overlap_cls_head", "fc"),), note="fc overlap classifier (published)"),
    "dacseg_no_cls": Variant("dacseg", (("overlap_cls_head", "conv"),), (("loss_overlap_cls", 0.0),),
                             note="no overlap-classifier loss"),
    "dacseg_no_edge": Variant("dacseg", (("overlap_cls_head", "conv"),),
                              (("loss_overlap_edge", 0.0), ("loss_overlap_else_edge", 0.0)),
                              note="no boundary losses"),
    "dacseg_aux025": Variant("dacseg", (("overlap_cls_head", "conv"),), tuple((t, 0.25) for t in AUX_TERMS),
                             note="auxiliary map losses at 0.25"),
    "dacseg_stage1": Variant("dacseg", (("overlap_cls_head", "conv"), ("fusion", "stage1")),
                             note="the final mask reads F + X1 (stage 2 stays, as an auxiliary task)"),
    "dacseg_no_fusion": Variant("dacseg", (("overlap_cls_head", "conv"), ("fusion", "none")),
                                note="the final mask reads F only (no F + X2 path)"),
    "dacseg_gated": Variant("dacseg", (("overlap_cls_head", "conv"), ("fusion", "gated")),
                            note="F + p * X2, stage 2 gated by the classifier"),
    "dacseg_xweight4": Variant("dacseg", (("overlap_cls_head", "conv"), ("crossing_mask_weight", 4.0)),
                               note="final mask loss x4 on the crossing pixels"),
    "dacseg_neighbour4": Variant("dacseg", (("overlap_cls_head", "conv"), ("neighbour_mask_weight", 4.0)),
                                 note="final mask loss x4 on the other chromosomes' pixels in the RoI"),
    "dacseg_neighbour2": Variant("dacseg", (("overlap_cls_head", "conv"), ("neighbour_mask_weight", 2.0)),
                                 note="final mask loss x2 on the other chromosomes' pixels in the RoI"),
    "dacseg_shape": Variant("dacseg", (("overlap_cls_head", "conv"),), shape_prior=True,
                            note="shape prior, codebook of the train split, 2 nearest shapes"),
}


@dataclass(frozen=True)
class Setting:
    """What every variant shares."""

    crop_size: int = 128  # the defaults are the README's comparison
    train_data: str = "crops"  # "crops", "whole" or "both"
    backbone: str = "resnet18"
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    rois_per_image: int = 32
    batch_size: int = 4
    lr: float = 0.02
    steps: int = 300
    warmup_iters: int = 60
    evals: int = 2  # val scorings along the way (the last at the end): the val curve
    synthetic: int = 0  # synthetic spreads whose crossing crops join the training data
    device: str = "cpu"  # where the models train and are scored ("cuda": a GPU; its numbers are not the CPU's)


def model_config(variant: Variant, setting: Setting, num_classes: int, min_size: int, max_size: int,
                 codebook: Path | None = None) -> ModelConfig:
    """The variant's ``ModelConfig``; ``codebook`` is the shape prior's, for a variant with one."""
    fields = dict(name="maskrcnn" if variant.model == "stock" else variant.model, num_classes=num_classes,
                  backbone=setting.backbone, min_size=min_size, max_size=max_size,
                  anchor_sizes=setting.anchor_sizes, rois_per_image=setting.rois_per_image)
    fields.update(dict(variant.config))
    if variant.shape_prior and codebook is not None:
        fields["shape_prior"] = str(codebook)
    return resolve_config(ModelConfig(**fields), pretrained=False)


def make_model(variant: Variant, setting: Setting, num_classes: int, codebook: Path | None = None) -> torch.nn.Module:
    """The variant at the crops' own scale (no resize: min and max size are the crop size)."""
    if variant.shape_prior and codebook is None:
        raise ValueError("a shape-prior variant needs a codebook")
    config = model_config(variant, setting, num_classes, setting.crop_size, setting.crop_size, codebook)
    if variant.model == "stock":
        backbone = resnet_fpn_backbone(backbone_name=setting.backbone, weights=None, norm_layer=torch.nn.BatchNorm2d,
                                       trainable_layers=5)
        anchors = AnchorGenerator(tuple((s,) for s in setting.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        model = MaskRCNN(backbone, num_classes=num_classes + 1, min_size=setting.crop_size,
                         max_size=setting.crop_size, rpn_anchor_generator=anchors,
                         box_batch_size_per_image=setting.rois_per_image)
    else:
        model = build_model(config)
    if variant.mask_resolution == 14:
        model.roi_heads.mask_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    model.transform._skip_resize = True  # crops are trained at the original scale
    return model


@dataclass
class Run:
    variant: str
    seed: int
    setting: dict[str, Any]
    steps: int = 0
    train_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) every few steps
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, crossing recall75, pairs75)
    detections: list[dict[str, Any]] = field(default_factory=list)  # COCO results on the val crops


def training_set(crops: Path, whole: Path, setting: Setting, synthetic: Path | None) -> torch.utils.data.Dataset:
    flip = get_transform("flip", train=True)
    parts = []
    if setting.train_data in ("crops", "both"):
        parts.append(ChromosomeDataset(crops, "train", transforms=flip))
    if setting.train_data in ("whole", "both"):
        parts.append(ChromosomeDataset(whole, "train", transforms=get_transform("flip", train=True,
                                                                                crop_size=setting.crop_size)))
    if synthetic is not None:
        parts.append(ChromosomeDataset(synthetic, "train", transforms=flip))
    return ConcatDataset(parts)


class SeededBatches:
    """Shuffled batches whose order depends only on the seed and the pass (``set_epoch``), like the training
    sampler of ``train.py`` (crops are all the same size, so no aspect-ratio grouping)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        return iter(order.split(self.batch_size))


def score_val(model: torch.nn.Module, val: ChromosomeDataset, workers: int,
              device: torch.device) -> list[dict[str, Any]]:
    loader = DataLoader(val, batch_size=4, num_workers=workers, collate_fn=collate_fn)
    results, _ = score.predict_results(model, loader, device, val.label_to_cat_id)
    return results


def training_seed(variant: Variant, seed: int) -> int:
    """The seed a run paired as ``seed`` is trained from: its initial weights, batch order and augmentation."""
    return seed + variant.seed_offset


def train_and_score(name: str, seed: int, setting: Setting, data: dict[str, Path], workers: int,
                    save_dir: Path | None) -> Run:
    variant = VARIANTS[name]
    val = ChromosomeDataset(data["crops"], "val", transforms=get_transform("none", train=False))
    train = training_set(data["crops"], data["whole"], setting, data.get("synthetic"))
    train_seed = training_seed(variant, seed)
    seed_everything(train_seed, 0, 0)
    device = torch.device(setting.device)
    model = make_model(variant, setting, val.num_classes, data.get("codebook")).to(device)
    loader = DataLoader(train, batch_sampler=SeededBatches(len(train), setting.batch_size, train_seed),
                        num_workers=workers, collate_fn=collate_fn, persistent_workers=workers > 0)
    optimization = OptimizerSettings(lr=setting.lr)  # train.py's defaults but for the lr
    lr_schedule = ScheduleSettings(epochs=1, steps_per_epoch=setting.steps, warmup_iters=setting.warmup_iters)
    optimizer = make_optimizer(model, optimization)
    lr_scheduler = schedule.make_schedule(optimizer, lr_schedule)
    run = Run(name, seed, dataclasses.asdict(setting))
    seed_everything(train_seed, 1, 0)
    stops = [round(setting.steps * (k + 1) / setting.evals) for k in range(setting.evals)]
    steps = Steps(loader, 0)
    done = 0
    for stop in stops:
        steps.count = stop - done
        start = time.perf_counter()
        loop.train_one_epoch(model, optimizer, steps, device, done, lr_scheduler=lr_scheduler,
                             clip_grad_norm=optimization.clip_grad_norm, loss_weights=dict(variant.loss_weights),
                             print_freq=10,
                             show_progress=False,
                             on_log=lambda i, v, base=done: run.losses.append((base + i, float(v["loss"]))))
        run.train_s += time.perf_counter() - start  # the scoring below is not training time
        done = stop
        run.detections = score_val(model, val, workers, device)
        crossing = summarize([c for c in crop_scores(val.coco, run.detections) if c.kind == "crossing"])
        run.curve.append((done, crossing["recall75"], crossing["pairs75"]))
        print(f"  {name} seed {seed} step {done}/{setting.steps} ({run.train_s:.0f} s): loss "
              f"{run.losses[-1][1] if run.losses else float('nan'):.3f}  crossing recall75 {crossing['recall75']:.3f}"
              f"  pairs75 {crossing['pairs75']:.3f}", flush=True)
    run.steps = setting.steps
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        # whole BioImLab images, own scale
        config = model_config(variant, setting, val.num_classes, 576, 768, data.get("codebook"))
        record = {"bench": "bench_crossings", "variant": name, "seed": seed, "opt": optimization.name,
                  "setting": dataclasses.asdict(setting)}
        save_checkpoint(training_state(model, optimizer, lr_scheduler, None, setting.steps, record=record,
                                       model_config=config, labels=Labels.of(val),
                                       stain=StainSettings(polarity=BRIGHT_ON_DARK)),
                        save_dir / f"{name}_seed{seed}.pth")
    return run


def prepare(source: Path, work: Path, setting: Setting) -> dict[str, Path]:
    """Whole images (COCO layout), their crossing and control crops, and optional synthetic crossing crops."""
    whole = prepare_data(source, work / "whole")
    crops = work / "crops"
    for split in ("train", "val"):
        counts = cut_crops(whole, split, crops, crop_size=setting.crop_size)
        print(f"# crops {counts.line(split)}", flush=True)
    data = {"whole": whole, "crops": crops}
    if setting.synthetic:
        from tools.synth_metaphase import generate  # noqa: PLC0415

        generate(work / "synth", setting.synthetic, split="train", seed=12345)
        counts = cut_crops(work / "synth", "train", work / "synth_crops", crop_size=setting.crop_size, controls=0.0)
        print(f"# synthetic crops {counts.line('train')}", flush=True)
        data["synthetic"] = work / "synth_crops"
    return data


def shape_codebook(whole: Path, out: Path) -> Path:
    """The train split's shape codebook at ``out``, built by ``tools/build_shape_codebook.py`` unless already there."""
    if not out.is_file():
        from tools import build_shape_codebook  # noqa: PLC0415

        print(f"# building the shape codebook of {whole} train -> {out}", flush=True)
        if build_shape_codebook.main(["--data-path", str(whole), "--split", "train", "--out", str(out)]) != 0:
            raise SystemExit(f"bench_crossings.py: error: could not build the shape codebook {out}")
    return out


def as_json(setting: Setting) -> dict[str, Any]:
    """``setting`` as a saved run holds it (tuples as JSON lists)."""
    return json.loads(json.dumps(dataclasses.asdict(setting)))


def setting_differences(stored: dict[str, Any], setting: Setting) -> list[str]:
    """The fields in which a saved run's setting is not ``setting`` (a field the run predates counts as its
    default)."""
    stored = {**as_json(Setting()), **stored}
    return [f"{key} {stored.get(key)} there, {value} here" for key, value in as_json(setting).items()
            if stored.get(key) != value]


def saved_crop_size(runs: Path) -> int | None:
    """The crop size the runs saved in ``runs`` were trained and scored at (one setting per folder, ``check_out``);
    None for runs that do not record it."""
    from bench.crossings_report import read_run, run_files  # noqa: PLC0415

    for path in run_files(runs):
        crop_size = read_run(path).get("setting", {}).get("crop_size")
        if crop_size is not None:
            return int(crop_size)
    return None


def check_out(out: Path, setting: Setting) -> None:
    """Refuse an ``--out`` that holds runs of another setting: they would be overwritten, or paired with these."""
    for path in sorted(out.glob("*_seed*.json")):
        differences = setting_differences(json.loads(path.read_text()).get("setting", {}), setting)
        if differences:
            raise SystemExit(f"bench_crossings.py: error: --out {out} holds runs of another setting ({path.name}: "
                             f"{'; '.join(differences)}); give another --out")


def print_report(args: Namespace) -> int:
    """``--report``: the tables of the saved runs and, with ``--picture``, the picture. The crops are cut again
    (at the runs' crop size) when the picture needs their images or the runs' folder lacks their ground truth, as
    the runs kept in ``bench/results/`` do: BioImLab's annotations never go into the repository."""
    from bench.crossings_report import picture, report, run_files  # noqa: PLC0415

    if not run_files(args.report):
        raise SystemExit(f"bench_crossings.py: error: --report {args.report}: no saved runs (*_seed*.json) there")
    gt = args.report / VAL_CROPS
    with tempfile.TemporaryDirectory(prefix="bench_crossings_") as work:
        data = None
        if args.picture is not None or not gt.is_file():
            crop_size = saved_crop_size(args.report) or args.crop_size
            data = prepare(args.data_path, Path(work), Setting(crop_size=crop_size))
            if not gt.is_file():
                gt = data["crops"] / "annotations" / "instances_val.json"
        print(report(args.report, args.bootstrap, list(dict.fromkeys(["maskrcnn", *args.baseline])), gt=gt))
        if args.picture is not None:
            print(f"wrote {picture(args.report, data['crops'], args.picture, args.picture_variants, gt=gt)}")
    return 0


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["stock", "maskrcnn", "dacseg"])
    parser.add_argument("--seeds", nargs="+", type=number_arg(int, low=0), default=[0, 1, 2])
    parser.add_argument("--data-path", type=Path, default=DEFAULT_DATA,
                        help="BioImLab labelme root or a COCO-layout root with train and val (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("crossings_runs"), help="folder of the runs' JSON files")
    parser.add_argument("--report", type=Path, default=None, metavar="RUNS",
                        help="only print the tables of the runs saved in RUNS (no training)")
    parser.add_argument("--baseline", nargs="+", choices=sorted(VARIANTS), default=[], metavar="VARIANT",
                        help="with --report: also the differences from these variants (besides maskrcnn)")
    parser.add_argument("--picture", type=Path, default=None, metavar="PNG",
                        help="with --report: also draw 6 val crossings, the ground truth and each of "
                             "--picture-variants (seed 0)")
    parser.add_argument("--picture-variants", nargs="+", choices=sorted(VARIANTS), default=["maskrcnn", "dacseg"],
                        metavar="VARIANT", help="the models drawn by --picture (default: %(default)s)")
    parser.add_argument("--evals", type=number_arg(int, low=1), default=Setting.evals,
                        help="val scorings along the way (default %(default)s)")
    parser.add_argument("--steps", type=number_arg(int, low=1), default=Setting.steps,
                        help="optimizer steps (default %(default)s)")
    parser.add_argument("--train-data", choices=("crops", "whole", "both"), default=Setting.train_data)
    parser.add_argument("--crop-size", type=number_arg(int, low=64), default=Setting.crop_size,
                        help="crop side in pixels (default %(default)s; --picture uses the saved runs' own)")
    parser.add_argument("--rois-per-image", type=number_arg(int, low=1), default=Setting.rois_per_image,
                        help="sampled RoIs per training image (default %(default)s)")
    parser.add_argument("--synthetic", type=number_arg(int, low=0), default=0,
                        help="add the crossing crops of N synthetic spreads to training (default 0)")
    parser.add_argument("--shape-codebook", type=Path, default=None, metavar="PT",
                        help="codebook of the shape-prior variants, built from the train split only (default: "
                             "OUT/shape_codebook.pt, built there from the train images when absent)")
    parser.add_argument("--save-dir", type=Path, default=None, help="also save each model as a train.py checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=Setting.device,
                        help="train and score on the CPU or a GPU; a setting of its own, so the runs of one never "
                             "resume or pair with the other's (default: %(default)s)")
    parser.add_argument("-j", "--workers", type=number_arg(int, low=0), default=1)
    parser.add_argument("--bootstrap", type=number_arg(int, low=100), default=1000, help="bootstrap draws")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.report is not None:
        return print_report(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_crossings.py: error: --device cuda: torch sees no CUDA device here")
    setting = Setting(crop_size=args.crop_size, train_data=args.train_data, steps=args.steps, evals=args.evals,
                      synthetic=args.synthetic, rois_per_image=args.rois_per_image, device=args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# bench_crossings: {setting}\n# {where}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    check_out(args.out, setting)
    with tempfile.TemporaryDirectory(prefix="bench_crossings_") as work:
        data = prepare(args.data_path, Path(work), setting)
        if any(VARIANTS[name].shape_prior for name in args.variants):
            data["codebook"] = args.shape_codebook or shape_codebook(data["whole"], args.out / "shape_codebook.pt")
        shutil.copyfile(data["crops"] / "annotations" / "instances_val.json", args.out / VAL_CROPS)
        for seed in args.seeds:
            for name in args.variants:
                path = args.out / f"{name}_seed{seed}.json"
                if path.exists():
                    print(f"{name} seed {seed}: kept {path} (same setting)", flush=True)
                    continue
                run = train_and_score(name, seed, setting, data, args.workers, args.save_dir)
                path.write_text(json.dumps(dataclasses.asdict(run)) + "\n")
                print(f"{name} seed {seed}: {run.steps} steps in {run.train_s:.0f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
