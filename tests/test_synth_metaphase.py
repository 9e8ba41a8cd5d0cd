"""The synthetic metaphase generator: layout, exact annotations, statistics, determinism, splits, command line."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tools import synth_metaphase
from tools.coco_layout import polygon_bbox_area
from tools.synth_metaphase import SynthConfig, coco_statistics, image_seed, render_metaphase, sample_karyotype

SMALL = ["--size", "384x288"]


def _generate(root: Path, *args: str) -> int:
    return synth_metaphase.main(["--out", str(root), *SMALL, *args])


def _masks(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """[N, H, W] bool masks decoded with pycocotools from the annotations' polygons."""
    rles = [mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], height, width)) for a in annotations]
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    assert _generate(root, "--num-images", "3", "--seed", "3", "--overlap-rate", "0.3") == 0
    return root


@pytest.fixture(scope="module")
def synth_doc(synth_root) -> dict:
    return json.loads((synth_root / "annotations" / "instances_train.json").read_text())


def test_layout_loads_in_pycocotools_and_the_dataset(synth_root, synth_doc):
    coco = COCO(str(synth_root / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == 3
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["chromosome"]
    for image in synth_doc["images"]:
        with Image.open(synth_root / "images" / image["file_name"]) as im:
            assert im.size == (384, 288) == (image["width"], image["height"])
        assert 44 <= len(coco.getAnnIds(imgIds=image["id"])) <= 48  # 46 with occasional aneuploidy

    from my_dataset_chromosome import ChromosomeDataset
    dataset = ChromosomeDataset(synth_root, "train")
    image, target = dataset[0]
    assert image.shape == (3, 288, 384)
    assert target["masks"].shape[0] == len(coco.getAnnIds(imgIds=dataset.ids[0])) == target["overlapping"].shape[0]
    assert bool(target["masks"].flatten(1).any(1).all())


def test_bbox_and_area_agree_with_the_polygons(synth_doc):
    for ann in synth_doc["annotations"]:
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1 and len(ann["segmentation"]) == 1
        bbox, area = polygon_bbox_area(ann["segmentation"], 288, 384)
        assert ann["bbox"] == pytest.approx(bbox) and ann["area"] == pytest.approx(area)
        x, y, w, h = ann["bbox"]
        assert area > 10 and x >= 0 and y >= 0 and x + w <= 384 and y + h <= 288


def test_overlapping_flag_is_twenty_pixels_shared_with_the_others(synth_doc):
    checked = 0
    for image in synth_doc["images"]:
        anns = [a for a in synth_doc["annotations"] if a["image_id"] == image["id"]]
        masks = _masks(anns, 288, 384)
        coverage = masks.sum(0)
        shared = (masks & (coverage - masks > 0)).sum((1, 2))
        assert [a["overlapping"] for a in anns] == [bool(s >= 20) for s in shared]
        checked += sum(a["overlapping"] for a in anns)
    assert checked > 0  # --overlap-rate 0.3 made some


def test_masks_are_amodal_where_chromosomes_cross():
    """A crossing: both polygons cover the shared pixels (nothing is cut out of the lower one)."""
    config = SynthConfig(width=384, height=288, overlap_rate=1.0)
    _, anns = render_metaphase(image_seed(0, "train", 0), config)
    flat = _masks(anns, 288, 384).reshape(len(anns), -1).astype(np.float32)
    pairs = flat @ flat.T  # pixels shared by each pair
    np.fill_diagonal(pairs, 0)
    assert pairs.max() >= 20


def test_overlap_rate_controls_the_overlapping_fraction():
    def fraction(rate: float) -> float:
        config = SynthConfig(width=384, height=288, overlap_rate=rate)
        flags = [a["overlapping"] for i in range(3) for a in render_metaphase(image_seed(1, "t", i), config)[1]]
        return float(np.mean(flags))

    none, default, high = fraction(0.0), fraction(SynthConfig.overlap_rate), fraction(0.6)
    assert none <= 0.03
    assert 0.01 <= default <= 0.16  # the real data: about 1 in 14
    assert high >= 0.3


def test_karyotype_lengths_and_counts():
    rng = np.random.default_rng(0)
    normal = sample_karyotype(rng, 46, aneuploidy_rate=0.0)
    counts = Counter(normal)
    assert len(normal) == 46 and all(counts[str(i)] == 2 for i in range(1, 23))
    assert counts["X"] + counts["Y"] == 2
    assert {len(sample_karyotype(rng, 46, aneuploidy_rate=1.0)) for _ in range(20)} <= {45, 47}
    assert len(sample_karyotype(rng, 12, aneuploidy_rate=0.0)) == 12

    config = SynthConfig(width=768, height=576, aneuploidy_rate=0.0)
    areas: dict[str, list[float]] = {}
    for i in range(2):
        for ann in render_metaphase(image_seed(2, "t", i), config)[1]:
            areas.setdefault(ann["karyotype"], []).append(ann["area"])
    ratio = np.mean(areas["1"]) / np.mean(areas["21"])
    assert 3.0 <= ratio <= 6.5  # lengths about 4.4 : 1, the round tips make the area ratio a little larger
    assert np.mean(areas["1"]) > np.mean([a for name, values in areas.items() for a in values])


def test_statistics_are_printed_and_computed(synth_doc, capsys, tmp_path):
    stats = coco_statistics(synth_doc)
    assert stats["images"] == 3 and stats["instances"] == len(synth_doc["annotations"])
    assert 44 <= stats["instances_per_image"] <= 48
    flags = [a["overlapping"] for a in synth_doc["annotations"]]
    assert stats["overlapping_fraction"] == pytest.approx(np.mean(flags))
    percentiles = list(stats["area_percentiles"].values())
    assert percentiles == sorted(percentiles) and percentiles[0] > 10
    assert stats["area_p95_over_p5"] > 3  # chromosome 1 against 21, 22, Y

    without_flags = {**synth_doc, "annotations": [{k: v for k, v in a.items() if k != "overlapping"}
                                                  for a in synth_doc["annotations"]]}
    assert coco_statistics(without_flags)["overlapping_fraction"] == pytest.approx(stats["overlapping_fraction"])

    assert _generate(tmp_path, "--num-images", "1") == 0
    out = capsys.readouterr().out
    assert "instances/image: mean" in out and "overlapping fraction" in out and "p95" in out


def test_same_seed_gives_identical_files_whatever_the_workers(tmp_path):
    args = ["--num-images", "3", "--seed", "11", "--size", "256x192"]
    assert synth_metaphase.main(["--out", str(tmp_path / "a"), *args]) == 0
    assert synth_metaphase.main(["--out", str(tmp_path / "b"), *args, "--workers", "2"]) == 0
    assert synth_metaphase.main(["--out", str(tmp_path / "c"), *args[:-2], "--seed", "12", "--size", "256x192"]) == 0
    ann = Path("annotations") / "instances_train.json"
    assert (tmp_path / "a" / ann).read_bytes() == (tmp_path / "b" / ann).read_bytes()
    assert (tmp_path / "a" / ann).read_bytes() != (tmp_path / "c" / ann).read_bytes()
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(names) == 3
    for name in names:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def test_second_split_is_added_without_touching_the_first(tmp_path):
    assert _generate(tmp_path, "--num-images", "2", "--split", "train") == 0
    train_json = (tmp_path / "annotations" / "instances_train.json").read_bytes()
    train_images = {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()}
    assert _generate(tmp_path, "--num-images", "2", "--split", "val") == 0
    assert (tmp_path / "annotations" / "instances_train.json").read_bytes() == train_json
    assert {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir() if p.name in train_images} == train_images
    val = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    val_names = {image["file_name"] for image in val["images"]}
    assert len(val_names) == 2 and not val_names & set(train_images)
    assert all((tmp_path / "images" / name).is_file() for name in val_names)


def test_gband_is_dark_on_light_and_crossings_are_darker():
    """Stain absorbs in G-band (a crossing is darker) and fluoresces in Q-band (a crossing is brighter)."""
    for stain, sign in (("gband", -1), ("qband", 1)):
        config = SynthConfig(width=384, height=288, stain=stain, overlap_rate=1.0, nucleus_rate=0.0)
        image, anns = render_metaphase(image_seed(4, "t", 0), config)
        coverage = _masks(anns, 288, 384).sum(0)
        background, single, double = (image[coverage == k].astype(float).mean() for k in (0, 1, 2))
        assert sign * (single - background) > 40
        assert sign * (double - single) > 5


def test_bad_arguments_give_one_line_and_status_2(tmp_path, capsys):
    for bad in (["--size", "12x5"], ["--size", "big"], ["--overlap-rate", "1.5"], ["--workers", "0"], ["--seed", "-3"]):
        with pytest.raises(SystemExit) as exit_info:
            synth_metaphase.main(["--out", str(tmp_path), "--num-images", "1", *bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and bad[0] in err

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert synth_metaphase.main(["--out", str(blocker / "x"), "--num-images", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(blocker / "x") in err and len(err.splitlines()) == 1
