"""The errors a user can cause, and how every script reports them: one line, ``error: <message>``, exit status 2.

Each room raises its own subclass of ``DaCSegError`` (``DatasetError`` for data, ``WeightsError`` for weight files,
``CheckpointError`` for checkpoints, ``UserError`` for flags and paths, ``SynthError`` for the generator), so a
script catches ``DaCSegError`` once. Errors that are not the user's to fix (a bug, a non-finite loss) are not
``DaCSegError``s.
"""
from __future__ import annotations

import sys


class DaCSegError(ValueError):
    """A mistake the user can fix (a file, a flag, a checkpoint); the message names the culprit on one line."""


class UserError(DaCSegError):
    """A bad flag, path or combination of options."""


def one_line(message: object) -> str:
    """The message on one line (an exception with no text gives its type's name). An error raised in a DataLoader
    worker, which torch re-raises with the worker's traceback as its message, is reduced to the original error's
    own message."""
    text = str(message)
    if "Original Traceback (most recent call last)" in text:
        last = text.rstrip().splitlines()[-1]  # "module.ErrorClass: the message"
        text = last.split(": ", 1)[1] if ": " in last else last
    text = " ".join(text.split())
    return text or (type(message).__name__ if isinstance(message, BaseException) else "")


def print_error(message: object, prog: str | None = None) -> None:
    """Print ``[prog: ]error: <message>`` (one line) to stderr."""
    print(f"{prog + ': ' if prog else ''}error: {one_line(message)}", file=sys.stderr, flush=True)
