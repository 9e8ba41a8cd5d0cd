from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import predict
from errors import UserError
from network_files import ModelConfig, build_model
from train_utils.engine.checkpoint import save_checkpoint
from train_utils.inference.detect import paste_detections
from train_utils.jobs import predict as jobs_predict
from train_utils.jobs.predict import is_out_of_memory, label_maps, output_stems, overlap_map_images, overlay
from train_utils.outputs.visualize import OVERLAP_COLOR

REPO_ROOT = Path(__file__).resolve().parents[1]
MAP_NAMES = ("overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge")


def make_checkpoint(path: Path, name: str) -> Path:
    """An untrained small model; 3 detections per image keep the run short."""
    torch.manual_seed(0)
    config = ModelConfig(name=name, min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn",
                         box_detections_per_img=3, overlap_cls_head="conv")
    model = build_model(config)
    save_checkpoint({"model": model.state_dict(), "model_config": config.to_dict(), "epoch": 0,
                     "label_names": {1: "chromosome"}, "label_to_cat_id": {1: 1}}, path)
    return path


@pytest.fixture(scope="module")
def maskrcnn_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "maskrcnn.pth", "maskrcnn")


@pytest.fixture(scope="module")
def dacseg_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "dacseg.pth", "dacseg")


def run(ckpt: Path, out: Path, *inputs: object, extra: tuple[str, ...] = ()) -> int:
    return predict.main(["--weights-path", str(ckpt), *map(str, inputs), "--output-dir", str(out),
                         "--device", "cpu", "--score-thresh", "0.0", *extra])


def read_lines_json(path: Path) -> list[dict]:
    text = path.read_text()
    results = json.loads(text)
    assert text.count("\n") == len(results) + 2 if results else text == "[]\n"  # one result per line
    return results


def test_maskrcnn_predictions_load_into_coco_and_pictures_are_written(tiny_coco, maskrcnn_ckpt, tmp_path, capsys):
    out = tmp_path / "pred"
    assert run(maskrcnn_ckpt, out, tiny_coco / "images" / "val_*.png") == 0
    printed = capsys.readouterr().out
    assert "val_001.png: 3 detections" in printed and " ms" in printed

    for stem in ("val_001", "val_002"):
        picture = Image.open(out / f"{stem}_pred.png")
        assert picture.mode == "RGB" and picture.width >= 160
    results = read_lines_json(out / "predictions.json")
    assert len(results) == 6 and all("overlap_score" not in r for r in results)
    assert {r["image_id"] for r in results} == {1, 2}
    assert all(r["segmentation"]["size"] == [128, 160] and 0 <= r["score"] <= 1 for r in results)

    gt = COCO(str(tiny_coco / "annotations" / "instances_val.json"))
    detections = gt.loadRes(str(out / "predictions.json"))  # COCO accepts it against the matching ground truth
    assert len(detections.getAnnIds()) == 6

    index = json.loads((out / "images.json").read_text())
    assert [(i["id"], Path(i["file_name"]).name, i["width"], i["height"], i["num_detections"])
            for i in index["images"]] == [(1, "val_001.png", 160, 128, 3), (2, "val_002.png", 160, 128, 3)]
    assert Path(index["images"][0]["file_name"]) == (tiny_coco / "images" / "val_001.png").resolve()
    assert index["categories"] == [{"id": 1, "name": "chromosome"}] and index["failed"] == []


def test_tiff_16bit_grey_rgb_and_same_stems_in_two_folders(tiny_coco, maskrcnn_ckpt, tmp_path):
    grey = np.asarray(Image.open(tiny_coco / "images" / "val_001.png").convert("L"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray((grey.astype(np.uint16) * 40 + 1000)).save(tmp_path / "a" / "cell.tif")  # 16-bit, narrow range
    Image.fromarray(grey).save(tmp_path / "b" / "cell.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)[:100, :90]).save(tmp_path / "b" / "colour.jpg")
    assert Image.open(tmp_path / "a" / "cell.tif").mode == "I;16"

    out = tmp_path / "pred"
    assert run(maskrcnn_ckpt, out, tmp_path / "a" / "cell.tif", tmp_path / "b", extra=("--score-thresh", "1.0")) == 0
    assert {p.name for p in out.glob("*_pred.png")} == {"a__cell_pred.png", "b__cell_pred.png", "colour_pred.png"}
    index = json.loads((out / "images.json").read_text())
    assert [(i["stem"], i["width"], i["height"], i["num_detections"]) for i in index["images"]] == [
        ("a__cell", 160, 128, 0), ("b__cell", 160, 128, 0), ("colour", 90, 100, 0)]
    assert (out / "predictions.json").read_text() == "[]\n"  # nothing scores 1.0


def test_dacseg_writes_overlap_scores_and_overlap_maps(tiny_coco, dacseg_ckpt, tmp_path):
    out = tmp_path / "pred"
    assert run(dacseg_ckpt, out, tiny_coco / "images" / "val_001.png", extra=("--save-overlap-maps",)) == 0
    results = read_lines_json(out / "predictions.json")
    assert len(results) == 3 and all(0 <= r["overlap_score"] <= 1 for r in results)
    for name in MAP_NAMES:
        picture = Image.open(out / f"val_001_{name}.png")
        assert picture.mode == "L" and picture.size == (160, 128)
        assert np.asarray(picture).max() > 0  # three detections leave some probability somewhere
    index = json.loads((out / "images.json").read_text())
    assert index["images"][0]["num_overlapping"] == sum(r["overlap_score"] >= 0.5 for r in results)
    assert (out / "val_001_pred.png").is_file()


@pytest.mark.parametrize("name, channels_last", [("maskrcnn", True), ("dacseg", False)])
def test_the_cpu_runs_channels_last_for_mask_rcnn_only(name, channels_last, tiny_coco, maskrcnn_ckpt, dacseg_ckpt,
                                                       tmp_path, monkeypatch):
    chosen, apply = [], jobs_predict.apply_speedups
    monkeypatch.setattr(jobs_predict, "apply_speedups",
                        lambda model, speedups: chosen.append(speedups) or apply(model, speedups))
    ckpt = maskrcnn_ckpt if name == "maskrcnn" else dacseg_ckpt
    assert run(ckpt, tmp_path / "pred", tiny_coco / "images" / "val_001.png", extra=("--no-upscale",)) == 0
    assert [(s.channels_last, s.no_upscale, s.openvino) for s in chosen] == [(channels_last, True, False)]


def test_overlap_maps_of_a_maskrcnn_checkpoint_are_refused(tiny_coco, maskrcnn_ckpt, tmp_path, capsys):
    code = run(maskrcnn_ckpt, tmp_path / "pred", tiny_coco / "images" / "val_001.png", extra=("--save-overlap-maps",))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: --save-overlap-maps needs a DaCSeg checkpoint; {maskrcnn_ckpt} holds a maskrcnn model"]
    assert not (tmp_path / "pred").exists()


def test_openvino_with_bf16_is_refused_in_one_line(tiny_coco, maskrcnn_ckpt, tmp_path, capsys):
    assert run(maskrcnn_ckpt, tmp_path / "pred", tiny_coco / "images" / "val_001.png",
               extra=("--openvino", "--bf16")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --openvino runs float32; it does not combine with --bf16"]
    assert not (tmp_path / "pred").exists()


def test_an_unreadable_image_is_reported_and_the_others_predicted(tiny_coco, maskrcnn_ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "good.png").write_bytes((tiny_coco / "images" / "val_002.png").read_bytes())
    out = tmp_path / "pred"
    assert run(maskrcnn_ckpt, out, folder) == 2
    err = capsys.readouterr().err
    assert "warning: skipped" in err and "broken.png" in err
    assert err.strip().splitlines()[-1] == (f"error: 1 of 2 image(s) could not be predicted: broken.png "
                                            f"(the reasons are in {out / 'images.json'})")
    assert (out / "good_pred.png").is_file() and not (out / "broken_pred.png").exists()
    index = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == [2]
    assert [(f["id"], Path(f["file_name"]).name) for f in index["failed"]] == [(1, "broken.png")]
    assert {r["image_id"] for r in read_lines_json(out / "predictions.json")} == {2}


def test_user_errors_are_one_line(tiny_coco, tmp_path, capsys):
    image = tiny_coco / "images" / "val_001.png"
    assert predict.main(["--weights-path", str(tmp_path / "none.pth"), str(image)]) == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'none.pth'}\n"
    assert predict.main(["--weights-path", str(tmp_path / "none.pth"), str(tmp_path / "*.tif")]) == 2
    assert capsys.readouterr().err == f"error: input '{tmp_path / '*.tif'}' matches no file or folder\n"
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--weights-path", "w.pth", str(image), "--overlap-thresh", "2"])
    assert exit_info.value.code == 2 and "--overlap-thresh" in capsys.readouterr().err


def test_runs_as_a_script(tmp_path):
    missing = tmp_path / "missing.pth"
    done = subprocess.run([sys.executable, "predict.py", "--weights-path", str(missing), str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"error: folder {tmp_path} holds no images (.png .jpg .jpeg .tif .tiff .bmp)\n"


def test_model_flag_checks_the_checkpoint(tiny_coco, maskrcnn_ckpt, tmp_path, capsys):
    image = tiny_coco / "images" / "val_001.png"
    assert run(maskrcnn_ckpt, tmp_path / "ok", image, extra=("--model", "maskrcnn")) == 0
    capsys.readouterr()
    assert run(maskrcnn_ckpt, tmp_path / "wrong", image, extra=("--model", "dacseg")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model dacseg" in err and "holds a maskrcnn model" in err


def test_an_output_dir_that_is_a_file_is_one_line(tiny_coco, maskrcnn_ckpt, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("a file where the folder should go")
    assert run(maskrcnn_ckpt, out, tiny_coco / "images" / "val_001.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"--output-dir {out} is a file, not a folder"), err


def test_an_image_too_large_for_the_memory_is_skipped_and_nothing_is_lost(tiny_coco, maskrcnn_ckpt, tmp_path,
                                                                          monkeypatch, capsys):
    from train_utils.inference import detect

    real = detect.paste_detections

    def paste(detections, size, *args, **kwargs):
        if size == (6000, 6000):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 144000000 bytes.")
        return real(detections, size, *args, **kwargs)

    monkeypatch.setattr(detect, "paste_detections", paste)
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        (folder / name).write_bytes((tiny_coco / "images" / "val_001.png").read_bytes())
    Image.new("L", (6000, 6000), 30).save(folder / "b_huge.png")
    out = tmp_path / "pred"
    assert run(maskrcnn_ckpt, out, folder) == 2
    err = capsys.readouterr().err
    assert "not enough memory to predict this 6000x6000 image (" in err and "can't allocate memory" in err
    index = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == [1, 3]  # the images after it were predicted
    assert [(f["id"], Path(f["file_name"]).name) for f in index["failed"]] == [(2, "b_huge.png")]
    assert {r["image_id"] for r in read_lines_json(out / "predictions.json")} == {1, 3}


class LargestTensor(TorchDispatchMode):
    """Records the most elements any tensor made by a torch operation inside it had."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


def test_a_large_image_with_many_detections_never_holds_a_mask_per_detection_at_its_size(tmp_path, monkeypatch):
    """100 detections on a 3000x3000 image: from the mask head through the overlay, predictions.json, the crops
    and the labelme outlines, no tensor holds more than the RGB image's 3 x H x W values (pasting every mask at the
    image's size took [100, 1, H, W])."""
    from train_utils.jobs.predict import CropOptions, PredictOptions, predict_files

    size, count = 3000, 100
    model = build_model(ModelConfig(backbone="resnet18", min_size=64, max_size=64, trainable_layers=0,
                                    norm_layer="frozen_bn")).eval()
    corners = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="xy"), dim=-1).reshape(-1, 2)
    masks = torch.zeros(count, 1, 28, 28)
    masks[:, :, 3:25, 9:19] = 0.9  # a chromosome standing in its box
    found = {"boxes": torch.cat([corners * 6.4 + 1, corners * 6.4 + 5], dim=1), "labels": torch.ones(count).long(),
             "scores": torch.linspace(0.99, 0.5, count), "masks": masks}
    model.roi_heads.forward = lambda features, proposals, image_shapes, targets=None: ([dict(found)], {})
    Image.new("L", (size, size), 40).save(tmp_path / "slide.png")
    options = PredictOptions(crops=CropOptions(tmp_path / "crops"), export=("labelme",))
    written, write = LargestTensor(), jobs_predict._Outputs.add  # the writer thread's (torch modes are per thread)

    def watched_write(*args):
        with written:
            write(*args)

    monkeypatch.setattr(jobs_predict._Outputs, "add", watched_write)
    with LargestTensor() as largest:
        summary = predict_files(model, [tmp_path / "slide.png"], tmp_path / "out", {1: "chromosome"}, {1: 1},
                                options=options)
    assert summary.num_detections == count and not summary.failed
    assert 3 * size * size <= largest.numel < 4 * size * size  # the image itself (as floats, as RGB bytes); no more
    assert 3 * size * size <= written.numel < 4 * size * size  # the overlay's RGB bytes; no more
    results = read_lines_json(tmp_path / "out" / "predictions.json")
    assert len(results) == count and results[0]["segmentation"]["size"] == [size, size]
    assert len(json.loads((tmp_path / "out" / "labelme" / "slide.json").read_text())["shapes"]) == count
    assert len(json.loads((tmp_path / "crops" / "crops.json").read_text())) == count


def test_a_run_stopped_half_way_keeps_the_images_done(tiny_coco, maskrcnn_ckpt, tmp_path, monkeypatch):
    from train_utils.jobs import predict as predict_job

    real, calls = predict_job.predict_image, []

    def predict_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a crash) during the second image
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_job, "predict_image", predict_then_stop)
    out = tmp_path / "pred"
    with pytest.raises(KeyboardInterrupt):
        run(maskrcnn_ckpt, out, tiny_coco / "images" / "val_*.png")
    index = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == [1] and (out / f"{index['images'][0]['stem']}_pred.png").is_file()
    results = read_lines_json(out / "predictions.json")
    assert results and {r["image_id"] for r in results} == {1}


def test_the_files_of_an_image_are_written_while_the_next_is_predicted(tiny_coco, maskrcnn_ckpt, tmp_path,
                                                                        monkeypatch):
    real_predict, real_overlay = jobs_predict.predict_image, jobs_predict.overlay
    second_predicting, predicted, drawn_after_waiting = threading.Event(), [], []

    def predict(*args, **kwargs):
        predicted.append(1)
        if len(predicted) == 2:
            second_predicting.set()
        return real_predict(*args, **kwargs)

    def draw(*args, **kwargs):
        if not drawn_after_waiting:  # image 1's picture waits for image 2's inference to begin (5 s at most)
            drawn_after_waiting.append(second_predicting.wait(timeout=5))
        return real_overlay(*args, **kwargs)

    monkeypatch.setattr(jobs_predict, "predict_image", predict)
    monkeypatch.setattr(jobs_predict, "overlay", draw)
    out = tmp_path / "pred"
    assert run(maskrcnn_ckpt, out, tiny_coco / "images" / "val_*.png") == 0
    assert drawn_after_waiting == [True]  # image 2 was being predicted while image 1 was drawn
    index = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == [1, 2] and (out / "val_001_pred.png").is_file()


@pytest.mark.parametrize("failing", [1, 2])  # 1: raised when image 2's files are handed over; 2 (the last): at the end
def test_a_write_that_fails_stops_the_run_with_its_error(tiny_coco, maskrcnn_ckpt, tmp_path, monkeypatch, failing):
    real_overlay, drawn = jobs_predict.overlay, []

    def draw(*args, **kwargs):
        drawn.append(1)
        if len(drawn) == failing:
            raise OSError(28, "No space left on device")
        return real_overlay(*args, **kwargs)

    monkeypatch.setattr(jobs_predict, "overlay", draw)
    out = tmp_path / "pred"
    with pytest.raises(OSError, match="No space left on device"):
        run(maskrcnn_ckpt, out, tiny_coco / "images" / "val_*.png")
    index = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == list(range(1, failing)) and index["failed"] == []
    assert {r["image_id"] for r in read_lines_json(out / "predictions.json")} == set(range(1, failing))


# ---------------------------------------------------------------------------------------------------------------
# the job's pieces

H, W = 48, 64


def test_output_stems_never_collide():
    paths = [Path("/d/a/img.png"), Path("/d/b/img.png"), Path("/d/c/x.png"), Path("/d/c/x.tif"),
             Path("/d/c/Cell.png"), Path("/d/e/cell.png"), Path("/d/f/solo.png")]
    stems = output_stems(paths)
    assert stems == ["a__img", "b__img", "x_png", "x_tif", "c__Cell", "e__cell", "solo"]
    assert output_stems([Path("/d/A.png"), Path("/d/a.png")]) == ["A_png", "a_png-2"]  # one file on a case-blind disk


def hand_output(overlap_scores: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Two crossing bars and a free one, as a model would return them ([N, 1, H, W] probabilities)."""
    masks = torch.zeros(3, 1, H, W)
    masks[0, 0, 20:26, 5:40] = 0.9
    masks[1, 0, 5:45, 18:24] = 0.8
    masks[2, 0, 10:40, 50:56] = 0.7
    out = {
        "boxes": torch.tensor([[5.0, 20, 39, 25], [18, 5, 23, 44], [50, 10, 55, 39]]),
        "labels": torch.tensor([1, 1, 2]),
        "scores": torch.tensor([0.9, 0.6, 0.3]),
        "masks": masks,
    }
    if overlap_scores is not None:
        out["overlap_scores"] = torch.tensor(overlap_scores)
        for key in ("overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge"):
            out[key] = masks * 0.5
    return out


def first(output: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {k: v[:count] for k, v in output.items()}


def test_overlay_outlines_only_detections_predicted_overlapping():
    image = torch.zeros(3, H, W)
    names = {1: "chromosome", 2: "marker"}
    marked = np.asarray(overlay(image, hand_output([0.9, 0.2, 0.1]), names, overlap_thresh=0.5))
    red = np.all(marked == OVERLAP_COLOR, axis=-1)
    assert red.any()
    unmarked = np.asarray(overlay(image, hand_output([0.4, 0.2, 0.1]), names, overlap_thresh=0.5))
    assert not np.all(unmarked == OVERLAP_COLOR, axis=-1).any()
    maskrcnn = np.asarray(overlay(image, hand_output(), names))
    assert not np.all(maskrcnn == OVERLAP_COLOR, axis=-1).any()
    empty = overlay(image, first(hand_output([0.9, 0.9, 0.9]), 0), names, title="none")
    assert empty.width >= W


@pytest.mark.parametrize("labels, boxes, captions", [
    ("full", True, ["1: chromosome 0.90", "2: chromosome 0.60", "3: marker 0.30"]),
    ("numbers", False, ["1", "2", "3"]),
    ("none", False, None),
])
def test_overlay_labels_choose_what_is_written_over_the_masks(labels, boxes, captions, monkeypatch):
    drawn = {}

    def fake_draw(image, masks, boxes, captions, overlapping, title=None):
        drawn.update(boxes=boxes, captions=captions, masks=masks, overlapping=overlapping)
        return Image.new("RGB", (W, H))

    monkeypatch.setattr(jobs_predict, "draw_instances", fake_draw)
    overlay(torch.zeros(3, H, W), hand_output([0.9, 0.2, 0.1]), {1: "chromosome", 2: "marker"}, labels=labels)
    assert (drawn["boxes"] is not None) == boxes and drawn["captions"] == captions
    assert drawn["masks"].size == (H, W) and len(drawn["masks"]) == 3
    assert drawn["overlapping"].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="unknown overlay labels 'boxes'"):
        overlay(torch.zeros(3, H, W), hand_output(), {1: "chromosome"}, labels="boxes")


def test_overlay_labels_flag_reaches_the_pictures(tiny_coco, maskrcnn_ckpt, tmp_path, monkeypatch):
    drawn = []
    real_draw = jobs_predict.draw_instances

    def spy(image, masks, boxes, captions, overlapping, title=None):
        drawn.append((boxes, captions))
        return real_draw(image, masks, boxes, captions, overlapping, title=title)

    monkeypatch.setattr(jobs_predict, "draw_instances", spy)
    image = tiny_coco / "images" / "val_001.png"
    assert run(maskrcnn_ckpt, tmp_path / "out", image, extra=("--overlay-labels", "numbers")) == 0
    assert len(drawn) == 1 and drawn[0][0] is None and drawn[0][1] == ["1", "2", "3"]
    assert (tmp_path / "out" / f"{image.stem}_pred.png").is_file()


def test_overlap_maps_are_grey_pictures_of_the_maximum():
    from test_detect import roi_output

    rois = roi_output(overlap=True)
    out = paste_detections(rois, (H, W))
    pictures = overlap_map_images(out)
    assert set(pictures) == {"overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge"}
    grey = np.asarray(pictures["overlap_mask"])
    assert pictures["overlap_mask"].mode == "L" and grey.shape == (H, W)
    assert np.array_equal(grey, (out["overlap_mask"] * 255).round().to(torch.uint8).numpy())
    none = overlap_map_images(paste_detections(first(rois, 0), (H, W)))
    assert (np.asarray(none["overlap_edge"]) == 0).all() and none["overlap_edge"].size == (W, H)


def test_out_of_memory_is_recognised_and_other_errors_are_not():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 144000000 bytes."))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_label_maps_come_from_the_checkpoint_or_a_label_json(tmp_path):
    config = ModelConfig(num_classes=2)
    checkpoint = {"label_names": {1: "chromosome", 2: "marker"}, "label_to_cat_id": {1: 7, 2: 9}}
    assert label_maps(checkpoint, config) == ({1: "chromosome", 2: "marker"}, {1: 7, 2: 9})
    assert label_maps({}, config) == ({1: "class 1", 2: "class 2"}, {1: 1, 2: 2})
    renamed = tmp_path / "labels.json"
    renamed.write_text('{"1": "A", "2": "B"}')
    assert label_maps(checkpoint, config, renamed)[0] == {1: "A", 2: "B"}
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"1": "A"}')
    with pytest.raises(UserError, match=r"wrong\.json names labels \[1\] but the model has 2 class"):
        label_maps(checkpoint, config, wrong)


# ---------------------------------------------------------------------------------------------------------------
# --export and summary.csv

SUMMARY_HEADER = "image_id,file,stem,detections,overlapping,to_review,mean_score,inference_ms,count_flag,status"


def read_summary(out: Path) -> list[dict[str, str]]:
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0] == SUMMARY_HEADER
    return [dict(zip(SUMMARY_HEADER.split(","), line.split(",", 9))) for line in lines[1:]]


def test_export_writes_every_format_from_the_saved_detections(tiny_coco, maskrcnn_ckpt, tmp_path):
    from pycocotools import mask as mask_utils

    from my_dataset_chromosome import ChromosomeDataset
    from test_outlines import rasterise
    from train_utils.outputs.outlines import mask_polygons

    roifile = pytest.importorskip("roifile")
    out = tmp_path / "pred"
    formats = ("labelme", "imagej", "geojson", "coco", "labelme")  # a repeat is written once
    assert run(maskrcnn_ckpt, out, tiny_coco / "images" / "val_*.png", extra=("--export", *formats)) == 0
    results = read_lines_json(out / "predictions.json")
    dataset = ChromosomeDataset(out, "predicted")  # the coco export, as train.py reads it
    assert len(dataset) == 2
    for index, stem in enumerate(("val_001", "val_002")):
        predicted = [mask_utils.decode(r["segmentation"]).astype(bool) for r in results if r["image_id"] == index + 1]
        assert len(predicted) == 3
        shapes = json.loads((out / "labelme" / f"{stem}.json").read_text())["shapes"]
        assert sorted({s["description"].split()[0] for s in shapes}) == ["#1", "#2", "#3"]
        assert [roi.name for roi in roifile.roiread(out / f"{stem}_rois.zip")] == ["1", "2", "3"]
        assert len(json.loads((out / f"{stem}.geojson").read_text())["features"]) == 3
        exported = dataset[index][1]["masks"].numpy().astype(bool)
        assert len(exported) == 3
        for mask, outline in zip(predicted, exported):  # the saved masks (an untrained model's: pinholes, specks)
            assert np.array_equal(outline, rasterise(mask_polygons(mask), *mask.shape))
            assert (mask & outline).sum() >= 0.95 * mask.sum() and (mask & outline).sum() >= 0.9 * outline.sum()
    rows = read_summary(out)
    assert [(r["image_id"], r["stem"], r["detections"], r["overlapping"], r["count_flag"], r["status"])
            for r in rows] == [("1", "val_001", "3", "", "-43", "ok"), ("2", "val_002", "3", "", "-43", "ok")]
    assert float(rows[0]["mean_score"]) == pytest.approx(np.mean([r["score"] for r in results[:3]]), abs=1e-4)


def test_export_takes_the_final_detections_of_tta_and_stain(tiny_coco, dacseg_ckpt, tmp_path):
    out = tmp_path / "pred"
    assert run(dacseg_ckpt, out, tiny_coco / "images" / "val_001.png",
               extra=("--tta", "--stain", "invert", "--export", "labelme", "--review-below", "1.0",
                      "--expected-count", "0")) == 0
    results = read_lines_json(out / "predictions.json")
    shapes = json.loads((out / "labelme" / "val_001.json").read_text())["shapes"]
    numbered = {int(s["description"].split()[0][1:]): s for s in shapes}
    assert sorted(numbered) == list(range(1, len(results) + 1))  # one outline per detection kept by --tta
    for k, result in enumerate(results, 1):
        assert f"score={result['score']:.4f} overlap_score={result['overlap_score']:.4f}" in numbered[k]["description"]
        assert numbered[k]["flags"] == {"review": True, "overlapping": result["overlap_score"] >= 0.5}
    [row] = read_summary(out)
    assert row["overlapping"] == str(sum(r["overlap_score"] >= 0.5 for r in results))
    assert row["to_review"] == str(len(results)) and row["count_flag"] == ""


def test_a_failed_image_is_marked_in_summary_csv_and_has_no_exports(tiny_coco, maskrcnn_ckpt, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "good.png").write_bytes((tiny_coco / "images" / "val_002.png").read_bytes())
    out = tmp_path / "pred"
    assert run(maskrcnn_ckpt, out, folder, extra=("--export", "labelme", "geojson", "coco")) == 2
    assert [f["id"] for f in json.loads((out / "images.json").read_text())["failed"]] == [1]
    broken, good = read_summary(out)
    assert broken["stem"] == "broken" and broken["status"].startswith("failed: ") and broken["detections"] == ""
    assert good["status"] == "ok" and good["detections"] == "3"
    assert [p.name for p in (out / "labelme").iterdir()] == ["good.json"] and not (out / "broken.geojson").exists()
    coco = json.loads((out / "annotations" / "instances_predicted.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["good.png"]


@pytest.mark.parametrize("flags, says", [
    (("--export", "tiff"), "argument --export: invalid choice: 'tiff'"),
    (("--expected-count", "-1"), "argument --expected-count: -1 must be >= 0"),
    (("--review-below", "1.5"), "argument --review-below: 1.5 must be <= 1.0"),
])
def test_export_flags_are_checked_by_the_parser(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--weights-path", "w.pth", "cell.png", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and says in err, err
