"""The tables of ``bench_crossings.py``'s saved runs: every variant's crossing and control metrics (mean over seeds
± half the max-min spread) and its paired bootstrap difference from ``maskrcnn`` (crops and seeds resampled)."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_utils.evaluation.crossings import (  # noqa: E402
    ERROR_PARTS, METRICS, CropScore, classifier_agreement, crop_scores, crossing_errors, focus_matches, summarize)
from train_utils.evaluation.stats import bootstrap_draws, paired_difference, seed_spread  # noqa: E402

BASELINE = "maskrcnn"
DIFF_METRICS = ("pairs75", "pairs50", "AP", "AP75", "recall75", "mean_iou")
CONTROL_METRICS = ("AP", "AP75", "recall75", "mean_iou")
VAL_CROPS = "val_crops.json"


def load_gt(runs_dir: Path, gt: Path | None = None) -> COCO:
    """The scored crops' ground truth: ``gt``, else the copy beside the runs."""
    coco = COCO()
    coco.dataset = json.loads((gt or runs_dir / VAL_CROPS).read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def run_files(runs_dir: Path) -> list[Path]:
    """The saved runs in ``runs_dir``: ``<variant>_seed<S>.json``, or gzipped (``.json.gz``, as kept in the
    repository's ``bench/results/``)."""
    return sorted([*runs_dir.glob("*_seed*.json"), *runs_dir.glob("*_seed*.json.gz")])


def read_run(path: Path) -> dict[str, Any]:
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())


def load_runs(runs_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> the saved run."""
    runs: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in run_files(runs_dir):
        run = read_run(path)
        runs[run["variant"]][int(run["seed"])] = run
    return runs


class Scored:
    """One run's crop scores by kind, their metrics on all crops and on every bootstrap draw."""

    def __init__(self, crops: Sequence[CropScore], draws: dict[str, np.ndarray]) -> None:
        self.by_kind = {kind: [c for c in crops if c.kind == kind] for kind in ("crossing", "control")}
        self.all = {kind: summarize(items) for kind, items in self.by_kind.items()}
        self.draws = {kind: np.array([[summarize([items[k] for k in row])[m] for m in METRICS]
                                      for row in draws[kind]]) for kind, items in self.by_kind.items()}


def _cell(values: Sequence[float]) -> str:
    mean, spread = seed_spread(values)
    return f"{mean:.3f} ±{spread:.3f}" if len(values) > 1 else f"{mean:.3f}"


def report(runs_dir: Path, draws: int = 1000, baselines: Sequence[str] = (BASELINE,), gt: Path | None = None) -> str:
    """The tables; every variant's differences from each of ``baselines`` that has runs. ``gt``: the scored crops'
    ground truth when it is not beside the runs."""
    coco = load_gt(runs_dir, gt)
    runs = load_runs(runs_dir)
    if not runs:
        return f"no runs in {runs_dir}"
    kinds = {kind: sum(img.get("kind") == kind for img in coco.dataset["images"]) for kind in ("crossing", "control")}
    rows = {kind: bootstrap_draws(count, draws, seed=1) for kind, count in kinds.items()}
    scored = {name: {seed: Scored(crop_scores(coco, run["detections"]), rows) for seed, run in sorted(seeds.items())}
              for name, seeds in runs.items()}
    lines = [f"val crops: {kinds['crossing']} crossing ({sum(len(i.get('pairs', [])) for i in coco.dataset['images'])}"
             f" pairs), {kinds['control']} control; {draws} bootstrap draws over crops and seeds (a seed brings both "
             "models' runs)", ""]
    lines += ["| variant | seeds | steps | train s | crossing AP | AP75 | R@0.5 | R@0.75 | mean IoU | pairs@0.5 | "
              "pairs@0.75 | control AP | control R@0.75 |", "|---" * 13 + "|"]
    for name, seeds in scored.items():
        some = runs[name][next(iter(seeds))]
        cross = [[s.all["crossing"][m] for s in seeds.values()] for m in
                 ("AP", "AP75", "recall50", "recall75", "mean_iou", "pairs50", "pairs75")]
        control = [[s.all["control"][m] for s in seeds.values()] for m in ("AP", "recall75")]
        train_s = np.mean([runs[name][seed]["train_s"] for seed in seeds])
        lines.append(f"| {name} | {','.join(map(str, seeds))} | {some['steps']} | {train_s:.0f} | "
                     + " | ".join(_cell(v) for v in cross + control) + " |")
    for baseline in (b for b in baselines if b in scored):
        lines += ["", f"Differences from {baseline} (mean over the seeds both have [95% paired bootstrap interval]):",
                  "", "| variant | " + " | ".join(f"crossing {m}" for m in DIFF_METRICS) + " | control AP |",
                  "|---" * (len(DIFF_METRICS) + 2) + "|"]
        for name in scored:
            if name == baseline or not set(scored[name]) & set(scored[baseline]):
                continue
            cells = [str(_difference(scored[name], scored[baseline], "crossing", m)) for m in DIFF_METRICS]
            cells.append(str(_difference(scored[name], scored[baseline], "control", "AP")))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + curve_lines(runs) + error_lines(coco, runs) + classifier_lines(coco, runs))


def curve_lines(runs: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The val curve of each variant (the runs' scorings along the way): crossing recall and pairs separated at
    0.75 at each step, mean over the seeds ± half their spread; whether the budget reached a plateau."""
    if not any(run.get("curve") for seeds in runs.values() for run in seeds.values()):
        return []
    lines = ["", "Val curve (crossing recall at 0.75 / pairs separated at 0.75 at each scoring step, over the seeds):",
             "", "| variant | " + " | ".join(["step", "R@0.75", "pairs@0.75"]) + " |", "|---" * 4 + "|"]
    for name, seeds in runs.items():
        by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for _, run in sorted(seeds.items()):
            for step, recall75, pairs75 in run.get("curve", []):
                by_step[int(step)].append((recall75, pairs75))
        for step, values in sorted(by_step.items()):
            recalls, pairs = zip(*values)
            lines.append(f"| {name} | {step} | {_cell(recalls)} | {_cell(pairs)} |")
    return lines


def error_lines(coco: COCO, runs: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The table of where the masks of the found crossing chromosomes go wrong (``crossing_errors``), per variant."""
    lines = ["", "Where the masks of the found crossing chromosomes go wrong (detections >= 0.5 matched at mask IoU "
             "0.5; fractions of the chromosome's area, the crossing region's for missed crossing):", "",
             "| variant | found | missed | missed crossing | into partner | into others | into background |",
             "|---" * 7 + "|"]
    for name, seeds in runs.items():
        errors = [crossing_errors(coco, run["detections"]) for _, run in sorted(seeds.items())]
        cells = [_cell([e[part] for e in errors]) for part in ERROR_PARTS]
        lines.append(f"| {name} | {np.mean([e['found'] for e in errors]):.0f} | " + " | ".join(cells) + " |")
    return lines


def classifier_lines(coco: COCO, runs: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The table of the overlap classifier's agreement with the ground truth, for the variants that have one."""
    agreement = {name: [classifier_agreement(coco, run["detections"]) for _, run in sorted(seeds.items())]
                 for name, seeds in runs.items()}
    agreement = {name: values for name, values in agreement.items()
                 if values[0]["crossing_rois"] + values[0]["other_rois"]}
    if not agreement:
        return []
    lines = ["", "Overlap classifier on the found chromosomes (detections scoring >= 0.5 matched at mask IoU 0.5; "
             "right: score >= 0.5 on a crossing chromosome, < 0.5 on any other):", "",
             "| variant | crossing RoIs | right on crossing | mean score | other RoIs | right on other | mean score |",
             "|---" * 7 + "|"]
    for name, values in agreement.items():
        cells = [_cell([v[key] for v in values]) for key in ("crossing_acc", "crossing_mean_score")]
        others = [_cell([v[key] for v in values]) for key in ("other_acc", "other_mean_score")]
        lines.append(f"| {name} | {np.mean([v['crossing_rois'] for v in values]):.0f} | {' | '.join(cells)} | "
                     f"{np.mean([v['other_rois'] for v in values]):.0f} | {' | '.join(others)} |")
    return lines


def _difference(a: dict[int, Scored], b: dict[int, Scored], kind: str, metric: str):
    seeds = sorted(set(a) & set(b))
    index = METRICS.index(metric)
    return paired_difference([a[s].all[kind][metric] for s in seeds], [b[s].all[kind][metric] for s in seeds],
                             np.stack([a[s].draws[kind][:, index] for s in seeds]),
                             np.stack([b[s].draws[kind][:, index] for s in seeds]))


def picture(runs_dir: Path, crops_root: Path, out: Path, variants: Sequence[str] = (BASELINE, "dacseg"),
            seed: int = 0, count: int = 6, score_thresh: float = 0.5, gt: Path | None = None) -> Path:
    """One PNG: ``count`` val crossing crops in rows, the ground truth (crossing chromosomes outlined) then, for each
    variant (seed ``seed``), the detections scoring >= ``score_thresh`` that find a focus instance at mask IoU 0.5,
    matched as the scores match them, each captioned with its mask IoU; its title counts the focus instances found
    and the pairs separated at 0.5 and 0.75 (duplicates and detections elsewhere are left out, and counted)."""
    import torch  # noqa: PLC0415
    from pycocotools import mask as mask_utils  # noqa: PLC0415

    from my_dataset_chromosome import read_image  # noqa: PLC0415
    from tools.show_dataset import compose  # noqa: PLC0415
    from train_utils.outputs.visualize import draw_instances  # noqa: PLC0415

    coco = load_gt(runs_dir, gt)
    runs = load_runs(runs_dir)
    missing = [name for name in variants if seed not in runs.get(name, {})]
    if missing:
        raise SystemExit(f"bench_crossings.py: error: --picture: no seed-{seed} run of {', '.join(missing)} in "
                         f"{runs_dir}")
    crossing = [img for img in sorted(coco.dataset["images"], key=lambda i: i["id"]) if img["kind"] == "crossing"]
    picked = crossing[:: max(1, len(crossing) // count)][:count]
    rows = []
    for img in picked:
        image = read_image(crops_root / "images" / img["file_name"])
        anns = coco.imgToAnns.get(img["id"], [])
        gt = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])) if anns else torch.zeros(0, *image.shape[1:])
        focus = sum(bool(a.get("focus", True)) for a in anns)
        row = [draw_instances(image, gt.bool(), overlapping=torch.tensor([bool(a["overlapping"]) for a in anns]),
                              title=f"ground truth: {img['source']}, {focus} in focus", min_side=320)]
        for name in variants:
            dets = [d for d in runs[name][seed]["detections"] if d["image_id"] == img["id"]]
            matches = focus_matches(coco, img["id"], dets, score_thresh)
            masks = torch.from_numpy(np.stack([mask_utils.decode(d["segmentation"]) for d, _, _ in matches])) \
                if matches else torch.zeros(0, *image.shape[1:], dtype=torch.uint8)
            iou = {g["id"]: value for _, g, value in matches}
            pairs = [(iou.get(a, 0.0), iou.get(b, 0.0)) for a, b in img.get("pairs", [])]
            separated = [sum(min(pair) >= t for pair in pairs) for t in (0.5, 0.75)]
            kept = sum(d["score"] >= score_thresh for d in dets)
            title = (f"{name} s{seed}: found {len(matches)}/{focus}, pairs {separated[0]}/{len(pairs)} at 0.5, "
                     f"{separated[1]} at 0.75 ({kept - len(matches)} other dets)")
            row.append(draw_instances(image, masks.bool(), captions=[f"{value:.2f}" for _, _, value in matches],
                                      title=title, min_side=320))
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    compose(rows).save(out)
    return out
