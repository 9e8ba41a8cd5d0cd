"""What ``--pretrained`` holds when it is one of our own checkpoints (a synthetic pretraining, another lab's model):
its model config and stain polarity, compared with the run's before its weights load.

A torchvision or plain state-dict file has no such record and loads as before. A checkpoint of another backbone is
refused with one line; another class count, model, scale or stain is reported in a line each.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from errors import UserError
from network_files import ModelConfig
from train_utils import stain
from train_utils.engine.checkpoint import config_from_checkpoint, load_checkpoint


@dataclass(frozen=True)
class PretrainedRecord:
    """A DaCSeg checkpoint given to ``--pretrained``: where it is, its model config, epoch and stain polarity."""

    source: str
    config: ModelConfig
    epoch: int | None
    polarity: str | None


def read_pretrained_record(source: str | Path) -> PretrainedRecord | None:
    """The record of a DaCSeg training checkpoint; None for a torchvision name or a plain state dict."""
    path = Path(source)
    if not path.is_file():
        return None
    checkpoint = load_checkpoint(path)  # weights_only=True; a bad file is one line
    if "model_config" not in checkpoint:
        return None
    config = config_from_checkpoint(checkpoint, path)
    polarity = stain.checkpoint_polarity(checkpoint, path, "as-is", announce=False)
    epoch = checkpoint.get("epoch")
    return PretrainedRecord(str(source), config, int(epoch) if epoch is not None else None, polarity)


def _scale_flags(config: ModelConfig) -> dict[str, str]:
    return {"--anchor-sizes": " ".join(str(s) for s in config.anchor_sizes),
            "--min-size": str(config.min_size), "--max-size": str(config.max_size)}


def check_pretrained(record: PretrainedRecord, config: ModelConfig) -> list[str]:
    """Lines that say what the pretrained checkpoint is and where it differs from the model being built; a
    backbone that differs is a ``UserError`` (no tensor of it would fit)."""
    theirs = record.config
    if theirs.backbone != config.backbone:
        raise UserError(f"--pretrained {record.source} holds a {theirs.backbone} backbone but this run builds "
                        f"{config.backbone}; add --backbone {theirs.backbone}")
    epoch = f", epoch {record.epoch}" if record.epoch is not None else ""
    lines = [f"pretrained: {record.source} is a DaCSeg {theirs.name} checkpoint ({theirs.backbone}, "
             f"{theirs.num_classes} class(es){epoch}, trained {record.polarity or 'on an unrecorded stain'})"]
    if theirs.num_classes != config.num_classes:
        lines.append(f"pretrained: {theirs.num_classes} class(es) there, {config.num_classes} here: the class-specific "
                     "predictors start fresh, the rest loads")
    if theirs.name != config.name:
        lines.append(f"pretrained: a {theirs.name} checkpoint into a {config.name} model: the heads they share load, "
                     "the others start fresh or are left out (listed below)")
    ours = _scale_flags(config)
    differs = [f"{flag} {value} there, {ours[flag]} here" for flag, value in _scale_flags(theirs).items()
               if value != ours[flag]]
    if differs:
        lines.append("note: pretrained at another scale (" + "; ".join(differs) + "); its weights load, but "
                     "chromosomes at another size in pixels transfer less well")
    return lines


def pretrained_polarity_note(record: PretrainedRecord, target: str, mode: str) -> str | None:
    """The line that says how the run's stain relates to the pretraining's; None when they agree or are unknown."""
    if record.polarity is None or record.polarity == target:
        return None
    return (f"note: {record.source} was pretrained {record.polarity} but this run trains {target} (--stain {mode}); "
            f"the pretrained features see the other look (--stain auto would keep {record.polarity})")
