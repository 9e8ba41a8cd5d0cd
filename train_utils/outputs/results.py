"""Per-epoch result files: ``det_results.txt`` / ``seg_results.txt`` (the seeds' exact format), ``metrics.jsonl``.

A results line is ``epoch:<e>`` and one space, then 14 numbers joined by two spaces: the 12 COCOeval summary stats
(AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) and the epoch's mean training loss with 4 decimals,
then the learning rate with 6 decimals::

    epoch:0 0.1234  0.3456  ...  0.5678  0.9012  0.020000

Files are only ever appended to, or have the line of an epoch that is run again replaced in place (a resume from an
older checkpoint); nothing else in them changes, and no epoch appears twice.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from train_utils.outputs.files import write_text_atomic

DET_RESULTS = "det_results.txt"
SEG_RESULTS = "seg_results.txt"
METRICS_JSONL = "metrics.jsonl"
_EPOCH = re.compile(r"^epoch:(\d+) ")


def format_epoch_line(epoch: int, stats12: Sequence[float], mean_loss: float, lr: float) -> str:
    """One results line (no newline) in the seeds' format."""
    stats = [float(s) for s in stats12]
    if len(stats) != 12:
        raise ValueError(f"expected the 12 COCOeval summary stats, got {len(stats)}")
    numbers = [f"{v:.4f}" for v in [*stats, float(mean_loss)]] + [f"{float(lr):.6f}"]
    return f"epoch:{int(epoch)} " + "  ".join(numbers)


def parse_epoch_line(line: str) -> tuple[int, list[float]]:
    """Inverse of ``format_epoch_line``: ``(epoch, [12 stats, mean loss, lr])``."""
    match = _EPOCH.match(line)
    if not match:
        raise ValueError(f"not a results line: {line!r}")
    return int(match.group(1)), [float(v) for v in line[match.end():].split("  ")]


def _upsert_line(path: str | os.PathLike, line: str, same: Any) -> None:
    """Append ``line`` to ``path``, or put it in place of the first existing line for which ``same(line)`` holds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.is_file() else []
    for i, old in enumerate(lines):
        if same(old):
            lines[i] = line
            lines = lines[: i + 1] + [old for old in lines[i + 1:] if not same(old)]
            write_text_atomic(path, "\n".join(lines) + "\n")
            return
    with path.open("a") as f:
        if lines and not path.read_text().endswith("\n"):  # a hand-edited file may lack its last newline
            f.write("\n")
        f.write(line + "\n")


def write_epoch_line(path: str | os.PathLike, epoch: int, line: str) -> None:
    """Append the results ``line`` of ``epoch``, or replace that epoch's existing line in place."""
    prefix = f"epoch:{int(epoch)} "
    if not line.startswith(prefix):
        raise ValueError(f"line does not start with {prefix!r}: {line!r}")
    _upsert_line(path, line, lambda old: old.startswith(prefix))


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples as lists, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any], key: str | None = "epoch") -> None:
    """Append ``record`` as one JSON line; a line whose ``key`` has the same value is replaced instead."""
    line = json.dumps(json_safe(dict(record)), sort_keys=False)
    if key is None or key not in record:
        _upsert_line(path, line, lambda old: False)
        return

    def same(old: str) -> bool:
        try:
            return json.loads(old).get(key) == record[key]
        except (ValueError, AttributeError):
            return False

    _upsert_line(path, line, same)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (empty when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
