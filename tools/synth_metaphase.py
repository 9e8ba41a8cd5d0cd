"""Synthetic metaphase spreads with exact amodal chromosome polygons, written in the project's COCO layout.

    python tools/synth_metaphase.py --out DIR --num-images N [--split train] [--seed S] [--size 768x576]
        [--stain qband|gband] [--overlap-rate F] [--workers K] [--chromosomes 46]

Each image is a spread of chromosomes with human-karyotype lengths and centromere positions, a band pattern per
chromosome type (homologues share it), a centromere constriction, bending along a smooth centre line, crossings and
touchings at a controllable rate, unannotated interphase nuclei and debris, uneven illumination, blur and noise.
Every chromosome is drawn as a tube around its centre line; its annotation is the outline of that tube (the whole
chromosome, also where another one covers it). Annotations carry ``"overlapping"`` (the instance shares at least
20 px with the others) and ``"karyotype"`` (the chromosome type, "1".."22", "X", "Y"). Images are named
``<split>_<index>.png``, so splits share ``images/`` without clashing. The images of a split depend only on
(seed, split, index) and the arguments, so ``--workers`` does not change the output.

Speed: about 10 images of 768x576 per second on one CPU core (``bench/bench_synth.py``).
"""
from __future__ import annotations

import argparse
import math
import sys
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from errors import DaCSegError, print_error  # noqa: E402
from overlaps import MIN_OVERLAP_AREA, instance_flags, overlapping_from_rles, segmentation_rle  # noqa: E402
from tools.coco_layout import polygon_bbox_area, write_coco_split  # noqa: E402
from train_utils.cli import ArgumentParser, number_arg  # noqa: E402

# Relative length (% of the haploid genome) and centromere index (p-arm / total length) per chromosome type.
KARYOTYPE: dict[str, tuple[float, float]] = {
    "1": (8.44, 0.48), "2": (8.02, 0.39), "3": (6.83, 0.47), "4": (6.30, 0.29), "5": (6.08, 0.29),
    "6": (5.90, 0.39), "7": (5.36, 0.39), "8": (4.93, 0.34), "9": (4.80, 0.35), "10": (4.59, 0.32),
    "11": (4.61, 0.41), "12": (4.66, 0.27), "13": (3.74, 0.17), "14": (3.56, 0.19), "15": (3.46, 0.20),
    "16": (3.36, 0.41), "17": (3.25, 0.34), "18": (2.93, 0.31), "19": (2.67, 0.47), "20": (2.56, 0.45),
    "21": (1.90, 0.30), "22": (2.04, 0.30), "X": (5.12, 0.40), "Y": (2.15, 0.27),
}
AUTOSOMES = [str(i) for i in range(1, 23)]
# Where Q-banding shows a brilliant heterochromatin block (position along the chromosome, p-arm tip = 0).
QBRIGHT_BLOCKS = {"Y": 0.85, "3": 0.47, "4": 0.29, "13": 0.08, "15": 0.08, "21": 0.1, "22": 0.1}
TRISOMY_TYPES = ["21", "18", "13", "X", "X", "21"]
STAINS = ("qband", "gband")
CATEGORIES = [{"id": 1, "name": "chromosome", "supercategory": "chromosome"}]
REFERENCE_SIZE = (768, 576)
TIP_ROUNDNESS = 0.6  # how far a tip reaches beyond the centre line, in half widths (1 = a semicircle)
PERCENTILES = (5, 25, 50, 75, 95)


class SynthError(DaCSegError):
    """A bad argument or output location for the generator (one-line message)."""


@dataclass(frozen=True)
class SynthConfig:
    """Everything besides the seed that decides what an image looks like."""

    width: int = 768
    height: int = 576
    stain: str = "qband"
    overlap_rate: float = 0.07
    chromosomes: int = 46
    aneuploidy_rate: float = 0.08
    nucleus_rate: float = 0.8
    min_overlap_area: float = MIN_OVERLAP_AREA
    chromosome_scale: float = 1.0  # chromosome length and width relative to the default for the image size


@dataclass
class Chromosome:
    """One placed chromosome: a centre line with a half width at each of its points."""

    name: str
    points: np.ndarray  # [n, 2] x, y in canvas pixels (pixel i covers [i, i + 1))
    angles: np.ndarray  # [n] tangent angle at each point
    arc: np.ndarray  # [n] arc length from the first point
    half_width: np.ndarray  # [n]
    total_length: float  # tip to tip
    centromere: float  # arc position of the constriction
    flipped: bool  # band pattern runs from the last point to the first
    amplitude: float
    chromatid_dip: float


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of one image, derived from the run seed, the split name and the image index only."""
    return np.random.SeedSequence([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])


def sample_karyotype(rng: np.random.Generator, count: int, aneuploidy_rate: float) -> list[str]:
    """Chromosome types of one cell: ``count`` drawn from a normal 46,XX / 46,XY set, sometimes one more or less."""
    normal = [name for name in AUTOSOMES for _ in range(2)] + (["X", "X"] if rng.random() < 0.5 else ["X", "Y"])
    if count <= len(normal):
        keep = np.sort(rng.choice(len(normal), size=count, replace=False))
        names = [normal[i] for i in keep]
    else:
        names = normal + [str(v) for v in rng.choice(list(KARYOTYPE), size=count - len(normal))]
    if rng.random() < aneuploidy_rate:
        if rng.random() < 0.6 or len(names) <= 1:
            names.append(str(rng.choice(TRISOMY_TYPES)))
        else:
            names.pop(int(rng.integers(len(names))))
    return names


@lru_cache(maxsize=None)
def band_profile(name: str, samples: int = 256) -> np.ndarray:
    """Stain density along a chromosome type (p-arm tip first), the same in every image and for both homologues."""
    rng = np.random.default_rng(zlib.crc32(f"bands-{name}".encode()))
    relative = KARYOTYPE[name][0] / KARYOTYPE["1"][0]
    num_bands = int(round(6 + 12 * relative))
    widths = rng.gamma(4.0, 1.0, num_bands)  # no band much thinner than the others
    edges = np.cumsum(widths)[:-1] / widths.sum()
    levels = np.where(np.arange(num_bands) % 2 == int(rng.integers(2)),
                      rng.uniform(0.75, 1.0, num_bands), rng.uniform(0.35, 0.65, num_bands))
    u = (np.arange(samples) + 0.5) / samples
    profile = levels[np.searchsorted(edges, u)]
    if name in QBRIGHT_BLOCKS:
        profile = profile + 0.5 * np.exp(-0.5 * ((u - QBRIGHT_BLOCKS[name]) / 0.03) ** 2)
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.5) ** 2)
    profile = np.convolve(np.pad(profile, 6, mode="edge"), kernel / kernel.sum(), mode="valid")
    return profile.astype(np.float32)


def _centre_line(rng: np.random.Generator, length: float, max_curvature: float, step: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points, tangent angles and arc positions of a smooth random curve of ``length``, centred on its midpoint."""
    n = max(2, int(math.ceil(length / step)) + 1)
    arc = np.linspace(0.0, length, n)
    ds = length / (n - 1)
    kind = rng.random()
    if kind < 0.5:
        bend = rng.normal(0.0, 0.15)
    elif kind < 0.88:
        bend = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 1.1)
    else:
        bend = rng.choice([-1.0, 1.0]) * rng.uniform(1.1, 2.2)
    where = rng.uniform(0.25, 0.75) * length
    spread = rng.uniform(0.08, 0.45) * length + 1e-3
    weight = np.exp(-0.5 * ((arc - where) / spread) ** 2)
    curvature = bend * weight / max(weight.sum() * ds, 1e-6)
    curvature += rng.uniform(0.0, 0.6) / max(length, 1.0) * np.sin(2 * np.pi * arc / max(length, 1.0)
                                                                   + rng.uniform(0, 2 * np.pi))
    curvature = np.clip(curvature, -max_curvature, max_curvature)
    angles = np.concatenate([[0.0], np.cumsum(0.5 * (curvature[1:] + curvature[:-1]) * ds)])
    mid_angles = 0.5 * (angles[1:] + angles[:-1])
    points = np.zeros((n, 2))
    points[1:, 0] = np.cumsum(np.cos(mid_angles) * ds)
    points[1:, 1] = np.cumsum(np.sin(mid_angles) * ds)
    return points - points[n // 2], angles, arc


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _make_chromosome(rng: np.random.Generator, name: str, chr1_length: float, width: float,
                     chromatid_rate: float) -> Chromosome:
    """A chromosome of type ``name`` in a local frame (midpoint at the origin, first tangent along +x)."""
    relative, centromere_index = KARYOTYPE[name]
    total = chr1_length * relative / KARYOTYPE["1"][0] * rng.uniform(0.9, 1.1)
    half = 0.5 * width * rng.uniform(0.92, 1.08)
    half = min(half, 0.45 * total)
    length = max(total - 2 * TIP_ROUNDNESS * half, 0.5)
    points, angles, arc = _centre_line(rng, length, 0.7 / half, max(1.0, min(3.0, 0.6 * half)))
    flipped = bool(rng.random() < 0.5)
    p_fraction = 1.0 - centromere_index if flipped else centromere_index
    centromere = float(np.clip(p_fraction * total - TIP_ROUNDNESS * half, 0.0, length))
    constriction = rng.uniform(0.15, 0.32)
    half_width = half * (1 - constriction * np.exp(-0.5 * ((arc - centromere) / (0.45 * half)) ** 2))
    return Chromosome(name=name, points=points, angles=angles, arc=arc, half_width=half_width,
                      total_length=float(total), centromere=centromere, flipped=flipped,
                      amplitude=float(rng.uniform(0.75, 1.05)),
                      chromatid_dip=float(rng.uniform(0.15, 0.5)) if rng.random() < chromatid_rate else 0.0)


def _placed(chrom: Chromosome, rotation: float, anchor_local: np.ndarray, anchor: np.ndarray) -> Chromosome:
    """``chrom`` rotated by ``rotation`` and moved so that its local point ``anchor_local`` lands on ``anchor``."""
    points = _rotate(chrom.points - anchor_local, rotation) + anchor
    return Chromosome(**{**chrom.__dict__, "points": points, "angles": chrom.angles + rotation})


class _Layout:
    """Places chromosomes on the canvas: apart from each other, or deliberately across / against one."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, gap: float, max_half_width: float):
        self.rng = rng
        self.size = np.array([width, height], dtype=float)
        self.centre = self.size * (0.5 + rng.uniform(-0.08, 0.08, 2))
        self.radii = self.size * np.array([rng.uniform(0.27, 0.40), rng.uniform(0.30, 0.42)])
        self.gap = gap
        self.reach = gap + max_half_width  # how close another centre line may come to an outline
        self.occupied = np.zeros((height, width), dtype=bool)  # pixels within ``reach`` of a placed outline
        self.fields: list[TubeField | None] = []
        self.chromosomes: list[Chromosome] = []
        self.involved: list[bool] = []
        self._points = np.zeros((0, 2))
        self._half = np.zeros(0)
        self._owner = np.zeros(0, dtype=int)

    def _inside(self, points: np.ndarray, half: np.ndarray) -> np.ndarray:
        """[k] whether each of k candidate placements ``points`` [k, n, 2] lies fully in the canvas."""
        lo = (points - half[None, :, None] - 1.0).min(axis=1)
        hi = (points + half[None, :, None] + 1.0).max(axis=1)
        return (lo >= 0).all(axis=1) & (hi <= self.size).all(axis=1)

    def _crowding(self, points: np.ndarray) -> np.ndarray:
        """[k] number of centre-line points of each candidate that fall on occupied pixels."""
        x = np.clip(points[..., 0].astype(int), 0, self.occupied.shape[1] - 1)
        y = np.clip(points[..., 1].astype(int), 0, self.occupied.shape[0] - 1)
        return self.occupied[y, x].sum(axis=1)

    def _clashes(self, points: np.ndarray, half: np.ndarray, ignore: int) -> np.ndarray:
        """[k] number of centre-line points of each candidate closer than allowed to a chromosome but ``ignore``."""
        keep = self._owner != ignore
        if not keep.any():
            return np.zeros(points.shape[0], dtype=int)
        diff = points[:, :, None, :] - self._points[keep][None, None]
        dist2 = (diff ** 2).sum(-1)
        allowed = half[None, :, None] + self._half[keep][None, None] + self.gap
        return (dist2 < allowed ** 2).sum(axis=(1, 2))

    def _add(self, chrom: Chromosome, involved: bool, target: int = -1) -> None:
        index = len(self.chromosomes)
        self.chromosomes.append(chrom)
        self.involved.append(involved)
        if target >= 0:
            self.involved[target] = True
        self._points = np.concatenate([self._points, chrom.points])
        self._half = np.concatenate([self._half, chrom.half_width])
        self._owner = np.concatenate([self._owner, np.full(len(chrom.points), index)])
        field = tube_field(chrom, self.reach + 1.0, self.occupied.shape)
        if field is not None:
            x0, x1, y0, y1 = field.window
            self.occupied[y0:y1, x0:x1] |= (field.dist - field.half < self.reach).reshape(y1 - y0, x1 - x0)
        self.fields.append(field)

    def place_apart(self, chrom: Chromosome, tries: int = 32) -> None:
        rng = self.rng
        radius = np.sqrt(rng.random(tries))
        phi = rng.uniform(0, 2 * np.pi, tries)
        centres = self.centre + self.radii * np.stack([radius * np.cos(phi), radius * np.sin(phi)], axis=1)
        rotations = rng.uniform(0, 2 * np.pi, tries)
        cos, sin = np.cos(rotations), np.sin(rotations)
        x, y = chrom.points[:, 0], chrom.points[:, 1]
        points = np.stack([x[None] * cos[:, None] - y[None] * sin[:, None],
                           x[None] * sin[:, None] + y[None] * cos[:, None]], axis=-1) + centres[:, None]
        inside = self._inside(points, chrom.half_width)
        if not inside.any():  # larger than the spread allows: put it in the middle of the canvas
            self._add(_placed(chrom, 0.0, np.zeros(2), self.size / 2), involved=False)
            return
        clashes = np.where(inside, self._crowding(points), np.iinfo(np.int64).max)
        best = int(np.argmin(clashes))  # the first clash-free try, or the least crowded one
        self._add(_placed(chrom, float(rotations[best]), np.zeros(2), centres[best]),
                  involved=bool(clashes[best] > 0))

    def place_against(self, chrom: Chromosome, crossing: bool, tries: int = 8) -> bool:
        """Put ``chrom`` across (or with its end against) a placed chromosome; False when nothing fits."""
        rng = self.rng
        free = [i for i, used in enumerate(self.involved) if not used]
        target = int(rng.choice(free)) if free else int(rng.integers(len(self.chromosomes)))
        other = self.chromosomes[target]
        for _ in range(tries):
            at = rng.uniform(0.15, 0.85) * other.arc[-1]
            anchor = np.array([np.interp(at, other.arc, other.points[:, 0]),
                               np.interp(at, other.arc, other.points[:, 1])])
            tangent = float(np.interp(at, other.arc, other.angles))
            if crossing:
                own = rng.uniform(0.25, 0.75) * chrom.arc[-1]
                direction = tangent + rng.choice([-1.0, 1.0]) * rng.uniform(np.radians(30), np.radians(90))
            else:  # the first tip presses on the side of the target
                own = 0.0
                side = rng.choice([-1.0, 1.0])
                normal = np.array([-math.sin(tangent), math.cos(tangent)]) * side
                depth = rng.uniform(0.2, 0.9) * chrom.half_width[0]
                anchor = anchor + normal * (float(np.interp(at, other.arc, other.half_width))
                                            + chrom.half_width[0] - depth)
                direction = tangent + side * np.pi / 2 + rng.uniform(-0.6, 0.6)
            own_point = np.array([np.interp(own, chrom.arc, chrom.points[:, 0]),
                                  np.interp(own, chrom.arc, chrom.points[:, 1])])
            rotation = direction - float(np.interp(own, chrom.arc, chrom.angles))
            candidate = _placed(chrom, rotation, own_point, anchor)
            points = candidate.points[None]
            if self._inside(points, chrom.half_width)[0] and self._clashes(points, chrom.half_width, target)[0] == 0:
                self._add(candidate, involved=True, target=target)
                return True
        return False


def _pixel_grid(x0: int, x1: int, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5
    return np.broadcast_to(xs[None], (y1 - y0, x1 - x0)).ravel(), np.repeat(ys, x1 - x0)


def _window(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    x0, y0 = max(int(math.floor(lo[0])), 0), max(int(math.floor(lo[1])), 0)
    x1, y1 = min(int(math.ceil(hi[0])) + 1, shape[1]), min(int(math.ceil(hi[1])) + 1, shape[0])
    return (x0, x1, y0, y1) if x1 > x0 and y1 > y0 else None


@dataclass
class TubeField:
    """Per pixel of a window: distance to a chromosome's centre line, arc position of the nearest point there and
    the half width at that point. Distances beyond a tip are stretched so that ``dist < half`` is the outline."""

    window: tuple[int, int, int, int]  # x0, x1, y0, y1
    dist: np.ndarray
    arc: np.ndarray
    half: np.ndarray


def tube_field(chrom: Chromosome, margin: float, shape: tuple[int, int], chunk: int = 6) -> TubeField | None:
    """The :class:`TubeField` of ``chrom`` over its bounding window grown by ``margin`` (None if off the canvas).

    The centre line is cut into runs of ``chunk`` segments; each run is compared only with the pixels of its own
    window, so long chromosomes cost little more than short ones.
    """
    reach = float(chrom.half_width.max()) + margin
    window = _window(chrom.points.min(0) - reach, chrom.points.max(0) + reach, shape)
    if window is None:
        return None
    x0, x1, y0, y1 = window
    best = np.full((y1 - y0, x1 - x0), np.inf, dtype=np.float32)
    arc = np.zeros_like(best)
    beyond = np.zeros_like(best)
    points = chrom.points.astype(np.float32)
    for first in range(0, len(points) - 1, chunk):
        run = points[first:first + chunk + 1]
        sub = _window(run.min(0) - reach, run.max(0) + reach, shape)
        if sub is None:
            continue
        sx0, sx1, sy0, sy1 = sub
        seg = np.diff(run, axis=0)
        seg_len2 = np.maximum((seg ** 2).sum(1), 1e-6)
        rx = (np.arange(sx0, sx1, dtype=np.float32) + 0.5)[None, :, None] - run[:-1, 0]
        ry = (np.arange(sy0, sy1, dtype=np.float32) + 0.5)[:, None, None] - run[:-1, 1]
        t_line = (rx * seg[:, 0] + ry * seg[:, 1]) / seg_len2
        t = np.clip(t_line, 0.0, 1.0)
        dist2 = np.square(rx - t * seg[:, 0]) + np.square(ry - t * seg[:, 1])
        nearest = dist2.argmin(axis=-1)[..., None]
        run_best = np.take_along_axis(dist2, nearest, -1)[..., 0]
        t_near = np.take_along_axis(t, nearest, -1)[..., 0]
        run_len = np.sqrt(seg_len2)[nearest[..., 0]]
        view = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
        closer = run_best < best[view]
        best[view] = np.where(closer, run_best, best[view])
        arc[view] = np.where(closer, chrom.arc[first + nearest[..., 0]] + t_near * run_len, arc[view])
        past = (np.take_along_axis(t_line, nearest, -1)[..., 0] - t_near) * run_len
        beyond[view] = np.where(closer, past, beyond[view])
    beyond = beyond.ravel()  # along the axis past a tip; 0 elsewhere
    dist = np.sqrt(best.ravel() + (1.0 / TIP_ROUNDNESS ** 2 - 1.0) * beyond * beyond)
    arc = arc.ravel()
    half = np.interp(arc, chrom.arc, chrom.half_width).astype(np.float32)
    return TubeField(window, dist, arc, half)


def render_chromosome(density: np.ndarray, chrom: Chromosome, field: TubeField, band_contrast: float,
                      rng: np.random.Generator, grain: float = 0.12) -> None:
    """Add the stain density of ``chrom`` to ``density`` [H, W] inside its field's window."""
    x0, x1, y0, y1 = field.window
    edge = np.clip(0.5 + field.half - field.dist, 0.0, 1.0)
    inside = edge > 0
    if not inside.any():
        return
    dist, arc, half, edge = field.dist[inside], field.arc[inside], field.half[inside], edge[inside]
    tip_half = float(chrom.half_width[0])
    u = (arc + TIP_ROUNDNESS * tip_half) / chrom.total_length
    u = 1.0 - u if chrom.flipped else u
    bands = band_profile(chrom.name)
    band = np.interp(u, (np.arange(len(bands)) + 0.5) / len(bands), bands)
    band = 1.0 - band_contrast * (1.0 - band)
    band *= 1.0 - 0.35 * np.exp(-0.5 * ((arc - chrom.centromere) / (0.6 * tip_half)) ** 2)
    across = np.clip(dist / np.maximum(half, 1e-3), 0.0, 1.0)
    profile = 0.45 + 0.55 * np.sqrt(1.0 - across ** 2)
    if chrom.chromatid_dip:
        profile *= 1.0 - chrom.chromatid_dip * np.exp(-0.5 * (across / 0.22) ** 2)
    values = (chrom.amplitude * band * profile * edge).astype(np.float32)
    values *= 1.0 + grain * rng.standard_normal(len(values), dtype=np.float32)
    flat = np.zeros(inside.shape[0], dtype=np.float32)
    flat[inside] = values
    density[y0:y1, x0:x1] += flat.reshape(y1 - y0, x1 - x0)


def outline_polygon(chrom: Chromosome) -> list[float]:
    """Flat polygon ``[x0, y0, x1, y1, ...]`` of the chromosome's outline (its tube with round tips), 2 decimals."""
    normal = np.stack([-np.sin(chrom.angles), np.cos(chrom.angles)], axis=1)
    left = chrom.points + normal * chrom.half_width[:, None]
    right = chrom.points - normal * chrom.half_width[:, None]
    parts = [left]
    for end, sweep_from in ((-1, 0.5 * np.pi), (0, -0.5 * np.pi)):
        radius = float(chrom.half_width[end])
        steps = max(4, int(math.ceil(radius * 1.2)))
        alpha = np.linspace(sweep_from, sweep_from - np.pi, steps + 1)[1:-1]
        along, across = TIP_ROUNDNESS * radius * np.cos(alpha), radius * np.sin(alpha)
        c, s = math.cos(chrom.angles[end]), math.sin(chrom.angles[end])
        cap = chrom.points[end] + np.stack([along * c - across * s, along * s + across * c], axis=1)
        parts.append(cap)
        if end == -1:
            parts.append(right[::-1])
    polygon = np.concatenate(parts)
    return [round(float(v), 2) for v in polygon.ravel()]


def _add_nucleus(density: np.ndarray, rng: np.random.Generator, layout: _Layout, scale: float) -> None:
    """An unannotated interphase nucleus (textured disc) or an out-of-focus glow, preferably beside the spread."""
    height, width = density.shape
    radii = np.array([rng.uniform(40, 80), rng.uniform(40, 80)]) * scale
    phi = rng.uniform(0, 2 * np.pi)
    centre = layout.centre + layout.radii * rng.uniform(1.0, 1.5) * np.array([np.cos(phi), np.sin(phi)])
    centre = np.clip(centre, 0, [width, height])
    reach = radii.max() * 1.6
    window = _window(centre - reach, centre + reach, density.shape)
    if window is None:
        return
    x0, x1, y0, y1 = window
    px, py = _pixel_grid(x0, x1, y0, y1)
    turn = rng.uniform(0, np.pi)
    dx, dy = px - centre[0], py - centre[1]
    a = (dx * math.cos(turn) + dy * math.sin(turn)) / radii[0]
    b = (-dx * math.sin(turn) + dy * math.cos(turn)) / radii[1]
    r = np.sqrt(a * a + b * b).reshape(y1 - y0, x1 - x0)
    theta = np.arctan2(b, a).reshape(r.shape)
    r *= 1.0 + sum(rng.uniform(0, 0.07) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    if rng.random() < 0.7:  # sharp textured nucleus with a faint halo
        coarse = rng.random((8, 8)).astype(np.float32)
        texture = np.asarray(Image.fromarray(coarse).resize((x1 - x0, y1 - y0), Image.BILINEAR))
        fine = rng.random((40, 40)).astype(np.float32)
        texture = 0.5 * texture + 0.5 * np.asarray(
            Image.fromarray(fine).resize((x1 - x0, y1 - y0), Image.BILINEAR))
        texture = np.clip((texture - 0.5) * 2.5 + 0.5, 0.0, 1.0)  # blotchy chromatin with dark nucleoli
        value = rng.uniform(0.4, 1.1) * np.clip((1.0 - r) * radii.min() / 8.0, 0, 1) * (0.15 + 1.1 * texture)
        value += rng.uniform(0.0, 0.15) * np.exp(-1.5 * r * r)
    else:  # out-of-focus glow with a bright core
        value = rng.uniform(0.25, 0.6) * np.exp(-2.0 * r * r) + rng.uniform(0.3, 0.8) * np.exp(-40.0 * r * r)
    density[y0:y1, x0:x1] += value.astype(np.float32)


def _add_debris(density: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Small unannotated specks anywhere, some on chromosomes."""
    height, width = density.shape
    for _ in range(int(rng.poisson(4))):
        centre = rng.uniform([0, 0], [width, height])
        sigma = rng.uniform(0.6, 2.5) * max(scale, 0.4)
        window = _window(centre - 3 * sigma, centre + 3 * sigma, density.shape)
        if window is None:
            continue
        x0, x1, y0, y1 = window
        px, py = _pixel_grid(x0, x1, y0, y1)
        r2 = ((px - centre[0]) ** 2 + (py - centre[1]) ** 2) / (sigma * sigma)
        value = rng.uniform(0.4, 2.0) * np.exp(-0.5 * r2)
        density[y0:y1, x0:x1] += value.reshape(y1 - y0, x1 - x0).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float [H, W] array with edge padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    height, width = image.shape
    padded = np.pad(image, ((0, 0), (radius, radius)), mode="edge")
    rows = sum(w * padded[:, k:k + width] for k, w in enumerate(taps))
    padded = np.pad(rows, ((radius, radius), (0, 0)), mode="edge")
    return sum(w * padded[k:k + height] for k, w in enumerate(taps))


def form_image(density: np.ndarray, rng: np.random.Generator, stain: str, scale: float) -> np.ndarray:
    """Microscope image (uint8 [H, W]) of a stain density map: fluorescence (qband) or absorption (gband)."""
    height, width = density.shape
    x = ((np.arange(width, dtype=np.float32) + 0.5) / width - 0.5)[None]
    y = ((np.arange(height, dtype=np.float32) + 0.5) / height - 0.5)[:, None]
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    vignette = rng.uniform(0.0, 1.2)
    illumination = 1.0 + gx * x + gy * y - vignette * (x * x + y * y)
    strength = rng.uniform(1.1, 1.6)
    if stain == "qband":
        signal = 1.0 - np.exp(-strength * density)
        image = rng.uniform(0.0, 2.0) + rng.uniform(140, 230) * illumination * signal
    else:
        image = rng.uniform(205, 245) * illumination * np.exp(-strength * density)
    image = gaussian_blur(image.astype(np.float32), rng.uniform(0.5, 1.1) * max(scale, 0.5))
    noise = rng.standard_normal((height, width), dtype=np.float32)
    image += noise * (rng.uniform(0.4, 1.5) + rng.uniform(0.1, 0.35) * np.sqrt(np.maximum(image, 0.0)))
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_metaphase(seed: np.random.SeedSequence, config: SynthConfig) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One synthetic spread: the uint8 image [H, W] and its annotations (no ``id`` / ``image_id`` yet)."""
    rng = np.random.default_rng(seed)
    width, height = config.width, config.height
    scale = min(width / REFERENCE_SIZE[0], height / REFERENCE_SIZE[1])
    magnification = float(np.clip(rng.lognormal(0.0, 0.17), 0.72, 1.45))
    chr1_length = 80.0 * magnification * scale * config.chromosome_scale
    chrom_width = max(11.0 * magnification ** 0.8 * rng.uniform(0.85, 1.2) * scale * config.chromosome_scale, 3.0)
    band_contrast = rng.uniform(0.55, 1.0)
    chromatid_rate = rng.uniform(0.0, 0.8)  # how many chromosomes show their two sister chromatids
    layout = _Layout(rng, width, height, gap=rng.uniform(1.0, 4.0) * scale, max_half_width=0.6 * chrom_width)
    names = sample_karyotype(rng, config.chromosomes, config.aneuploidy_rate)
    rng.shuffle(names)
    # chance that a chromosome is put across / against another; each such event makes two overlapping instances
    # (a light touch may share < 20 px), calibrated so that the overlapping fraction comes out near overlap_rate
    event_rate = min(1.0, 0.62 * config.overlap_rate / (1.0 - 0.4 * config.overlap_rate))
    for name in names:
        chrom = _make_chromosome(rng, name, chr1_length, chrom_width, chromatid_rate)
        if layout.chromosomes and rng.random() < event_rate:
            if layout.place_against(chrom, crossing=bool(rng.random() < 0.75)):
                continue
        layout.place_apart(chrom)

    density = np.zeros((height, width), dtype=np.float32)
    for chrom, field in zip(layout.chromosomes, layout.fields):
        if field is not None:
            render_chromosome(density, chrom, field, band_contrast, rng)
    for _ in range(min(int(rng.poisson(config.nucleus_rate)), 2)):
        _add_nucleus(density, rng, layout, scale)
    _add_debris(density, rng, scale)
    image = form_image(density, rng, config.stain, scale)

    polygons = [outline_polygon(chrom) for chrom in layout.chromosomes]
    rles = mask_utils.frPyObjects(polygons, height, width) if polygons else []
    flags = overlapping_from_rles(rles, config.min_overlap_area)
    annotations = []
    for chrom, polygon, flag in zip(layout.chromosomes, polygons, flags):
        bbox, area = polygon_bbox_area([polygon], height, width)
        annotations.append({"category_id": 1, "segmentation": [polygon], "bbox": bbox, "area": area,
                            "iscrowd": 0, "overlapping": flag, "karyotype": chrom.name})
    return image, annotations


def image_file_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.png"


def _render_job(job: tuple[str, str, int, int, SynthConfig]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Render image ``index`` of ``split`` and save it; returns its COCO image entry and annotations."""
    out, split, seed, index, config = job
    image, annotations = render_metaphase(image_seed(seed, split, index), config)
    file_name = image_file_name(split, index)
    Image.fromarray(image).save(Path(out) / "images" / file_name, compress_level=3)
    return {"id": index + 1, "file_name": file_name, "width": config.width, "height": config.height}, annotations


def generate(out: str | Path, num_images: int, split: str = "train", seed: int = 0,
             config: SynthConfig = SynthConfig(), workers: int = 1) -> dict[str, Any]:
    """Write ``num_images`` synthetic spreads as split ``split`` under ``out``; returns the COCO document written."""
    if num_images < 1:
        raise SynthError(f"--num-images must be at least 1, got {num_images}")
    out = Path(out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SynthError(f"cannot create output folder {out}: {err.strerror}") from None
    jobs = [(str(out), split, seed, index, config) for index in range(num_images)]
    progress = dict(total=num_images, desc=f"synth {split}", unit="img", disable=None)
    if workers > 1:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(_render_job, jobs, chunksize=max(1, min(8, num_images // (4 * workers)))),
                                **progress))
    else:
        results = [_render_job(job) for job in tqdm(jobs, **progress)]
    images, annotations = [], []
    for image_info, image_annotations in results:
        images.append(image_info)
        for ann in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_info["id"], **ann})
    info = {"description": f"DaCSeg synthetic metaphase spreads, split {split}",
            "generator": "tools/synth_metaphase.py", "seed": seed, "split": split, "config": asdict(config)}
    write_coco_split(out, split, images, annotations, CATEGORIES, info=info)
    return {"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}


def coco_statistics(doc: dict[str, Any], min_overlap_area: float = MIN_OVERLAP_AREA) -> dict[str, Any]:
    """Images, instances per image, fraction of overlapping instances and instance area percentiles of a COCO dict.

    Uses each annotation's ``overlapping`` flag, or derives it from the segmentations where the flag is missing.
    """
    per_image = {image["id"]: 0 for image in doc["images"]}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in doc["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        by_image.setdefault(ann["image_id"], []).append(ann)
    flags: list[bool] = []
    sizes = {image["id"]: (image["height"], image["width"]) for image in doc["images"]}
    for image_id, anns in by_image.items():
        given = [ann.get("overlapping") for ann in anns]
        rles = [segmentation_rle(ann["segmentation"], *sizes[image_id]) for ann in anns] if None in given else []
        flags.extend(instance_flags(given, rles, min_overlap_area))
    areas = np.array([ann["area"] for ann in doc["annotations"]], dtype=float)
    counts = np.array(list(per_image.values()), dtype=float)
    percentiles = np.percentile(areas, PERCENTILES) if len(areas) else np.zeros(len(PERCENTILES))
    return {
        "images": len(per_image),
        "instances": int(len(areas)),
        "instances_per_image": float(counts.mean()) if len(counts) else 0.0,
        "instances_per_image_min": int(counts.min()) if len(counts) else 0,
        "instances_per_image_max": int(counts.max()) if len(counts) else 0,
        "overlapping_fraction": float(np.mean(flags)) if flags else 0.0,
        "area_percentiles": {p: float(v) for p, v in zip(PERCENTILES, percentiles)},
        "area_p95_over_p5": float(percentiles[-1] / percentiles[0]) if len(areas) and percentiles[0] > 0 else 0.0,
    }


def format_statistics(stats: dict[str, Any]) -> str:
    """Human-readable lines of :func:`coco_statistics`."""
    areas = ", ".join(f"p{p} {v:.0f}" for p, v in stats["area_percentiles"].items())
    return (f"images: {stats['images']}  instances: {stats['instances']}\n"
            f"instances/image: mean {stats['instances_per_image']:.1f} "
            f"(min {stats['instances_per_image_min']}, max {stats['instances_per_image_max']})\n"
            f"overlapping fraction (>= {MIN_OVERLAP_AREA:g} px^2 shared): {stats['overlapping_fraction']:.3f}\n"
            f"instance area px^2: {areas}  (p95/p5 {stats['area_p95_over_p5']:.1f})")


def parse_size(text: str) -> tuple[int, int]:
    """``"768x576"`` -> ``(768, 576)`` (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 768x576, got {text!r}") from None
    if width < 64 or height < 64:
        raise argparse.ArgumentTypeError(f"size must be at least 64x64, got {text!r}")
    return width, height


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to write (images/ and annotations/)")
    parser.add_argument("--num-images", type=number_arg(int, low=1), required=True,
                        help="number of images in this split")
    parser.add_argument("--split", default="train", help="split name; other splits under --out are kept")
    parser.add_argument("--seed", type=number_arg(int, low=0), default=0,
                        help="random seed (>= 0); the same seed and arguments give identical files")
    parser.add_argument("--size", type=parse_size, default=REFERENCE_SIZE, metavar="WxH", help="image size")
    parser.add_argument("--stain", choices=STAINS, default="qband",
                        help="qband: bright chromosomes on dark; gband: dark chromosomes on light")
    parser.add_argument("--overlap-rate", type=number_arg(float, 0.0, 1.0), default=SynthConfig.overlap_rate,
                        help="about this fraction of chromosomes overlaps another (the real data: about 0.07)")
    parser.add_argument("--chromosomes", type=number_arg(int, low=1), default=46,
                        help="chromosomes per cell before aneuploidy")
    parser.add_argument("--aneuploidy-rate", type=number_arg(float, 0.0, 1.0), default=SynthConfig.aneuploidy_rate,
                        help="fraction of cells with one chromosome more or less")
    parser.add_argument("--chromosome-scale", type=number_arg(float, 0.2, 5.0), default=1.0, metavar="F",
                        help="chromosome length and width times F (1: chromosome 1 is about 80 px long at 768x576, "
                             "and scales with the image size)")
    parser.add_argument("--workers", type=number_arg(int, low=1), default=1,
                        help="processes; the output does not depend on it")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.split or any(c in args.split for c in "/\\"):
        parser.error(f"--split must be a plain name, got {args.split!r}")
    width, height = args.size
    config = SynthConfig(width=width, height=height, stain=args.stain, overlap_rate=args.overlap_rate,
                         chromosomes=args.chromosomes, aneuploidy_rate=args.aneuploidy_rate,
                         chromosome_scale=args.chromosome_scale)
    try:
        doc = generate(args.out, args.num_images, args.split, args.seed, config, args.workers)
    except DaCSegError as err:
        print_error(err)
        return 2
    print(f"wrote {len(doc['images'])} images to {Path(args.out) / 'images'} and "
          f"{Path(args.out) / 'annotations' / f'instances_{args.split}.json'}")
    print(format_statistics(coco_statistics(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
