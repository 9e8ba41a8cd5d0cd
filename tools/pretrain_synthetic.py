"""Pretrain on synthetic spreads made to look like a lab's images, then fine-tune on the lab's images: one command.

    python tools/pretrain_synthetic.py --data-path data/mylab --output-dir runs/mylab
    python tools/pretrain_synthetic.py --data-path data/mylab --output-dir runs/mylab --backbone resnet18 \\
        --synth-images 40 --pretrain-epochs 8 --epochs 40            # a CPU-sized run

1. looks at the lab's training split: its stain (bright-on-dark or dark-on-bright), its median image size and its
   median chromosome area;
2. generates ``--synth-images`` matching spreads (``tools/synth_metaphase.py``: the same stain and size, chromosomes
   scaled to the same area) into ``OUT/synth``;
3. trains on them (``OUT/pretrain``);
4. fine-tunes on the lab's data from the last pretraining checkpoint through ``train.py --pretrained``
   (``OUT/finetune``), scored on the lab's validation split.

Any other flag is a ``train.py`` flag and goes to both trainings (model flags such as ``--backbone``, ``--min-size``
or ``--anchor-sizes`` must agree between them). A step already done with the same settings (the synthetic set, the
pretraining's last checkpoint) is reused, so a second lab or another fine-tuning budget only pays for what changed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from errors import DaCSegError, UserError, print_error  # noqa: E402
from my_dataset_chromosome import ChromosomeDataset  # noqa: E402
from tools.synth_metaphase import SynthConfig, generate, image_seed, render_metaphase  # noqa: E402
from train_utils import stain  # noqa: E402
from train_utils.cli import ArgumentParser, number_arg  # noqa: E402

SYNTH_VAL_IMAGES = 2
_PROBE_IMAGES = 3


@dataclass(frozen=True)
class LabLook:
    """What the synthetic spreads must match: the stain, the image size and the chromosomes' size in pixels."""

    polarity: str
    width: int
    height: int
    median_area: float
    num_images: int


def lab_look(root: Path, split: str) -> LabLook:
    """The look of the lab's ``split``: the majority stain polarity, the median image size and chromosome area."""
    dataset = ChromosomeDataset(root, split=split)
    if dataset.num_instances == 0:
        raise UserError(f"{dataset.ann_file} has no annotated instances to match")
    doc = json.loads(Path(dataset.ann_file).read_text())
    widths = [int(image["width"]) for image in doc["images"]]
    heights = [int(image["height"]) for image in doc["images"]]
    areas = [float(ann["area"]) for ann in doc["annotations"] if float(ann.get("area") or 0) > 0]
    polarity, _ = stain.majority(stain.dataset_polarities(dataset).values())
    return LabLook(polarity, int(statistics.median(widths)), int(statistics.median(heights)),
                   float(statistics.median(areas)), len(doc["images"]))


def synth_config_for(look: LabLook) -> SynthConfig:
    """Synthetic settings of the lab's stain and size, with chromosomes scaled so that their median area matches
    (measured on a few probe spreads at scale 1)."""
    config = SynthConfig(width=look.width, height=look.height,
                         stain="qband" if look.polarity == stain.BRIGHT_ON_DARK else "gband")
    areas = []
    for index in range(_PROBE_IMAGES):
        _, annotations = render_metaphase(image_seed(0, "probe", index), config)
        areas += [float(ann["area"]) for ann in annotations]
    scale = float(np.clip(np.sqrt(look.median_area / statistics.median(areas)), 0.2, 5.0))
    return SynthConfig(width=look.width, height=look.height, stain=config.stain, chromosome_scale=round(scale, 3))


def make_synthetic(out: Path, config: SynthConfig, num_images: int, seed: int, workers: int) -> None:
    """``out`` with train and val splits of ``config``; kept when it already holds exactly these."""
    for split, count, split_seed in (("train", num_images, seed), ("val", SYNTH_VAL_IMAGES, seed + 1)):
        ann_file = out / "annotations" / f"instances_{split}.json"
        if ann_file.is_file():
            info = json.loads(ann_file.read_text()).get("info", {})
            written = json.loads(ann_file.read_text()).get("images", [])
            if info.get("config") == asdict(config) and info.get("seed") == split_seed and len(written) == count:
                print(f"pretrain: reusing {count} synthetic {split} images in {out}", flush=True)
                continue
        generate(out, count, split, split_seed, config, workers)


def last_checkpoint(run: Path, epochs: int) -> Path:
    return run / f"model_{epochs - 1}.pth"


def pretrain(synth: Path, run: Path, epochs: int, train_flags: list[str]) -> Path:
    """Train on the synthetic set; returns the last checkpoint (reused when the run is already there)."""
    checkpoint = last_checkpoint(run, epochs)
    if checkpoint.is_file():
        print(f"pretrain: reusing {checkpoint}", flush=True)
        return checkpoint
    started = time.perf_counter()
    code = train.main(["--data-path", str(synth), "--output-dir", str(run), "--epochs", str(epochs),
                       "--eval-interval", str(epochs), "--keep-last", "1", *train_flags])
    if code != 0:
        raise SystemExit(code)
    print(f"pretrain: {epochs} epoch(s) on synthetic spreads in {time.perf_counter() - started:.0f} s -> "
          f"{checkpoint}", flush=True)
    return checkpoint


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                            epilog="Other flags are train.py flags for both trainings (python train.py --help).")
    parser.add_argument("--data-path", type=Path, required=True, metavar="DIR",
                        help="the lab's dataset root (images/, annotations/instances_<split>.json)")
    parser.add_argument("--output-dir", type=Path, required=True, metavar="DIR",
                        help="synth/, pretrain/ and finetune/ go here")
    parser.add_argument("--train-split", default="train", metavar="NAME", help="the lab's split to match and fine-tune on")
    parser.add_argument("--val-split", default="val", metavar="NAME", help="the lab's split the fine-tuning is scored on")
    parser.add_argument("--synth-images", type=number_arg(int, low=1), default=200, metavar="N",
                        help="synthetic training spreads")
    parser.add_argument("--pretrain-epochs", type=number_arg(int, low=1), default=12, metavar="N",
                        help="epochs over the synthetic spreads")
    parser.add_argument("--epochs", type=number_arg(int, low=1), default=121, metavar="N",
                        help="fine-tuning epochs on the lab's images (train.py's default)")
    parser.add_argument("--synth-seed", type=number_arg(int, low=0), default=0, metavar="S",
                        help="seed of the synthetic spreads (the validation split uses S+1)")
    parser.add_argument("--synth-workers", type=number_arg(int, low=1), default=1, metavar="N",
                        help="processes generating the spreads")
    parser.add_argument("--skip-finetune", action="store_true",
                        help="stop after the pretraining (its checkpoint then goes to train.py --pretrained)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, train_flags = get_args_parser().parse_known_args(argv)
    for flag in ("--data-path", "--output-dir", "--epochs", "--pretrained", "--resume", "--train-split", "--val-split"):
        if any(item == flag or item.startswith(flag + "=") for item in train_flags):
            print(f"pretrain_synthetic.py: error: {flag} is this tool's to set", file=sys.stderr)
            return 2
    try:
        look = lab_look(args.data_path, args.train_split)
        config = synth_config_for(look)
        print(f"pretrain: the lab's {look.num_images} {args.train_split} image(s) are {look.polarity}, median "
              f"{look.width}x{look.height}, median chromosome {look.median_area:.0f} px^2 -> synthetic "
              f"--stain {config.stain} --size {config.width}x{config.height} --chromosome-scale "
              f"{config.chromosome_scale:g}", flush=True)
        synth = args.output_dir / "synth"
        make_synthetic(synth, config, args.synth_images, args.synth_seed, args.synth_workers)
        checkpoint = pretrain(synth, args.output_dir / "pretrain", args.pretrain_epochs, train_flags)
    except DaCSegError as err:
        print_error(err)
        return 2
    if args.skip_finetune:
        return 0
    print(f"pretrain: fine-tuning on {args.data_path} from {checkpoint}", flush=True)
    return train.main(["--data-path", str(args.data_path), "--output-dir", str(args.output_dir / "finetune"),
                       "--train-split", args.train_split, "--val-split", args.val_split, "--epochs", str(args.epochs),
                       "--pretrained", str(checkpoint), *train_flags])


if __name__ == "__main__":
    sys.exit(main())
