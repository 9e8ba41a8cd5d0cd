"""Stain polarity: bright chromosomes on a dark field (Q-band, DAPI fluorescence) or dark ones on a light field
(G-band, Giemsa). A model learns one look; images of the other are inverted before it sees them.

``--stain`` (training, ``validation.py``, ``predict.py``): ``auto`` brings every image to the model's polarity (in
training: the majority of the training images), ``as-is`` uses images as they are, ``invert`` inverts every image.
"""
from __future__ import annotations

import sys
from collections import Counter
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError
from my_dataset_chromosome import ChromosomeDataset, read_image

BRIGHT_ON_DARK = "bright-on-dark"
DARK_ON_BRIGHT = "dark-on-bright"
POLARITIES = (BRIGHT_ON_DARK, DARK_ON_BRIGHT)
STAIN_MODES = ("auto", "as-is", "invert")
_MAX_PIXELS = 1 << 20  # statistics on at most about a million pixels (a regular subsample of a larger image)


def polarity_contrast(image: torch.Tensor | np.ndarray) -> float:
    """How far the bright tail stands out from the background, minus how far the dark tail does, in units of the
    image's own range: > 0 for bright objects on a dark field, < 0 for dark objects on a light field.

    It looks at the grey level of the background, taken as the median (the empty field is most of a metaphase image,
    whatever the nuclei, debris or uneven light), against the 0.1st and 99.9th percentiles, where the chromosomes and
    nuclei lie. Any dtype or bit depth (the statistic is scale-free); RGB is averaged to grey. ``image`` is
    ``[C, H, W]`` or ``[H, W]`` (a tensor, as ``read_image`` gives), or a NumPy ``[H, W]`` / ``[H, W, C]`` array.
    """
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        grey = array.mean(axis=-1) if array.ndim == 3 else array
    else:
        array = image.detach().float().cpu()
        grey = (array.mean(dim=0) if array.ndim == 3 else array).numpy()
    if grey.ndim != 2 or grey.size == 0:
        raise ValueError(f"polarity needs a [C, H, W] or [H, W] image, got shape {list(image.shape)}")
    step = max(1, int(np.ceil(np.sqrt(grey.size / _MAX_PIXELS))))
    low, background, high = np.percentile(grey[::step, ::step], [0.1, 50.0, 99.9])
    spread = float(high - low)
    if spread <= 0:
        return 0.0
    return float((high - background) - (background - low)) / spread


def detect_polarity(image: torch.Tensor | np.ndarray) -> str:
    """``BRIGHT_ON_DARK`` or ``DARK_ON_BRIGHT`` (see ``polarity_contrast``; a flat image counts as bright-on-dark)."""
    return DARK_ON_BRIGHT if polarity_contrast(image) < 0 else BRIGHT_ON_DARK


def majority(polarities: Iterable[str]) -> tuple[str, dict[str, int]]:
    """The most common polarity (bright-on-dark on a tie) and the count of each."""
    counts = Counter(polarities)
    split = {p: counts.get(p, 0) for p in POLARITIES}
    return (DARK_ON_BRIGHT if split[DARK_ON_BRIGHT] > split[BRIGHT_ON_DARK] else BRIGHT_ON_DARK), split


def needs_inversion(polarity: str, target: str | None, mode: str) -> bool:
    """Whether an image of ``polarity`` is inverted for a model of polarity ``target`` (None: not known) under
    ``--stain mode``."""
    if mode not in STAIN_MODES:
        raise ValueError(f"unknown --stain mode {mode!r}; choose one of {', '.join(STAIN_MODES)}")
    if mode == "invert":
        return True
    return mode == "auto" and target is not None and polarity != target


def images_to_invert(polarities: Mapping[int, str], target: str | None, mode: str) -> set[int]:
    """The ids (of ``{id: polarity}``) whose images are inverted under ``--stain mode`` for a ``target`` model."""
    return {key for key, polarity in polarities.items() if needs_inversion(polarity, target, mode)}


def invert(image: torch.Tensor) -> torch.Tensor:
    """The other look of a float image in 0..1."""
    return 1.0 - image


def dataset_polarities(dataset: ChromosomeDataset, show_progress: bool = True) -> dict[int, str]:
    """``{image_id: polarity}`` of every image of the dataset (each is read once, with a progress bar)."""
    return {
        image_id: detect_polarity(read_image(dataset.image_path(index)))
        for index, image_id in enumerate(tqdm(dataset.ids, desc=f"stain of {dataset.split} images", unit="img",
                                              leave=False, disable=None if show_progress else True))
    }


def checkpoint_polarity(checkpoint: Mapping, path: object, mode: str, announce: bool = True) -> str | None:
    """The polarity a checkpoint's model was trained on; None for a checkpoint from before polarities were recorded
    (its images are then used as they are, as before), with ``old_checkpoint_note`` on stderr under ``--stain auto``
    when ``announce``. A recorded value that is no polarity is a ``UserError`` (it would invert every image)."""
    polarity = (checkpoint.get("stain") or {}).get("polarity")
    if polarity is not None and polarity not in POLARITIES:
        raise UserError(f"{path} records the stain polarity {polarity!r}, which is neither {' nor '.join(POLARITIES)}; "
                        "it was not written by train.py or tools/export.py")
    if polarity is None and mode == "auto" and announce:
        print(old_checkpoint_note(path), file=sys.stderr)
    return polarity


def old_checkpoint_note(path: object) -> str:
    return (f"note: {path} records no stain polarity (it predates the record); images are used as they are "
            "(--stain invert inverts them)")


def match_dataset(dataset: ChromosomeDataset, target: str | None, mode: str, show_progress: bool = True,
                  find: Callable[[ChromosomeDataset], dict[int, str]] | None = None) -> None:
    """Mark the dataset's images that ``--stain mode`` inverts for a model of polarity ``target``; ``find`` gives
    the images' polarities when they are needed (default: ``dataset_polarities``)."""
    if mode == "as-is" or (mode == "auto" and target is None):
        dataset.invert_ids = set()
        return
    if mode == "auto":
        found = find(dataset) if find is not None else dataset_polarities(dataset, show_progress)
    else:
        found = dict.fromkeys(dataset.ids, "")
    dataset.invert_ids = images_to_invert(found, target, mode)
