"""train_multi_GPU.py under torchrun with two CPU processes (gloo): one epoch, files written once, metrics equal to
a one-process evaluation, resume on another process count, and a failing process ending the job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
import train_multi_GPU
from train_utils.outputs.results import parse_epoch_line, read_jsonl

REPO = Path(__file__).resolve().parents[1]
DACSEG_TERMS = ("loss_overlap_cls", "loss_overlap", "loss_overlap_edge", "loss_overlap_else", "loss_overlap_else_edge")


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--output-dir", str(out), "--device", "cpu", "--workers", "0", "-b", "1",
            "--backbone", "resnet18", "--min-size", "128", "--max-size", "160", "--trainable-backbone-layers", "0",
            "--lr", "0.002",
            "--model", "dacseg", "--overlap-cls-head", "conv", "--seed", "0", "--dist-timeout", "60", *extra]


def torchrun(script: str | Path, argv: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(tiny_coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    run = torchrun("train_multi_GPU.py", tiny_args(tiny_coco, out, "--epochs", "1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run


def test_one_epoch_written_once(ddp_run):
    out, run = ddp_run
    for name in ("det_results.txt", "seg_results.txt"):
        lines = (out / name).read_text().splitlines()
        assert len(lines) == 1 and parse_epoch_line(lines[0])[0] == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 1 and records[0]["num_images"] == 2  # both processes' shards were evaluated
    assert all(isinstance(records[0][k], float) for k in DACSEG_TERMS)  # all ten loss terms
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "model_0.pth"]
    assert run.stdout.count("epoch 0: loss") == 1  # only process 0 reports


def test_distributed_metrics_equal_one_process(ddp_run, tiny_coco, tmp_path):
    out, _ = ddp_run
    single = tmp_path / "single"
    # train_multi_GPU.py without torchrun is a one-process job
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes (OMP_NUM_THREADS=1): the same float sums, the same scores
    try:
        assert train_multi_GPU.main(tiny_args(tiny_coco, single, "--test-only", "--resume",
                                              str(out / "model_0.pth"))) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((single / "record_mAP.json").read_text())
    distributed = read_jsonl(out / "metrics.jsonl")[0]
    for iou_type in ("bbox", "segm"):
        assert record[iou_type]["stats"] == distributed[iou_type]["stats"]
    for key in ("num_images", "num_detections", "num_detections_at_thresh", "precision", "recall", "count_mae"):
        assert record[key] == distributed[key], key


def test_two_process_checkpoint_resumes_on_one(ddp_run, tiny_coco, tmp_path):
    out, _ = ddp_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_0.pth", "det_results.txt", "seg_results.txt", "metrics.jsonl"):
        (resumed / name).write_bytes((out / name).read_bytes())
    argv = tiny_args(tiny_coco, resumed, "--epochs", "2", "--resume", str(resumed / "model_0.pth"), "-b", "2")
    assert train.main(argv) == 0
    lines = (resumed / "seg_results.txt").read_text().splitlines()
    assert [parse_epoch_line(line)[0] for line in lines] == [0, 1]
    assert lines[0] == (out / "seg_results.txt").read_text().splitlines()[0]
    assert [r["epoch"] for r in read_jsonl(resumed / "metrics.jsonl")] == [0, 1]


FAILING_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from my_dataset_chromosome import DatasetError
from train_utils.engine import loop
import train_multi_GPU

real = loop.train_one_epoch

def fail_on_rank_1(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise {error}
    return real(*args, **kwargs)

loop.train_one_epoch = fail_on_rank_1
sys.exit(train_multi_GPU.main())
"""


def test_a_failing_process_ends_the_job_and_the_others_stop_quietly(tiny_coco, tmp_path):
    """A user error on rank 1 (an unexpected one takes the same path, with its traceback on rank 1 only)."""
    error = 'DatasetError("cannot read image x.png: truncated")'
    line = "error: [rank 1] cannot read image x.png: truncated"
    script = tmp_path / "failing_train.py"
    script.write_text(FAILING_SCRIPT.format(repo=str(REPO), error=error))
    run = torchrun(script, tiny_args(tiny_coco, tmp_path / "out", "--epochs", "1"), timeout=300)
    assert run.returncode != 0  # and no hang: torchrun returned (a hang would end in the 300 s timeout, an error)
    log = run.stdout + run.stderr
    assert line in log.splitlines(), log[-3000:]
    # rank 0's collective broke when rank 1 left: one line naming rank 1, not gloo's traceback (unless torchrun
    # ended rank 0 first, which leaves it silent)
    rank0 = [text for text in log.splitlines() if text.startswith("error: [rank 0]")]
    assert rank0 in ([], ["error: [rank 0] stopped: rank 1 failed (its error is above)"]), log[-3000:]
    assert "Connection closed by peer" not in log and "trainer.py" not in log.split(line)[1]
    assert not (tmp_path / "out" / "model_0.pth").exists()


ACCUMULATION_SCRIPT = """
import sys
import torch
sys.path.insert(0, {repo!r})
from torch import nn
from train_utils import distributed
from train_utils.data.loaders import collate_fn
from train_utils.engine import loop

info, device = distributed.init_distributed("cpu", 60)
torch.manual_seed(1)
samples = [(torch.randn(3, 1, 1), {{"y": torch.randn(())}}) for _ in range(8)]
torch.manual_seed(0)


class Fit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, images, targets):
        x = torch.stack([image.flatten() for image in images])
        y = torch.stack([t["y"] for t in targets])
        return {{"loss_fit": ((self.lin(x).squeeze(1) - y) ** 2).mean()}}


model = Fit()
bare = model
if info.distributed:  # rank r takes samples r, r + 2, ...: per step, the same 4 samples as one process's batch
    model = nn.parallel.DistributedDataParallel(model)
    mine = samples[info.rank::2]
else:
    mine = samples
batch = {batch}
loader = [collate_fn(mine[i:i + batch]) for i in range(0, len(mine), batch)]
optimizer = torch.optim.SGD(bare.parameters(), lr=0.1)
stats = loop.train_one_epoch(model, optimizer, loader, device, 0, accumulate_steps={accumulate},
                               show_progress=False)
if info.rank == 0:
    torch.save({{"weights": [p.detach() for p in bare.parameters()], "steps": stats["optimizer_steps"]}}, {out!r})
distributed.shutdown(0)
"""


def test_accumulation_under_ddp_equals_one_process_with_the_total_batch(tmp_path):
    """2 processes x -b 1 x 2 accumulated batches = one process with batches of 4: the same weights after 2 steps."""
    import torch

    results = {}
    for name, batch, accumulate, distributed in (("ddp", 1, 2, True), ("single", 4, 1, False)):
        script = tmp_path / f"{name}.py"
        out = tmp_path / f"{name}.pt"
        script.write_text(ACCUMULATION_SCRIPT.format(repo=str(REPO), batch=batch, accumulate=accumulate, out=str(out)))
        if distributed:
            run = torchrun(script, [], timeout=200)
        else:
            run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=200)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        results[name] = torch.load(out, weights_only=True)
    assert results["ddp"]["steps"] == results["single"]["steps"] == 2
    for a, b in zip(results["ddp"]["weights"], results["single"]["weights"]):
        assert torch.allclose(a, b, atol=1e-6)
