"""Is a difference between two models real? Paired bootstrap intervals over the scored items (crops) and the seeds.

Model A and model B were each trained with the same seeds and scored on the same items. One bootstrap draw resamples
the items with replacement (the same draw for every seed and both models) and the seeds with replacement (a seed
brings both models' runs: they are paired by seed); the difference of that draw is the mean over the drawn seeds of
``metric(A_seed[draw]) - metric(B_seed[draw])``. The interval is the percentile interval of the draws, so it holds
both the items' sampling and the training's seed-to-seed noise: resampling the items alone would take two runs of one
configuration from other seeds for different models. A difference whose interval holds 0 is not resolved. With one
seed, the interval holds the items' sampling only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np

Item = TypeVar("Item")


@dataclass(frozen=True)
class Difference:
    """A paired difference ``A - B``: its value on all items, its bootstrap interval, and the seed spread."""

    mean: float  # mean over seeds of metric(A_seed) - metric(B_seed), on all items
    low: float
    high: float
    per_seed: tuple[float, ...]

    @property
    def resolved(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        verdict = "" if self.resolved else " not resolved"
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]{verdict}"


def bootstrap_draws(count: int, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """``[draws, count]`` item indices, each row a resample with replacement; the same seed gives the same rows, so
    every model and seed scored on the same items is resampled alike."""
    return np.random.default_rng(seed).integers(0, count, (draws, count))


def paired_difference(a_all: Sequence[float], b_all: Sequence[float], a_draws: np.ndarray, b_draws: np.ndarray,
                      level: float = 0.95, seed: int = 0) -> Difference:
    """``A - B`` from each seed's metric on all items (``a_all[s]``) and on every draw of the same
    ``bootstrap_draws`` (``a_draws[s, d]``), each draw also resampling the seeds (``seed`` seeds that resampling);
    draws where the metric is NaN (nothing to count) are left out."""
    a_draws, b_draws = np.asarray(a_draws, dtype=np.float64), np.asarray(b_draws, dtype=np.float64)
    if len(a_all) != len(b_all) or not len(a_all) or a_draws.shape != b_draws.shape:
        raise ValueError(f"need the same seeds and draws for both models, got {len(a_all)} and {len(b_all)} seeds, "
                         f"draws {a_draws.shape} and {b_draws.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    per_seed = tuple(float(a) - float(b) for a, b in zip(a_all, b_all))
    per_seed_draws = a_draws - b_draws  # [seeds, draws]
    num_seeds, num_draws = per_seed_draws.shape
    picked = np.random.default_rng(seed).integers(0, num_seeds, (num_draws, num_seeds))
    diffs = per_seed_draws[picked, np.arange(num_draws)[:, None]].mean(axis=1)
    diffs = diffs[np.isfinite(diffs)]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail]) if diffs.size else (float("nan"), float("nan"))
    return Difference(float(np.mean(per_seed)), float(low), float(high), per_seed)


def paired_bootstrap(
    a_per_seed: Sequence[Sequence[Item]],
    b_per_seed: Sequence[Sequence[Item]],
    metric: Callable[[Sequence[Item]], float],
    draws: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Difference:
    """The paired bootstrap interval of ``metric(A) - metric(B)``.

    ``a_per_seed[s]`` and ``b_per_seed[s]`` hold the scored items of each model trained with seed ``s``; item ``k``
    is the same crop in every list.
    """
    sizes = {len(items) for items in (*a_per_seed, *b_per_seed)}
    if len(sizes) > 1:
        raise ValueError(f"every seed of both models must score the same items, got sizes {sorted(sizes)}")
    rows = bootstrap_draws(sizes.pop() if sizes else 0, draws, seed)

    def on_draws(runs: Sequence[Sequence[Item]]) -> np.ndarray:
        return np.array([[metric([items[k] for k in row]) for row in rows] for items in runs]).reshape(len(runs), -1)

    return paired_difference([metric(items) for items in a_per_seed], [metric(items) for items in b_per_seed],
                             on_draws(a_per_seed), on_draws(b_per_seed), level)


def seed_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half the max-min spread of one metric over seeds."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float((values.max() - values.min()) / 2)
