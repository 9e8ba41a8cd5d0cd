"""Build the shape codebook of DaCSeg's shape prior (``--shape-prior``) from a COCO-layout split.

    python tools/build_shape_codebook.py --data-path ROOT [--split train] --out codebook.pt [--k 128] [--epochs 30]

Every annotated instance mask is cropped to its tight box and resized to 28x28 the way the mask targets are
(``project_masks_on_boxes``: RoIAlign on the mask). A small convolutional autoencoder (``network_files.shape_prior``:
28 -> 14 -> 7 -> 4 with stride-2 convs, the decoder mirrored, BCE) learns the crops, each seen in a random one of its
8 quarter turns and flips (exact on a box crop, unlike a free rotation, which would change the box). 10% of the
crops are held back and their reconstruction IoU printed. k-means (k-means++ start, Lloyd steps) on the codes of
every crop in all 8 orientations then gives ``--k`` centres per class. The file holds the autoencoder, the centres,
how many crops each centre won, and the settings; it loads with ``torch.load(weights_only=True)``. A picture of the
decoded centres, most frequent first, goes to ``--picture`` (default: beside ``--out``, as .png).

Build it from the training split only: the codebook must not have seen the images a model is scored on.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.models.detection.roi_heads import project_masks_on_boxes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from errors import DaCSegError, UserError, print_error  # noqa: E402
from my_dataset_chromosome import ChromosomeDataset  # noqa: E402
from network_files.shape_prior import MASK_SIZE, ShapeAutoencoder, decode_centres, save_codebook  # noqa: E402
from train_utils.cli import ArgumentParser, number_arg  # noqa: E402

HELD_BACK = 0.1  # fraction of the crops kept out of training, to measure reconstruction


def mask_crops(dataset: ChromosomeDataset) -> tuple[Tensor, Tensor]:
    """``[N, 28, 28]`` float crops of every instance mask of ``dataset`` (its box, RoIAlign as the mask targets) and
    their labels ``[N]``."""
    crops, labels = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        masks = target["masks"].as_subclass(Tensor)
        if len(masks) == 0:
            continue
        boxes = target["boxes"].as_subclass(Tensor).float()
        crops.append(project_masks_on_boxes(masks, boxes, torch.arange(len(masks)), MASK_SIZE))
        labels.append(target["labels"])
    if not crops:
        return torch.zeros(0, MASK_SIZE, MASK_SIZE), torch.zeros(0, dtype=torch.int64)
    return torch.cat(crops), torch.cat(labels)


def random_dihedral(masks: Tensor, generator: torch.Generator) -> Tensor:
    """Each ``[N, S, S]`` mask in a random one of its 8 quarter turns and flips."""
    flips = torch.rand(3, len(masks), 1, 1, generator=generator) < 0.5
    masks = torch.where(flips[0], masks.flip(-1), masks)
    masks = torch.where(flips[1], masks.flip(-2), masks)
    return torch.where(flips[2], masks.transpose(-1, -2), masks)


def all_dihedral(masks: Tensor) -> Tensor:
    """``[8N, S, S]``: every mask in all of its 8 quarter turns and flips."""
    turns = [torch.rot90(masks, quarter, dims=(-2, -1)) for quarter in range(4)]
    return torch.cat(turns + [turn.flip(-1) for turn in turns])


@torch.no_grad()
def reconstruction_iou(autoencoder: ShapeAutoencoder, crops: Tensor) -> float:
    """Mean IoU of the reconstructions with the ``[N, S, S]`` crops, both cut at 0.5 (NaN without crops)."""
    if len(crops) == 0:
        return float("nan")
    autoencoder.eval()
    truth = crops > 0.5
    found = autoencoder(crops[:, None])[:, 0] > 0
    union = (truth | found).sum(dim=(1, 2)).clamp(min=1)
    return float(((truth & found).sum(dim=(1, 2)) / union).mean())


def train_autoencoder(crops: Tensor, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                      held_back: Tensor | None = None, log: Callable[[str], None] = print) -> ShapeAutoencoder:
    """Train the autoencoder on ``[N, 28, 28]`` crops (random quarter turns and flips, BCE, Adam with a cosine
    decay); logs the loss and, with ``held_back`` crops, their reconstruction IoU after each epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    autoencoder = ShapeAutoencoder()
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(crops) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * steps_per_epoch))
    start = time.perf_counter()
    for epoch in range(epochs):
        autoencoder.train()
        total = 0.0
        for batch in torch.randperm(len(crops), generator=generator).split(batch_size):
            masks = random_dihedral(crops[batch], generator)[:, None]
            loss = F.binary_cross_entropy_with_logits(autoencoder(masks), masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        held = "" if held_back is None else f", held-back IoU {reconstruction_iou(autoencoder, held_back):.3f}"
        log(f"epoch {epoch + 1}/{epochs}: loss {total / max(1, len(crops)):.4f}{held} "
            f"({time.perf_counter() - start:.0f} s)")
    return autoencoder.eval()


def kmeans(points: Tensor, k: int, iterations: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means of ``[N, D]`` points: k-means++ start, then Lloyd steps until no point moves (at most
    ``iterations``). Returns the centres ``[k, D]`` and the cluster sizes ``[k]``. An emptied cluster restarts at
    the point farthest from its centre."""
    if len(points) < k:
        raise UserError(f"k-means of {len(points)} points into {k} clusters: need at least as many points")
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    nearest = torch.cdist(points, centres)[:, 0] ** 2
    for _ in range(1, k):
        chosen = torch.multinomial(nearest.clamp(min=1e-12), 1, generator=generator) if nearest.sum() > 0 \
            else torch.randint(len(points), (1,), generator=generator)
        centres = torch.cat([centres, points[chosen]])
        nearest = torch.minimum(nearest, torch.cdist(points, points[chosen])[:, 0] ** 2)
    assignment = torch.full((len(points),), -1, dtype=torch.int64)
    for _ in range(iterations):
        distances = torch.cdist(points, centres)
        new = distances.argmin(dim=1)
        if torch.equal(new, assignment):
            break
        assignment = new
        sizes = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        centres = torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], centres)
        for empty in torch.where(sizes == 0)[0].tolist():
            farthest = distances.gather(1, assignment[:, None])[:, 0].argmax()
            centres[empty] = points[farthest]
    sizes = torch.bincount(torch.cdist(points, centres).argmin(dim=1), minlength=k)
    return centres, sizes


@torch.no_grad()
def class_centres(autoencoder: ShapeAutoencoder, crops: Tensor, labels: Tensor, num_classes: int, k: int,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """``[C, k, D]`` centres and ``[C, k]`` cluster sizes: k-means of each class's codes in all 8 orientations."""
    centres, sizes = [], []
    for label in range(1, num_classes + 1):
        own = crops[labels == label]
        if len(own) == 0:
            raise UserError(f"class {label} has no annotated instance to build its shapes from")
        codes = autoencoder.encoder(all_dihedral(own)[:, None])
        if len(codes) < k:
            raise UserError(f"class {label} has {len(own)} instance(s), {len(codes)} crops in all orientations: "
                            f"fewer than --k {k}")
        found, found_sizes = kmeans(codes, k, seed=seed)
        centres.append(found)
        sizes.append(found_sizes)
    return torch.stack(centres), torch.stack(sizes)


def codebook_picture(templates: Tensor, sizes: Tensor, path: Path, scale: int = 3, columns: int = 16) -> Path:
    """A grid PNG of the ``[C, K, S, S]`` decoded centres, largest cluster first, one block of rows per class."""
    rows_of = math.ceil(templates.shape[1] / columns)
    side, gap = templates.shape[-1] * scale, 2
    canvas = np.full((templates.shape[0] * rows_of * (side + gap) + gap, min(columns, templates.shape[1]) * (side + gap)
                      + gap), 64, dtype=np.uint8)
    for c, (shapes, counts) in enumerate(zip(templates, sizes)):
        for slot, index in enumerate(counts.argsort(descending=True).tolist()):
            tile = (shapes[index].numpy() * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
            row, column = c * rows_of + slot // columns, slot % columns
            y, x = gap + row * (side + gap), gap + column * (side + gap)
            canvas[y:y + side, x:x + side] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="build_shape_codebook.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", type=Path, required=True, metavar="ROOT", help="COCO-layout dataset root")
    parser.add_argument("--split", default="train", metavar="NAME",
                        help="split whose masks are used: annotations/instances_NAME.json (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, metavar="PT", help="the codebook file to write")
    parser.add_argument("--picture", type=Path, default=None, metavar="PNG",
                        help="grid of the decoded centres (default: --out with .png)")
    parser.add_argument("--k", type=number_arg(int, low=1), default=128, help="centres per class (default: %(default)s)")
    parser.add_argument("--epochs", type=number_arg(int, low=1), default=30,
                        help="autoencoder epochs over the crops (default: %(default)s)")
    parser.add_argument("-b", "--batch-size", type=number_arg(int, low=1), default=64, metavar="N",
                        help="crops per autoencoder step (default: %(default)s)")
    parser.add_argument("--lr", type=number_arg(float, 0.0, low_open=True), default=3e-3,
                        help="Adam learning rate, decayed to 0 by a cosine (default: %(default)s)")
    parser.add_argument("--seed", type=number_arg(int, low=0), default=0, help="random seed (default: %(default)s)")
    return parser


def build(args) -> None:
    start = time.perf_counter()
    dataset = ChromosomeDataset(args.data_path, args.split)
    crops, labels = mask_crops(dataset)
    if len(crops) == 0:
        raise UserError(f"{dataset.ann_file} has no annotated instances to build shapes from")
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(args.seed))
    held = order[:int(len(crops) * HELD_BACK)]
    trained = order[len(held):]
    print(f"{len(crops)} instance crops of {len(dataset)} images ({dataset.ann_file}); {len(held)} held back "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    autoencoder = train_autoencoder(crops[trained], args.epochs, args.batch_size, args.lr, args.seed,
                                    held_back=crops[held], log=lambda line: print(line, flush=True))
    held_iou = reconstruction_iou(autoencoder, crops[held])
    centres, sizes = class_centres(autoencoder, crops, labels, dataset.num_classes, args.k, args.seed)
    settings = {"data_path": str(args.data_path), "split": args.split, "num_crops": len(crops), "k": args.k,
                "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "held_back_iou": held_iou, "class_names": [dataset.label_names[c] for c in sorted(dataset.label_names)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_codebook(args.out, autoencoder, centres, sizes, settings)
    picture = codebook_picture(decode_centres(autoencoder, centres), sizes, args.picture or args.out.with_suffix(".png"))
    print(f"wrote {args.out} ({dataset.num_classes} class(es) x {args.k} shapes; held-back reconstruction IoU "
          f"{held_iou:.3f}) and {picture} in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        build(args)
    except DaCSegError as exc:
        print_error(exc, "build_shape_codebook.py")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
