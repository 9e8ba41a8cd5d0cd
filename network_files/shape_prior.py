"""DaCSeg's third stage: a prior of chromosome shapes that refines each RoI's mask.

A small convolutional autoencoder is trained on the 28x28 ground-truth mask crops (the crops the mask targets use),
and k-means on its codes gives K centres per class: the typical shapes (``tools/build_shape_codebook.py`` writes
them, with the autoencoder, to a codebook file). In the model::

    coarse mask (stage 2's fused mask, as probabilities, the RoI's class) ──▶ encoder ──▶ code        (frozen)
    code ──▶ k nearest centres of the class ──▶ their decoded shapes: k priors 28x28                  (no gradient)
    [features the coarse mask head read, priors pooled to 14x14] ──▶ 3x3 conv to 256 ──▶ refinement mask head
        + predictor ──▶ final mask

The codebook is fixed: its centres are decoded once, when it is loaded, and kept as ``templates``. The lookup takes no
gradient, on purpose rather than through a straight-through estimator: the nearest centre is a piecewise constant
function of the coarse mask (its true gradient is zero almost everywhere), the coarse mask has its own supervised
loss, and a straight-through gradient would push the coarse mask toward whatever moves its code, a biased signal
with no target behind it. The refinement head learns from the priors as inputs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.misc import Conv2dNormActivation

from backbone.weights import describe_load_error
from errors import DaCSegError

MASK_SIZE = 28  # the crops' side: the mask targets' resolution
WIDTHS = (32, 64)  # encoder channels at 14x14 and 7x7 (the decoder mirrors them)
CODE_CHANNELS = 8  # at 4x4: a code of 128 numbers
CODE_DIM = CODE_CHANNELS * 4 * 4
FORMAT = "dacseg-shape-codebook"
VERSION = 1


class CodebookError(DaCSegError):
    """A shape codebook that cannot be used; the message is one line naming the file."""


def shape_encoder() -> nn.Sequential:
    """``[N, 1, 28, 28]`` masks -> ``[N, 128]`` codes: three stride-2 3x3 convs, 28 -> 14 -> 7 -> 4."""
    return nn.Sequential(
        nn.Conv2d(1, WIDTHS[0], 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(WIDTHS[0], WIDTHS[1], 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(WIDTHS[1], CODE_CHANNELS, 3, stride=2, padding=1),
        nn.Flatten(),
    )


def shape_decoder() -> nn.Sequential:
    """``[N, 128]`` codes -> ``[N, 1, 28, 28]`` mask logits: the encoder mirrored, 4 -> 7 -> 14 -> 28."""
    return nn.Sequential(
        nn.Unflatten(1, (CODE_CHANNELS, 4, 4)),
        nn.ConvTranspose2d(CODE_CHANNELS, WIDTHS[1], 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.ConvTranspose2d(WIDTHS[1], WIDTHS[0], 4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.ConvTranspose2d(WIDTHS[0], 1, 4, stride=2, padding=1),
    )


class ShapeAutoencoder(nn.Module):
    """The mask autoencoder of the codebook; ``forward`` returns reconstruction logits."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = shape_encoder()
        self.decoder = shape_decoder()

    def forward(self, masks: Tensor) -> Tensor:
        return self.decoder(self.encoder(masks))


def nearest_centres(codes: Tensor, centres: Tensor, k: int) -> Tensor:
    """Indices ``[R, k]`` of the ``k`` centres nearest to each code of ``[R, D]``, nearest first (Euclidean
    distance). ``centres`` is ``[K, D]``, shared by every code, or ``[R, K, D]``, each code's own (its class's)."""
    if centres.dim() == 2:
        centres = centres.expand(codes.shape[0], *centres.shape)
    return torch.cdist(codes.float()[:, None], centres.float())[:, 0].topk(k, dim=1, largest=False).indices


class Codebook(NamedTuple):
    """A codebook file's contents, checked (``read_codebook``)."""

    autoencoder: ShapeAutoencoder
    centres: Tensor  # [C, K, 128]: K shape codes per class (labels 1..C)
    counts: Tensor  # [C, K]: training crops nearest to each centre
    settings: dict[str, Any]  # how it was built


def save_codebook(path: str | os.PathLike, autoencoder: ShapeAutoencoder, centres: Tensor, counts: Tensor,
                  settings: dict[str, Any]) -> None:
    """Write a codebook file that ``torch.load(weights_only=True)`` reads: tensors and plain settings only."""
    torch.save({"format": FORMAT, "version": VERSION,
                "encoder": autoencoder.encoder.state_dict(), "decoder": autoencoder.decoder.state_dict(),
                "centres": centres.detach().float().cpu(), "counts": counts.cpu(),
                "settings": {**settings, "mask_size": MASK_SIZE, "widths": list(WIDTHS),
                             "code_channels": CODE_CHANNELS}}, path)


def read_codebook(path: str | os.PathLike, num_classes: int | None = None) -> Codebook:
    """Load and check a codebook file (``CodebookError``, one line naming it, for anything wrong); ``num_classes``
    (without background), when given, must be the codebook's class count."""
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"shape codebook not found: {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds; the user needs one line
        raise CodebookError(f"cannot read shape codebook {path}: {describe_load_error(exc)}") from exc
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CodebookError(f"{path} is not a shape codebook (write one with tools/build_shape_codebook.py)")
    settings = saved.get("settings") or {}
    built_for = (settings.get("mask_size"), settings.get("widths"), settings.get("code_channels"))
    if saved.get("version") != VERSION or built_for != (MASK_SIZE, list(WIDTHS), CODE_CHANNELS):
        raise CodebookError(f"{path} was built for another autoencoder (version {saved.get('version')}, mask size, "
                            f"widths, code channels {built_for}); rebuild it with tools/build_shape_codebook.py")
    centres, counts = saved.get("centres"), saved.get("counts")
    if not isinstance(centres, Tensor) or centres.dim() != 3 or centres.shape[2] != CODE_DIM or centres.shape[1] < 1:
        raise CodebookError(f"{path}: centres must be a [classes, K, {CODE_DIM}] tensor, got "
                            f"{list(centres.shape) if isinstance(centres, Tensor) else type(centres).__name__}")
    if num_classes is not None and centres.shape[0] != num_classes:
        raise CodebookError(f"{path} holds shapes of {centres.shape[0]} class(es) but the model has {num_classes}; "
                            "build the codebook from the data the model trains on")
    if not torch.isfinite(centres).all():
        raise CodebookError(f"{path}: its centres are not finite numbers")
    autoencoder = ShapeAutoencoder()
    try:
        autoencoder.encoder.load_state_dict(saved["encoder"])
        autoencoder.decoder.load_state_dict(saved["decoder"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CodebookError(f"{path}: its autoencoder weights do not fit: {str(exc).splitlines()[0]}") from exc
    if not isinstance(counts, Tensor) or counts.shape != centres.shape[:2]:
        counts = torch.zeros(centres.shape[:2], dtype=torch.int64)
    return Codebook(autoencoder.eval(), centres.float(), counts, dict(settings))


@torch.no_grad()
def decode_centres(autoencoder: ShapeAutoencoder, centres: Tensor) -> Tensor:
    """The shapes of ``[C, K, D]`` centres as ``[C, K, 28, 28]`` probabilities."""
    c, k, d = centres.shape
    return torch.sigmoid(autoencoder.decoder(centres.reshape(c * k, d))).reshape(c, k, MASK_SIZE, MASK_SIZE)


class ShapePriorHead(nn.Module):
    """Refine the coarse mask logits of each RoI with the ``nearest`` closest codebook shapes of its class.

    The codebook (frozen encoder, ``centres`` and the decoded ``templates``) comes from ``load_codebook``, or from a
    checkpoint's state dict, whose codebook size it takes.
    """

    def __init__(self, channels: int, num_classes: int, nearest: int = 2, roi_size: int = 14) -> None:
        """``num_classes`` counts the background, as torchvision does; ``roi_size`` is the side of the mask RoI
        features the priors are pooled to (a constant kernel, so an exported graph needs no dynamic pooling)."""
        super().__init__()
        if 2 * roi_size != MASK_SIZE:  # the mask head doubles the RoI side; the shape encoder reads 28x28
            raise ValueError(f"the shape prior needs {MASK_SIZE // 2}px mask RoIs, got {roi_size}px")
        self.nearest, self.roi_size = nearest, roi_size
        self.encoder = shape_encoder().requires_grad_(False)
        self.register_buffer("centres", torch.zeros(num_classes - 1, 0, CODE_DIM))
        self.register_buffer("templates", torch.zeros(num_classes - 1, 0, MASK_SIZE, MASK_SIZE))
        self.fusion = Conv2dNormActivation(channels + nearest, channels, 3, norm_layer=None)
        self.mask_head = MaskRCNNHeads(channels, [channels] * 4, dilation=1)
        self.mask_predictor = MaskRCNNPredictor(channels, channels, num_classes)
        nn.init.normal_(self.mask_predictor.mask_fcn_logits.weight, std=0.001)  # start near p = 0.5, as the overlap
        nn.init.zeros_(self.mask_predictor.mask_fcn_logits.bias)  # stages' predictors do

    def load_codebook(self, codebook: Codebook, source: object = "codebook") -> None:
        """Take over a codebook's encoder, centres and decoded centres (``source`` names it in errors)."""
        if codebook.centres.shape[0] != self.centres.shape[0]:
            raise CodebookError(f"{source} holds shapes of {codebook.centres.shape[0]} class(es) but the model has "
                                f"{self.centres.shape[0]}")
        if codebook.centres.shape[1] < self.nearest:
            raise CodebookError(f"{source} has {codebook.centres.shape[1]} shape(s) per class, fewer than the "
                                f"{self.nearest} nearest asked for")
        device = self.centres.device
        self.encoder.load_state_dict(codebook.autoencoder.encoder.state_dict())
        self.centres = codebook.centres.to(device)
        self.templates = decode_centres(codebook.autoencoder, codebook.centres).to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("centres", "templates"):  # a checkpoint's codebook may hold any number of shapes
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(saved, Tensor) and saved.dim() == current.dim() and saved.shape != current.shape:
                setattr(self, name, current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def priors(self, coarse: Tensor, labels: Tensor) -> Tensor:
        """``[R, nearest, 28, 28]`` shapes nearest to the ``[R, 28, 28]`` coarse mask probabilities, per class."""
        if self.centres.shape[1] < self.nearest:
            raise RuntimeError("the shape prior has no codebook: load one (load_codebook) or a checkpoint")
        codes = self.encoder(coarse[:, None].to(self.centres.dtype))
        # each RoI against its own class's centres, all at once: no loop over the labels, so a traced graph holds
        # every class, not only those of the example it was traced on
        index = nearest_centres(codes, self.centres[labels - 1], self.nearest)
        return self.templates[labels[:, None] - 1, index]

    def forward(self, features: Tensor, coarse_logits: Tensor, labels: Tensor) -> Tensor:
        """Final mask logits ``[R, K+1, 28, 28]`` from the RoI features ``[R, C, 14, 14]``, the coarse mask logits
        ``[R, K+1, 28, 28]`` and each RoI's class ``[R]`` (1..K)."""
        rows = torch.arange(labels.shape[0], device=labels.device)  # a size in a traced graph, not a constant
        coarse = torch.sigmoid(coarse_logits[rows, labels].float())
        if features.shape[-1] != self.roi_size:
            raise ValueError(f"the shape prior was built for {self.roi_size}px mask RoIs, got {features.shape[-1]}px")
        priors = F.avg_pool2d(self.priors(coarse, labels), MASK_SIZE // self.roi_size).to(features.dtype)
        return self.mask_predictor(self.mask_head(self.fusion(torch.cat([features, priors], dim=1))))
