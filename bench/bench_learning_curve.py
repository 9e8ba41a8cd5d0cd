"""How many annotated cells does a lab need? The learning curve: train on the first N real BioImLab train images, once
from scratch and once from a synthetic-pretrained checkpoint, with the same fine-tuning budget, and score on val.

    python bench/bench_learning_curve.py --out runs/curve                         # N 5 10 20 40 109, seeds 0 1
    python bench/bench_learning_curve.py --out runs/curve --sizes 10 --seeds 0    # one point
    python bench/bench_learning_curve.py --out runs/curve --report                # table and PNG of what is there

Every training is ``train.py`` (``train.main``) with the same flags: ``--steps`` optimizer steps whatever N (the
epochs are the steps over the batches an epoch of N images has), ``-b``, the model flags given after the bench's
own (``--backbone resnet18 --min-size 576`` ...), and ``--pretrained`` for the pretrained arm. The pretraining is
``tools/pretrain_synthetic.py``'s: synthetic spreads matching the train images' stain, size and chromosome size,
one pretraining per seed; its wall time is reported apart. Scores come from each run's last ``metrics.jsonl``
record (our evaluator on the whole val split): segm AP, AP50, AP75, F1, count MAE and overlap recall.

Runs already finished under ``--out`` are kept, so an interrupted curve resumes. Writes ``results.json``,
``learning_curve.md`` and ``learning_curve.png`` under ``--out``.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from bench.bench_accuracy import DEFAULT_DATA, prepare_data  # noqa: E402
from tools.pretrain_synthetic import lab_look, make_synthetic, pretrain, synth_config_for  # noqa: E402
from train_utils.cli import ArgumentParser, number_arg  # noqa: E402
from train_utils.outputs.results import read_jsonl  # noqa: E402

ARMS = ("scratch", "synthetic")
SIZES = (5, 10, 20, 40, 109)
METRICS = (  # (column, getter of a metrics.jsonl record)
    ("segm AP", lambda r: r["segm"]["AP"]),
    ("AP50", lambda r: r["segm"]["AP50"]),
    ("AP75", lambda r: r["segm"]["AP75"]),
    ("F1", lambda r: r["segm"]["f1"]),
    ("count MAE", lambda r: r["count_mae"]),
    ("overlap R", lambda r: r["overlap_segm"]["recall"]),
)


def write_subset(root: Path, count: int) -> str:
    """Split ``first<count>``: the first ``count`` train images (by file name) and their annotations."""
    doc = json.loads((root / "annotations" / "instances_train.json").read_text())
    images = sorted(doc["images"], key=lambda image: image["file_name"])[:count]
    if len(images) < count:
        raise SystemExit(f"bench_learning_curve.py: error: N {count} but the train split has {len(images)} images")
    ids = {image["id"] for image in images}
    subset = {**doc, "images": images, "annotations": [ann for ann in doc["annotations"] if ann["image_id"] in ids]}
    split = f"first{count}"
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        path.write_text(json.dumps(subset))
    return split


def epochs_for(count: int, batch_size: int, steps: int) -> int:
    """Epochs of ``count`` images at ``batch_size`` that make at least ``steps`` optimizer steps."""
    return max(1, math.ceil(steps / math.ceil(count / batch_size)))


def finished_record(run: Path, epochs: int) -> dict[str, Any] | None:
    records = read_jsonl(run / "metrics.jsonl")
    return records[-1] if records and records[-1].get("epoch") == epochs - 1 and "segm" in records[-1] else None


def pretrained_checkpoint(out: Path, data: Path, seed: int, args, model_flags: list[str]) -> tuple[Path, float]:
    """The synthetic pretraining of ``seed`` and its wall time in seconds (measured once, kept in cost.json)."""
    run = out / f"pretrain_s{seed}"
    cost_file = run / "cost.json"
    started = time.perf_counter()
    config = synth_config_for(lab_look(data, "train"))
    make_synthetic(out / "synth", config, args.synth_images, 0, 1)
    checkpoint = pretrain(out / "synth", run, args.pretrain_epochs, [*model_flags, "--seed", str(seed)])
    if not cost_file.is_file():
        cost_file.write_text(json.dumps({"seconds": time.perf_counter() - started, "synth_images": args.synth_images,
                                         "epochs": args.pretrain_epochs}))
    return checkpoint, json.loads(cost_file.read_text())["seconds"]


def run_point(out: Path, data: Path, arm: str, count: int, seed: int, args, model_flags: list[str],
              checkpoint: Path | None) -> dict[str, Any]:
    run = out / "runs" / f"{arm}_n{count}_s{seed}"
    epochs = epochs_for(count, args.batch_size, args.steps)
    record = finished_record(run, epochs)
    if record is None:
        argv = ["--data-path", str(data), "--output-dir", str(run), "--train-split", write_subset(data, count),
                "--val-split", "val", "--epochs", str(epochs), "--eval-interval", str(epochs), "--keep-last", "1",
                "-b", str(args.batch_size), "--seed", str(seed), *model_flags]
        if checkpoint is not None:
            argv += ["--pretrained", str(checkpoint)]
        print(f"bench: {arm} N={count} seed {seed}: {epochs} epoch(s) -> {run}", flush=True)
        if train.main(argv) != 0:
            raise SystemExit(f"bench_learning_curve.py: error: the run in {run} failed")
        record = finished_record(run, epochs)
    train_s = sum(r.get("epoch_time_s", 0.0) for r in read_jsonl(run / "metrics.jsonl"))
    return {"arm": arm, "n": count, "seed": seed, "epochs": epochs, "train_s": train_s,
            **{name: get(record) for name, get in METRICS}}


def collect(out: Path) -> list[dict[str, Any]]:
    path = out / "results.json"
    return json.loads(path.read_text())["points"] if path.is_file() else []


def format_table(points: list[dict[str, Any]], pretrain_s: dict[str, float]) -> str:
    """Markdown: one row per arm and N, each metric as the mean over seeds with its min..max."""
    lines = ["| arm | N | seeds | " + " | ".join(name for name, _ in METRICS) + " | train s |",
             "|---|---|---|" + "---|" * (len(METRICS) + 1)]
    for arm in ARMS:
        for count in sorted({p["n"] for p in points if p["arm"] == arm}):
            rows = [p for p in points if p["arm"] == arm and p["n"] == count]
            cells = []
            for name, _ in METRICS + (("train_s", None),):
                values = [row[name] for row in rows]
                spread = f" ({min(values):.3f}..{max(values):.3f})" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.3f}{spread}" if name != "train_s"
                             else f"{statistics.mean(values):.0f}")
            lines.append(f"| {arm} | {count} | {len(rows)} | " + " | ".join(cells) + " |")
    if pretrain_s:
        lines.append("")
        lines.append("Synthetic pretraining, paid once per seed and not counted above: "
                     + ", ".join(f"seed {seed} {seconds:.0f} s" for seed, seconds in sorted(pretrain_s.items())))
    return "\n".join(lines)


def draw_curve(points: list[dict[str, Any]], path: Path) -> None:
    """segm AP against N (log scale), one line per arm through the seed means, the seeds' min..max shaded."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    for arm, colour in zip(ARMS, ("tab:grey", "tab:blue")):
        counts = sorted({p["n"] for p in points if p["arm"] == arm})
        if not counts:
            continue
        values = [[p["segm AP"] for p in points if p["arm"] == arm and p["n"] == n] for n in counts]
        axes.plot(counts, [statistics.mean(v) for v in values], "o-", color=colour,
                  label="from scratch" if arm == "scratch" else "synthetic pretraining")
        axes.fill_between(counts, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2)
    axes.set_xscale("log")
    axes.set_xticks(SIZES, [str(n) for n in SIZES])
    axes.set_xlabel("annotated training images N (BioImLab train)")
    axes.set_ylabel("segm AP on BioImLab val")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def report(out: Path, points: list[dict[str, Any]], pretrain_s: dict[str, float], settings: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps({"settings": settings, "pretrain_s": pretrain_s,
                                                   "points": points}, indent=1))
    table = format_table(points, pretrain_s)
    (out / "learning_curve.md").write_text(table + "\n")
    draw_curve(points, out / "learning_curve.png")
    print(table)
    print(f"bench: wrote {out / 'results.json'}, learning_curve.md and learning_curve.png")


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                            epilog="Other flags are train.py model flags for every training (python train.py --help).")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="runs, results and the PNG go here")
    parser.add_argument("--data-path", type=Path, default=DEFAULT_DATA, metavar="DIR",
                        help="BioImLab: labelme root or COCO root with train and val splits (default: %(default)s)")
    parser.add_argument("--sizes", type=number_arg(int, low=1), nargs="+", default=list(SIZES), metavar="N",
                        help="training set sizes, the first N train images by file name")
    parser.add_argument("--seeds", type=number_arg(int, low=0), nargs="+", default=[0, 1], metavar="S")
    parser.add_argument("--arms", choices=ARMS, nargs="+", default=list(ARMS))
    parser.add_argument("--steps", type=number_arg(int, low=1), default=300, metavar="N",
                        help="fine-tuning budget in optimizer steps, the same for every N and arm")
    parser.add_argument("-b", "--batch-size", type=number_arg(int, low=1), default=4, metavar="N")
    parser.add_argument("--synth-images", type=number_arg(int, low=1), default=200, metavar="N")
    parser.add_argument("--pretrain-epochs", type=number_arg(int, low=1), default=12, metavar="N")
    parser.add_argument("--report", action="store_true", help="only write the table and PNG of results.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, model_flags = get_args_parser().parse_known_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings["model_flags"] = model_flags
    saved = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    pretrain_s: dict[str, float] = saved.get("pretrain_s", {})
    points = collect(args.out)
    if args.report:
        report(args.out, points, pretrain_s, saved.get("settings", settings))
        return 0
    converted = args.out / "data"
    ready = (converted / "annotations" / "instances_train.json").is_file()
    data = converted if ready else prepare_data(args.data_path, converted)  # a COCO root gets instances_first<N>.json
    for seed in args.seeds:
        checkpoint = None
        if "synthetic" in args.arms:
            checkpoint, pretrain_s[str(seed)] = pretrained_checkpoint(args.out, data, seed, args, model_flags)
        for count in args.sizes:
            for arm in args.arms:
                point = run_point(args.out, data, arm, count, seed, args, model_flags,
                                  checkpoint if arm == "synthetic" else None)
                points = [p for p in points if (p["arm"], p["n"], p["seed"]) != (arm, count, seed)] + [point]
                report(args.out, points, pretrain_s, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
