"""Writing files so that nothing is lost: atomic replacement, a checked output folder, JSON one object per line."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Let ``write`` fill ``<path>.tmp``, then put it in place of ``path`` in one step: a crash or a kill leaves the
    old file whole (and at most a ``.tmp`` file beside it). Creates the folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Check, creating nothing, that ``path`` is or can become a folder to write in: raises ``OSError`` with one
    line naming the flag and the folder when a file is in the way (``path`` or a folder above it) or the nearest
    existing folder above it is not writable. A job checks all its output folders this way before it creates any,
    so a run refused for a bad flag leaves nothing on disk."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file, not a folder")
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: cannot write there ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot write there (permission denied)")
    return path


def prepare_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Create ``path`` if need be and check that files can be written in it; raises ``OSError`` with one line
    naming the flag and the folder (a file in the way, no permission, a read-only disk)."""
    path = check_output_dir(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"{flag} {path}: cannot write there ({exc.strerror or type(exc).__name__})") from None
    return path


def remove_unfinished_writes(output_dir: Path) -> list[Path]:
    """Delete the checkpoint ``*.pth.tmp`` files an interrupted atomic write left behind (the finished files are
    intact)."""
    removed = sorted(output_dir.glob("*.pth.tmp"))
    for path in removed:
        path.unlink()
    return removed


def json_lines(items: Sequence[Mapping[str, Any]]) -> str:
    """The items as JSON objects, one per line, joined by ``,\\n`` (the body of a JSON list)."""
    return ",\n".join(json.dumps(item, separators=(", ", ": ")) for item in items)


def json_list_text(items: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list with one object per line (the layout of ``predictions.json`` and ``crops.json``)."""
    return f"[\n{json_lines(items)}\n]\n" if items else "[]\n"
