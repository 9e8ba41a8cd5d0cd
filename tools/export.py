"""Export a trained checkpoint (Mask R-CNN or DaCSeg) for inference without this repository's model code.

    python tools/export.py --weights-path runs/dacseg/best.pth --format onnx --out dacseg.onnx
    python tools/export.py --weights-path best.pth --format onnx --out m.onnx --check-image slide.tif
    python tools/export.py --weights-path best.pth --format openvino --out m.xml    # and m.bin beside it

``onnx``: an ONNX graph for onnxruntime (``pip install onnx onnxruntime``) with a dynamic image size; its metadata
holds the label names and stain polarity, so ``predict.py --weights-path m.onnx`` runs it like a checkpoint (see
``train_utils/inference/exported.py`` for the inputs and outputs). ``openvino``: that ONNX graph converted to
OpenVINO IR (``pip install openvino``; ``m.xml`` and its float32 weights ``m.bin``), which ``predict.py`` runs with
OpenVINO in exact float32. ``torch-export``: a ``torch.export`` program
(``.pt2``), where torch and torchvision can capture the model.

Every export is checked at once: the exported model and the PyTorch model run on a real-size image (``--check-image``,
or a synthetic metaphase spread of 768x576) and on a second size, and must agree within the stated tolerance:
every detection scoring at least 0.5 found again (matched by box IoU), and the matched ones' boxes within
``BOX_TOLERANCE_PX``, scores within ``SCORE_TOLERANCE``, mask probabilities within ``MASK_TOLERANCE``. Exit status 0
when exported and checked, 2 with one line otherwise.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from errors import DaCSegError, UserError, one_line, print_error  # noqa: E402
from my_dataset_chromosome import read_image  # noqa: E402
from network_files.config import ModelConfig  # noqa: E402
from tools.synth_metaphase import SynthConfig, image_seed, render_metaphase  # noqa: E402
from train_utils.cli import ArgumentParser, number_arg  # noqa: E402
from train_utils.engine.checkpoint import load_model_from_checkpoint  # noqa: E402
from train_utils.inference.exported import CHECKPOINT_KEYS, INPUT_NAME, METADATA_KEY, load_onnx_model  # noqa: E402
from train_utils.inference.exported import OpenVinoDetector, output_names  # noqa: E402
from train_utils.outputs.files import check_output_dir  # noqa: E402

FORMATS = ("onnx", "openvino", "torch-export")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "torch-export": ".pt2"}
BOX_TOLERANCE_PX = 0.05
SCORE_TOLERANCE = 1e-3
MASK_TOLERANCE = 1e-2  # mask probability; the 0.5-thresholded masks then agree but for a pixel or so per edge
CONFIDENT = 0.5  # predict.py's default score threshold: every detection scoring this much must have a twin
SECOND_SIZE = (448, 640)  # the check's second image size (height, width): the export must not be tied to one


def export_onnx(model: torch.nn.Module, config: ModelConfig, checkpoint: Mapping[str, Any], example: torch.Tensor,
                path: str | os.PathLike, opset: int = 17) -> Path:
    """Export the eval-mode ``model`` (traced on ``example``, any size works afterwards) to ``path`` with the
    checkpoint's metadata; raises ``UserError`` (one line) when the export fails."""
    import onnx

    path = Path(path)
    saved_thresh = model.roi_heads.score_thresh
    model.roi_heads.score_thresh = 0.0  # the graph keeps every detection; the detector running it applies a threshold
    names = output_names(config)
    dynamic = {INPUT_NAME: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in names}}
    try:
        with warnings.catch_warnings():  # tracing warns at every data-dependent line of torchvision's detection code
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ([example],), str(path), opset_version=opset, dynamo=False,
                              input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic)
    except Exception as exc:  # the exporter raises many kinds; the user needs one line
        raise UserError(f"ONNX export of the {config.name} model failed: {one_line(exc)}") from None
    finally:
        model.roi_heads.score_thresh = saved_thresh
    exported = onnx.load(str(path))
    info = {key: checkpoint.get(key) for key in CHECKPOINT_KEYS}
    info["model_config"] = config.to_dict()
    exported.metadata_props.add(key=METADATA_KEY, value=json.dumps(info))
    onnx.save(exported, str(path))
    return path


def export_openvino(onnx_path: Path, out: Path) -> None:
    """Convert the ONNX graph at ``onnx_path`` (``export_onnx``) to OpenVINO IR at ``out`` (``.xml``, weights in the
    ``.bin`` beside it, kept float32) with the same metadata in its runtime info; one line when it fails."""
    import onnx
    import openvino

    metadata = next(prop.value for prop in onnx.load(str(onnx_path), load_external_data=False).metadata_props
                    if prop.key == METADATA_KEY)
    try:
        model = openvino.Core().read_model(str(onnx_path))
        model.set_rt_info(metadata, [METADATA_KEY])
        openvino.save_model(model, str(out), compress_to_fp16=False)
    except Exception as exc:  # OpenVINO's own error types
        raise UserError(f"OpenVINO cannot convert the exported graph: {one_line(exc)}") from None


def check_image(path: str | None) -> torch.Tensor:
    """The image the check runs on: ``path``, or a synthetic 768x576 Q-band spread."""
    if path is not None:
        return read_image(path)
    grey, _ = render_metaphase(image_seed(0, "export", 0), SynthConfig())
    return torch.from_numpy(grey).float().div(255).expand(3, -1, -1).contiguous()


def compare(reference: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> dict[str, float]:
    """The largest differences between the matched detections of two outputs of one image, and how many of the
    reference's have no twin (``unmatched``).

    Each reference detection, best score first, is matched to the exported detection of its label with the highest
    box IoU (at least 0.5). Float rounding can reorder near-tied low scores at the model's detection limit, so a
    detection scoring below ``CONFIDENT`` may go without a twin; one scoring at least that is a ``UserError``.
    """
    ious = box_iou(reference["boxes"].float(), exported["boxes"].float())
    ious[reference["labels"][:, None] != exported["labels"][None, :]] = 0.0
    pairs, unmatched = [], []
    for i in reference["scores"].argsort(descending=True).tolist():
        j = int(ious[i].argmax()) if ious.shape[1] else -1
        if j >= 0 and ious[i, j] >= 0.5:
            pairs.append((i, j))
            ious[:, j] = -1.0  # taken
        else:
            unmatched.append(i)
    confident = [i for i in unmatched if reference["scores"][i] >= CONFIDENT]
    if confident:
        raise UserError(f"the exported model misses {len(confident)} of PyTorch's detections scoring >= "
                        f"{CONFIDENT:g} (best missed score {float(reference['scores'][confident[0]]):.3f})")
    differences = {"detections": float(len(reference["scores"])), "unmatched": float(len(unmatched))}
    mine, theirs = [i for i, _ in pairs], [j for _, j in pairs]
    for key in ("boxes", "scores", "masks", "overlap_scores"):
        if key in reference:
            diff = (reference[key][mine].float() - exported[key][theirs].float()).abs()
            differences[key] = float(diff.max()) if diff.numel() else 0.0
    return differences


def check_export(model: torch.nn.Module, run_exported: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                 image: torch.Tensor) -> list[dict[str, float]]:
    """Run both models on ``image`` and on it resized to ``SECOND_SIZE``; UserError beyond the tolerances."""
    second = torch.nn.functional.interpolate(image[None], size=SECOND_SIZE, mode="bilinear")[0]
    found = []
    for picture in (image, second):
        with torch.inference_mode():
            reference = model([picture])[0]
        differences = compare(reference, run_exported(picture))
        for key, tolerance in (("boxes", BOX_TOLERANCE_PX), ("scores", SCORE_TOLERANCE), ("masks", MASK_TOLERANCE),
                               ("overlap_scores", SCORE_TOLERANCE)):
            if differences.get(key, 0.0) > tolerance:
                raise UserError(f"the exported model's {key} differ from PyTorch's by {differences[key]:.3g} on a "
                                f"{picture.shape[-1]}x{picture.shape[-2]} image (tolerance {tolerance:g})")
        found.append(differences)
    return found


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """Swallow torch's log records and whatever is written to stderr (``sys.stderr`` and file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    logging.disable(logging.CRITICAL)
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(io.StringIO()):
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            logging.disable(logging.NOTSET)


def export_torch(model: torch.nn.Module, config: ModelConfig, example: torch.Tensor, out: Path) -> Callable:
    """``torch.export`` with a dynamic image size, saved to ``out``; returns the loaded program's runner."""
    height = torch.export.Dim("height", min=32, max=8192)
    width = torch.export.Dim("width", min=32, max=8192)
    try:
        with warnings.catch_warnings(), _stderr_muted():  # a failed capture logs the whole graph
            warnings.simplefilter("ignore")
            program = torch.export.export(model, ([example],), dynamic_shapes=([{1: height, 2: width}],), strict=False)
    except Exception as exc:  # torch.export raises its own kinds, with pages of graph; the first line says why
        reason = one_line(str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
        raise UserError(f"torch.export cannot capture the {config.name} model: {reason[:300]} (torchvision's detection "
                        "post-processing branches on data-dependent sizes); use --format onnx") from None
    torch.export.save(program, str(out))
    loaded = torch.export.load(str(out)).module()
    return lambda image: loaded([image])[0]


def check_out(out: Path, fmt: str) -> None:
    """Refuse, before any work, an ``--out`` that cannot become the exported file: a folder, an ONNX model not
    named ``.onnx`` (``predict.py`` knows exported models by it), or a place that cannot be written."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the file to write, e.g. {out / ('model' + SUFFIXES[fmt])}")
    if fmt in ("onnx", "openvino") and out.suffix.lower() != SUFFIXES[fmt]:
        kind = {"onnx": "ONNX", "openvino": "OpenVINO"}[fmt]
        raise UserError(f"--out {out}: name an {kind} model *{SUFFIXES[fmt]} (predict.py recognises exported models "
                        "by it)")
    try:
        check_output_dir(out.parent, f"--out {out}: folder")
    except OSError as exc:
        raise UserError(str(exc)) from None


def export(weights_path: str, fmt: str, out: Path, image_path: str | None = None, opset: int = 17
           ) -> list[dict[str, float]]:
    """Export the checkpoint's model to ``out`` and check it (see the module docstring); returns the differences.
    ``out``, the check image and the checkpoint are checked before any work; ``out`` is written only once the
    check passed (the export goes to ``<out>.tmp`` first)."""
    check_out(out, fmt)
    image = check_image(image_path)
    model, config, checkpoint = load_model_from_checkpoint(weights_path, "cpu")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})") from None
    tmp = out.with_name(out.name + ".tmp")
    tmp_ir = out.with_name(out.stem + ".tmp.xml")  # OpenVINO names the weights after the .xml: .tmp.bin
    try:
        if fmt in ("onnx", "openvino"):
            export_onnx(model, config, checkpoint, image, tmp, opset)
            if fmt == "openvino":
                export_openvino(tmp, tmp_ir)
            detector = load_onnx_model(tmp)[0] if fmt == "onnx" else OpenVinoDetector(tmp_ir)
            run_exported: Callable[[torch.Tensor], Any] = lambda picture: detector([picture])[0]  # noqa: E731
        else:
            run_exported = export_torch(model, config, image, tmp)
        checks = check_export(model, run_exported, image)
        if fmt == "openvino":
            os.replace(tmp_ir.with_suffix(".bin"), out.with_suffix(".bin"))
            os.replace(tmp_ir, out)
        else:
            os.replace(tmp, out)
    finally:
        for path in (tmp, tmp_ir, tmp_ir.with_suffix(".bin")):
            path.unlink(missing_ok=True)
    return checks


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-path", required=True, metavar="CKPT", help="checkpoint written by train.py")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="what to export to (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the exported model's file (*.onnx for --format onnx, *.xml for openvino); an existing "
                             "file is replaced")
    parser.add_argument("--check-image", default=None, metavar="IMAGE",
                        help="image the export is checked on (default: a synthetic 768x576 spread)")
    parser.add_argument("--opset", type=number_arg(int, low=11), default=17, help="ONNX opset (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        checks = export(args.weights_path, args.format, Path(args.out), args.check_image, args.opset)
    except (DaCSegError, ImportError) as exc:
        print_error(exc if not isinstance(exc, ImportError) else f"{exc.name} is needed: pip install {exc.name}")
        return 2
    for check, size in zip(checks, ("the check image", f"{SECOND_SIZE[1]}x{SECOND_SIZE[0]}")):
        details = ", ".join(f"{k} {v:.2g}" for k, v in check.items() if k not in ("detections", "unmatched"))
        print(f"checked on {size}: {int(check['detections'])} detections ({int(check['unmatched'])} low-scoring "
              f"one(s) without a twin), largest differences {details}")
    print(f"exported to {args.out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
