"""The shape prior: nearest-centre lookup, the codebook file and its checks, the refinement head inside DaCSeg (shapes
for any number of RoIs, losses and gradients, the codebook travelling in the state dict)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import train
from network_files import ModelConfig, build_model
from network_files.shape_prior import (
    CODE_DIM,
    MASK_SIZE,
    CodebookError,
    ShapeAutoencoder,
    ShapePriorHead,
    decode_centres,
    nearest_centres,
    read_codebook,
    save_codebook,
)
from tests.test_dacseg import CROSSING_BARS, HEIGHT, WIDTH, bars_sample, empty_target, fixed_detections, make_fast
from tests.test_train import tiny_args
from train_utils.engine.checkpoint import model_from_checkpoint


def write_codebook(path: Path, num_classes: int = 1, k: int = 4, seed: int = 0) -> Path:
    """An untrained autoencoder and random centres: enough for the plumbing."""
    torch.manual_seed(seed)
    save_codebook(path, ShapeAutoencoder(), torch.randn(num_classes, k, CODE_DIM), torch.ones(num_classes, k),
                  {"split": "train"})
    return path


def prior_config(codebook: Path, **kwargs) -> ModelConfig:
    options = dict(name="dacseg", backbone="resnet18", overlap_cls_head="conv", min_size=128, max_size=160, trainable_layers=0,
                   norm_layer="bn", shape_prior=str(codebook), shape_prior_nearest=2)
    options.update(kwargs)
    return ModelConfig(**options)


@pytest.fixture(scope="module")
def codebook(tmp_path_factory) -> Path:
    return write_codebook(tmp_path_factory.mktemp("codebook") / "codebook.pt")


@pytest.fixture(scope="module")
def base_model(codebook):
    torch.manual_seed(0)
    return build_model(prior_config(codebook))


@pytest.fixture
def model(base_model):
    torch.manual_seed(0)
    return make_fast(copy.deepcopy(base_model))


def test_nearest_centres_on_hand_made_codes():
    centres = torch.zeros(4, CODE_DIM)
    centres[1, 0], centres[2, 0], centres[3, 1] = 1.0, 3.0, 10.0  # 0 at the origin, 1 and 2 along x, 3 far away
    codes = torch.zeros(3, CODE_DIM)
    codes[0, 0], codes[1, 0], codes[2, 1] = 0.9, 2.6, 9.0
    assert nearest_centres(codes, centres, 1).tolist() == [[1], [2], [3]]
    assert nearest_centres(codes, centres, 2).tolist() == [[1, 0], [2, 1], [3, 0]]  # nearest first
    assert nearest_centres(codes[:0], centres, 2).shape == (0, 2)
    own = torch.stack([centres, centres.flip(0), centres])  # each code its own centres: the second's reversed
    assert nearest_centres(codes, own, 1).tolist() == [[1], [1], [3]]
    assert nearest_centres(codes[:0], own[:0], 2).shape == (0, 2)


def test_the_head_refuses_a_roi_size_its_encoder_cannot_read():
    with pytest.raises(ValueError, match="needs 14px mask RoIs, got 7px"):
        ShapePriorHead(8, 2, roi_size=7)


def test_priors_are_the_decoded_centres_nearest_to_the_coarse_mask_of_each_class():
    """The centres are the codes of hand-made shapes, two per class: each shape finds its own centre, within its
    RoI's class, and gets that centre's decoded shape."""
    torch.manual_seed(0)
    autoencoder = ShapeAutoencoder().eval()
    shapes = torch.zeros(4, MASK_SIZE, MASK_SIZE)
    shapes[0, :, 10:18] = 1  # class 1: a vertical bar and a horizontal one
    shapes[1, 10:18, :] = 1
    shapes[2, :14, :14] = 1  # class 2: two corner squares
    shapes[3, 14:, 14:] = 1
    with torch.no_grad():
        centres = autoencoder.encoder(shapes[:, None]).reshape(2, 2, CODE_DIM)
    head = ShapePriorHead(256, num_classes=3, nearest=1)
    head.load_codebook(read_codebook_from(autoencoder, centres))
    templates = decode_centres(autoencoder, centres)
    assert torch.equal(head.templates, templates)
    labels = torch.tensor([2, 1, 1, 2])
    coarse = shapes[[3, 0, 1, 2]]
    priors = head.priors(coarse, labels)
    assert priors.shape == (4, 1, MASK_SIZE, MASK_SIZE)
    expected = torch.stack([templates[1, 1], templates[0, 0], templates[0, 1], templates[1, 0]])
    assert torch.equal(priors[:, 0], expected)


def read_codebook_from(autoencoder: ShapeAutoencoder, centres: torch.Tensor):
    from network_files.shape_prior import Codebook

    return Codebook(autoencoder, centres, torch.ones(centres.shape[:2]), {})


@pytest.mark.parametrize("counts", [(0,), (1,), (3, 1)])
def test_shapes_line_up_for_any_number_of_detections(model, monkeypatch, counts):
    model.eval()
    boxes_of = [torch.tensor([[20.0, 56, 120, 72], [62, 16, 78, 112], [130, 20, 150, 40]])[:n] for n in counts]
    monkeypatch.setattr(model.roi_heads, "postprocess_detections", fixed_detections(boxes_of))
    image, _ = bars_sample(CROSSING_BARS)
    with torch.no_grad():
        outputs = model([image] * len(counts))
    for output, n in zip(outputs, counts):
        assert output["masks"].shape == (n, 1, HEIGHT, WIDTH)
        assert output["overlap_scores"].shape == (n,)
        assert torch.isfinite(output["masks"]).all()
    if counts == (3, 1):  # one image alone gives the same masks as in the batch
        monkeypatch.setattr(model.roi_heads, "postprocess_detections", fixed_detections(boxes_of[1:]))
        with torch.no_grad():
            (alone,) = model([image])
        assert torch.allclose(alone["masks"], outputs[1]["masks"], atol=1e-4)


def test_the_final_mask_is_the_refined_one(model, monkeypatch):
    model.eval()
    boxes = [torch.tensor([[20.0, 56, 120, 72], [62, 16, 78, 112]])]
    monkeypatch.setattr(model.roi_heads, "postprocess_detections", fixed_detections(boxes))
    image, _ = bars_sample(CROSSING_BARS)
    with torch.no_grad():
        (before,) = model([image])
        model.roi_heads.shape_prior.mask_predictor.mask_fcn_logits.bias.add_(5.0)
        (after,) = model([image])
    assert (after["masks"] >= before["masks"]).all() and after["masks"].sum() > before["masks"].sum() + 100


def test_training_losses_and_gradients(model):
    model.train()
    image, target = bars_sample(CROSSING_BARS)
    encoder_before = copy.deepcopy(model.roi_heads.shape_prior.encoder.state_dict())
    centres_before = model.roi_heads.shape_prior.centres.clone()
    losses = model([image, image], [target, empty_target()])
    assert {"loss_mask", "loss_coarse_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    prior = model.roi_heads.shape_prior
    for part in (prior.fusion, prior.mask_head, prior.mask_predictor, model.roi_heads.mask_predictor):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None and not p.requires_grad for p in prior.encoder.parameters())  # frozen
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in prior.encoder.parameters()}  # the optimizer never sees it
    assert torch.equal(prior.centres, centres_before)
    for key, value in prior.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key])

    losses = model([image], [empty_target()])  # no positive RoI: both mask terms are 0, with gradients
    assert losses["loss_mask"].item() == 0.0 and losses["loss_coarse_mask"].item() == 0.0
    sum(losses.values()).backward()


def test_the_codebook_travels_in_the_state_dict(base_model, tmp_path):
    state = base_model.state_dict()
    assert state["roi_heads.shape_prior.centres"].shape == (1, 4, CODE_DIM)
    assert state["roi_heads.shape_prior.templates"].shape == (1, 4, MASK_SIZE, MASK_SIZE)
    config = prior_config(tmp_path / "gone.pt")  # the codebook file is not needed any more
    rebuilt, _ = model_from_checkpoint({"model": state, "model_config": config.to_dict()}, "ckpt")
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_config_checks():
    with pytest.raises(ValueError, match="needs --model dacseg"):
        ModelConfig(name="maskrcnn", shape_prior="codebook.pt")
    with pytest.raises(ValueError, match="at least 1"):
        ModelConfig(name="dacseg", shape_prior="codebook.pt", shape_prior_nearest=0)
    with pytest.raises(ValueError, match="loss_coarse_mask needs --shape-prior"):
        ModelConfig(name="dacseg", loss_weights={"loss_coarse_mask": 0.5})
    ModelConfig(name="dacseg", shape_prior="codebook.pt", loss_weights={"loss_coarse_mask": 0.5})


def bad_codebook(path: Path, case: str) -> Path:
    if case == "classes":
        write_codebook(path, num_classes=2)
    elif case == "corrupt":
        path.write_bytes(write_codebook(path.with_name("good.pt")).read_bytes()[:300])
    elif case == "other":
        torch.save({"weights": torch.zeros(2)}, path)
    elif case == "few":
        write_codebook(path, k=1)
    return path


@pytest.mark.parametrize("case, says", [
    ("classes", "holds shapes of 2 class(es) but the model has 1"),
    ("corrupt", "cannot read shape codebook"),
    ("other", "is not a shape codebook"),
    ("missing", "shape codebook not found"),
    ("few", "has 1 shape(s) per class, fewer than the 2 nearest"),
])
def test_a_bad_codebook_is_one_line_naming_it(tmp_path, case, says):
    path = bad_codebook(tmp_path / "codebook.pt", case)
    with pytest.raises(CodebookError) as error:
        ShapePriorHead(256, num_classes=2, nearest=2).load_codebook(read_codebook(path, num_classes=1), path)
    message = str(error.value)
    assert says in message and str(path) in message and "\n" not in message, message


def test_train_py_says_it_in_one_line(tiny_coco, tmp_path, capsys):
    path = bad_codebook(tmp_path / "codebook.pt", "classes")
    assert train.main(tiny_args(tiny_coco, tmp_path / "out", "--model", "dacseg", "--shape-prior", str(path))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err
    assert not (tmp_path / "out").exists()
