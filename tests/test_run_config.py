"""train_utils.engine.run_config and setup.resolve_run: the model config the flags describe, one frozen config made
in one place and recorded as it ran, and (by AST) that nothing assigns to it afterwards and the layers run one way."""
from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from network_files.config import ModelConfig
from train_utils.cli import UserError, parse_args
from train_utils.distributed import DistInfo
from train_utils.engine import setup
from train_utils.engine.run_config import model_config_from_args

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--data-path", "D"]
CONFIG_TYPES = {"RunConfig", "DataSettings", "OptimizerSettings", "ScheduleSettings", "OutputSettings", "StainSettings",
                "Labels"}  # the resolved config and its pieces (its model piece is reached through it)


def test_model_config_from_args():
    args = parse_args(DATA + ["--model", "dacseg", "--backbone", "resnet101", "--trainable-backbone-layers", "2",
                              "--norm-layer", "frozen_bn", "--min-size", "256", "--max-size", "320",
                              "--anchor-sizes", "8", "16", "32", "64", "128", "--box-score-thresh", "0.1",
                              "--box-nms-thresh", "0.4", "--detections-per-img", "60", "--overlap-cls-head", "conv",
                              "--min-overlap-area", "30", "--loss-weights", "loss_overlap=2", "--fusion", "gated",
                              "--crossing-mask-weight", "2.5", "--neighbour-mask-weight", "3",
                              "--shape-prior", "codebook.pt",
                              "--shape-prior-nearest", "3"])
    config = model_config_from_args(args, num_classes=3)
    assert config == ModelConfig(name="dacseg", num_classes=3, backbone="resnet101", trainable_layers=2,
                                 norm_layer="frozen_bn", min_size=256, max_size=320, anchor_sizes=(8, 16, 32, 64, 128),
                                 box_score_thresh=0.1, box_nms_thresh=0.4, box_detections_per_img=60,
                                 overlap_cls_head="conv", min_overlap_area=30.0, loss_weights={"loss_overlap": 2.0},
                                 fusion="gated", crossing_mask_weight=2.5, neighbour_mask_weight=3.0,
                                 shape_prior="codebook.pt",
                                 shape_prior_nearest=3)
    plain = model_config_from_args(parse_args(DATA))
    assert plain.num_classes == 1 and plain.trainable_layers is None and plain.norm_layer is None


def test_model_config_from_args_turns_config_errors_into_user_errors():
    args = parse_args(DATA)
    args.backbone = "vgg"  # the parser's choices prevent this; callers building args by hand get one line
    with pytest.raises(UserError, match="vgg"):
        model_config_from_args(args)


def test_resolve_run_reads_the_flags_once_into_a_frozen_config(tiny_coco, tmp_path):
    args = parse_args(["--data-path", str(tiny_coco), "--output-dir", str(tmp_path / "out"), "--device", "cpu",
                       "-b", "2", "--accumulate-steps", "50", "--epochs", "4", "--workers", "0"])
    given = dict(vars(args))
    config, inputs = setup.resolve_run(args, DistInfo(), torch.device("cpu"), print)
    assert vars(args) == given  # only read
    for piece in (config, config.data, config.data.stain, config.data.labels, config.optimizer, config.schedule,
                  config.output):
        with pytest.raises(dataclasses.FrozenInstanceError):
            piece.seed = 1
    # what ran, in place of the automatic values, in the flags' order
    record = config.record()
    assert list(record) == list(given) + ["stain_polarity", "stain_counts"]
    assert (record["accumulate_steps"], record["lr"], record["warmup_iters"]) == (2, 0.02, 2)
    assert (record["model"], record["min_overlap_area"], record["amp"]) == ("maskrcnn", 20.0, False)
    assert record["seed"] == config.seed is not None and record["stain_polarity"] == config.data.stain.polarity
    assert inputs.notes[-1].startswith("lr 0.02: 0.02 per 4 images scaled to a total batch of 4")
    assert not (tmp_path / "out").exists()  # nothing is written while resolving


# ---------------------------------------------------------------------------------------------------------------
# AST checks over the library, the scripts, tools/ and bench/


def _sources(*words: str) -> list[tuple[str, ast.Module]]:
    """Every module of ours but the tests (the scripts at the root and the folders) whose text has one of
    ``words``: a value can only be annotated with a type in a module that names it."""
    return [(where, ast.parse(text)) for where, text in _texts() if any(word in text for word in words)]


@functools.lru_cache(maxsize=1)
def _texts() -> tuple[tuple[str, str], ...]:
    folders = [p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "tests"]
    paths = sorted(ROOT.glob("*.py")) + sorted(path for folder in folders for path in folder.rglob("*.py"))
    return tuple((str(path.relative_to(ROOT)), path.read_text()) for path in paths)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _annotated(annotation: ast.AST | None, names: set[str]) -> bool:
    """Whether an annotation names one of ``names`` (``RunConfig``, ``RunConfig | None``, ``"RunConfig"``...)."""
    if annotation is None:
        return False
    text = annotation.value if isinstance(annotation, ast.Constant) else ast.unparse(annotation)
    return any(part.strip().split(".")[-1] in names for part in str(text).replace("|", " ").split())


def _targets(node: ast.AST) -> list[ast.AST]:
    """Every target an assignment, deletion or attribute-setting call writes."""
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    elif isinstance(node, ast.Delete):
        targets = list(node.targets)
    elif isinstance(node, ast.Call) and _dotted(node.func) in ("setattr", "delattr", "object.__setattr__") \
            and node.args:
        return [ast.Attribute(value=node.args[0], attr="?")]
    else:
        return []
    flat = []
    while targets:
        target = targets.pop()
        if isinstance(target, (ast.Tuple, ast.List)):
            targets.extend(target.elts)
        else:
            flat.append(target)
    return flat


def writes_to(tree: ast.Module, where: str, types: set[str], resolvers: tuple[str, ...] = ()) -> list[str]:
    """Assignments to an attribute of a value of one of ``types``: a parameter or variable annotated with it, a
    ``self.<field>`` whose class annotates the field with it, or the first value a ``resolvers`` call returns."""
    found = []
    fields_of = {}
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        fields = {f"self.{n.target.id}" for n in cls.body if isinstance(n, ast.AnnAssign)
                  and isinstance(n.target, ast.Name) and _annotated(n.annotation, types)}
        for method in cls.body:
            fields_of[method] = fields
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        arguments = func.args.posonlyargs + func.args.args + func.args.kwonlyargs
        roots = {a.arg for a in arguments if _annotated(a.annotation, types)} | fields_of.get(func, set())
        nodes = list(ast.walk(func))
        for node in nodes:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and _annotated(node.annotation, types):
                roots.add(node.target.id)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                    and (_dotted(node.value.func) or "").split(".")[-1] in resolvers:
                first = node.targets[0].elts[0] if isinstance(node.targets[0], ast.Tuple) else node.targets[0]
                if isinstance(first, ast.Name):
                    roots.add(first.id)
        if not roots:
            continue
        for node in nodes:
            for target in _targets(node):
                held = _dotted(target.value) if isinstance(target, (ast.Attribute, ast.Subscript)) else None
                if held is not None and any(held == root or held.startswith(root + ".") for root in roots):
                    found.append(f"{where}:{node.lineno} {ast.unparse(node).splitlines()[0]}")
    return found


def test_nothing_assigns_to_the_resolved_config():
    """The run config is decided in ``setup.resolve_run`` only: no code assigns to (or deletes, or setattr's) an
    attribute of a ``RunConfig`` or one of its pieces, wherever it travels (frozen dataclasses refuse it at run time
    too, but only on the path a test takes)."""
    found = [hit for where, tree in _sources(*CONFIG_TYPES, "resolve_run")
             for hit in writes_to(tree, where, CONFIG_TYPES, ("resolve_run",))]
    assert found == []


def test_no_stage_rewrites_the_command_line():
    """After parsing (``train_utils/cli.py`` finishes its Namespace), nothing assigns to a flag."""
    found = [hit for where, tree in _sources("Namespace") if where != "train_utils/cli.py"
             for hit in writes_to(tree, where, {"Namespace"})]
    assert found == []


@pytest.mark.parametrize("code", [
    "def f(config: RunConfig):\n    config.seed = 1",
    "def f(config: 'RunConfig | None'):\n    config.data.workers += 1",
    "def f(args, info):\n    config, inputs = setup.resolve_run(args, info)\n    setattr(config, 'seed', 1)",
    "class Job:\n    config: RunConfig\n    def go(self):\n        self.config.optimizer.lr = 0.1",
    "def f(settings: OptimizerSettings):\n    object.__setattr__(settings, 'lr', 0.1)",
])
def test_the_check_finds_a_write(code):
    assert len(writes_to(ast.parse(code), "x.py", CONFIG_TYPES, ("resolve_run",))) == 1


def _imports(folder: str) -> list[tuple[str, str]]:
    found = []
    for where, text in _texts():
        if not where.startswith(folder + "/"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module:
                found += [(Path(where).name, f"{node.module}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(Path(where).name, alias.name) for alias in node.names]
    return found


def test_layers_run_one_way():
    """Scoring sits below the training run (``train_utils/data`` and ``train_utils/distributed.py`` serve both), and
    the engine takes settings, not command lines."""
    assert [(f, m) for f, m in _imports("train_utils/evaluation") if m.startswith("train_utils.engine")] == []
    assert [(f, m) for f, m in _imports("train_utils/engine") if m.startswith("train_utils.cli")] == []
    assert [(f, m) for f, m in _imports("train_utils/data") if m.startswith(("train_utils.engine",
                                                                           "train_utils.evaluation"))] == []
    assert ("score.py", "train_utils.distributed") in _imports("train_utils/evaluation")  # the check sees imports
