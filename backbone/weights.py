"""Reading weights (a local file or a torchvision weights name) and loading them non-strictly, with a short report."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from errors import DaCSegError

# "ResNet50_Weights.IMAGENET1K_V1", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "ResNet50_Weights.DEFAULT"
_WEIGHTS_NAME = re.compile(r"[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+")
_WRAPPER_KEYS = ("model", "state_dict")
_MAX_LISTED = 8


class WeightsError(DaCSegError):
    """Weights that cannot be used; the message is one line naming the file or weights name."""


@dataclass
class LoadReport:
    """What a non-strict load did: keys loaded, missing from the source, unexpected in it, and dropped on purpose."""

    source: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    dropped: list[str] = field(default_factory=list)
    dropped_reason: str = ""
    model_keys: list[str] = field(default_factory=list, repr=False)
    source_keys: list[str] = field(default_factory=list, repr=False)

    @property
    def new_modules(self) -> list[str]:
        """Modules (of more than one tensor) that the source knows nothing of, such as new heads: they start fresh."""
        groups = group_by_absent_module(self.missing, self.source_keys)
        return [prefix for prefix, keys in groups.items() if len(keys) > 1]

    def lines(self) -> list[str]:
        """One line each for loaded, missing and unexpected keys (and for dropped keys when there are any)."""
        by_top = _group_by_depth(self.loaded, 1)
        lines = [f"loaded {_tensors(len(self.loaded))} from {self.source}" + (f": {_format(by_top)}" if by_top else "")]
        if self.dropped:
            dropped = _format(_group_by_depth(self.dropped, 3))
            lines.append(f"dropped {_tensors(len(self.dropped))} ({self.dropped_reason}): {dropped}")
        groups = group_by_absent_module(self.missing, self.source_keys)
        new = {prefix: groups[prefix] for prefix in self.new_modules}
        single = {prefix: keys for prefix, keys in groups.items() if prefix not in new}
        parts = ([f"new modules, start fresh: {_format(new)}"] if new else []) + ([_format(single)] if single else [])
        lines.append(f"missing {_tensors(len(self.missing))}" + (f": {'; '.join(parts)}" if parts else ""))
        unexpected = group_by_absent_module(self.unexpected, self.model_keys)
        listing = f": {_format(unexpected)}" if unexpected else ""
        lines.append(f"unexpected {_tensors(len(self.unexpected))}{listing}")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _tensors(count: int) -> str:
    return f"{count} tensor" if count == 1 else f"{count} tensors"


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def group_by_absent_module(keys: Iterable[str], other_keys: Iterable[str]) -> dict[str, list[str]]:
    """Group ``keys`` under the shortest module prefix that ``other_keys`` lack entirely (the key itself if none)."""
    known = {p for key in other_keys for p in _prefixes(key)}
    groups: dict[str, list[str]] = {}
    for key in keys:
        prefix = next((p for p in _prefixes(key) if p not in known), key)
        groups.setdefault(prefix, []).append(key)
    return groups


def _group_by_depth(keys: Iterable[str], depth: int) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(".".join(key.split(".")[:depth]), []).append(key)
    return groups


def _format(groups: dict[str, list[str]]) -> str:
    """A short listing: a group of keys as ``name.* (count)``, a lone key as itself, at most a few items."""
    items = [members[0] if len(members) == 1 else f"{name}.* ({len(members)})" for name, members in groups.items()]
    if len(items) > _MAX_LISTED:
        items = items[:_MAX_LISTED] + [f"... {len(items) - _MAX_LISTED} more"]
    return ", ".join(items)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_load_error(exc: BaseException) -> str:
    """torch.load's errors are long and advise the unsafe ``weights_only=False``; say what is wrong instead."""
    text = str(exc)
    if "Weights only load failed" in text or "WeightsUnpickler error:" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line.upper() or line.startswith("Unsupported")),
                      next((line.split("WeightsUnpickler error:", 1)[1].strip() for line in lines
                            if "WeightsUnpickler error:" in line), ""))
        detail = detail.split(". Please")[0].split(" whose module")[0].rstrip(".")
        if "GLOBAL" in detail.upper():  # a class or function to import: code, not tensors
            return (f"it holds code or objects that a weights file must not contain ({detail}); it was not loaded. "
                    "A weights file is a state dict of tensors")
        return f"not a PyTorch weights file ({detail or 'unreadable pickle'}); it was not loaded"
    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    if isinstance(exc, (KeyError, IndexError, UnicodeDecodeError)) or "magic number" in text or "load key" in text:
        return "not a PyTorch weights file (neither a torch.save zip archive nor a legacy pickle)"
    return _first_line(exc)


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: plain, or wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise WeightsError(
            f"{source} is not a state dict (expected a dict of tensors, plain or under 'model' / 'state_dict')"
        )
    return dict(obj)


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file (``weights_only=True``) or, when online, a torchvision weights name."""
    source = str(source)
    path = Path(source)
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a bad file; the user needs one line
            raise WeightsError(f"cannot read weights file {source}: {describe_load_error(exc)}") from exc
        return unwrap_state_dict(obj, source)
    if path.exists():
        raise WeightsError(f"weights path {source} is not a file")
    if _WEIGHTS_NAME.fullmatch(source):
        return _torchvision_state_dict(source)
    raise WeightsError(f"weights file not found: {source}")


def _torchvision_state_dict(name: str) -> dict[str, torch.Tensor]:
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (KeyError, ValueError, AttributeError) as exc:
        raise WeightsError(f"weights file not found and not a torchvision weights name: {name}") from exc
    try:
        return dict(weights.get_state_dict(progress=True, check_hash=True))
    except Exception as exc:  # offline, proxy, bad hash...
        raise WeightsError(f"cannot download torchvision weights {name}: {_first_line(exc)}") from exc


def load_state_dict_report(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    ignore: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state_dict`` into ``module`` non-strictly and report what happened.

    Keys starting with an ``ignore`` prefix are left out on both sides. A shape mismatch raises ``WeightsError``
    naming the key (callers drop the keys whose mismatch they expect first).
    """
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ignore)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore)}
    for key, tensor in state_dict.items():
        if key in own and own[key].shape != tensor.shape:
            raise WeightsError(
                f"{source}: {key} has shape {list(tensor.shape)} but the model expects {list(own[key].shape)}"
            )
    # load_state_dict hooks may edit the dict (FrozenBatchNorm2d drops num_batches_tracked): give it a copy
    result = module.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(ignore)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignore)]
    loaded = [k for k in state_dict if k in own]
    return LoadReport(
        source=source,
        loaded=loaded,
        missing=missing,
        unexpected=unexpected,
        model_keys=list(own),
        source_keys=list(state_dict),
    )
