"""Distributed helpers around ``torch.distributed`` (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Without those variables, or with one process, everything here degrades to a one-process job: no process group,
collectives are identity functions. With several processes the backend is ``nccl`` on GPUs and ``gloo`` on CPUs.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | torch.device, timeout_s: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by the environment, if any; returns this process's place and device.

    Under torchrun each process takes the GPU ``cuda:<LOCAL_RANK>`` when ``device`` is a CUDA device. The process
    group ``timeout_s`` bounds how long a process waits in a collective for the others (a failed peer).
    """
    device = torch.device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo(), device
    info = DistInfo(_env_int("RANK", 0), world_size, _env_int("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"process {info.rank} wants GPU {info.local_rank} but this machine has {torch.cuda.device_count()}; "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return info, device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``[world_size, *tensor.shape]``: the tensor of every process (same shape everywhere)."""
    if not is_initialized():
        return tensor[None]
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def all_gather_object(obj: T) -> list[T]:
    """The picklable ``obj`` of every process, in rank order."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of process ``src``, on every process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process ``src``'s buffers (batch-norm running statistics): after a training step each process has
    updated its own, and the evaluation and the checkpoint must see one model."""
    if not is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


FAILED_RANK_KEY = "dacseg/failed_rank"


def _store():
    """The process group's key-value store (torchrun's agent holds it, so it outlives any one process), or None."""
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    if not is_initialized() or get_store is None:
        return None
    try:
        return get_store()
    except Exception:  # noqa: BLE001 - no store, no message; the caller falls back to the full report
        return None


def announce_failure(rank: int) -> None:
    """Tell the other processes that process ``rank`` is failing (the first to announce is kept)."""
    store = _store()
    if store is not None:
        try:
            store.compare_set(FAILED_RANK_KEY, "", str(rank))
        except Exception:  # noqa: BLE001 - best effort: the others then report their own error in full
            pass


def failed_rank() -> int | None:
    """The process that announced a failure, if any: the cause of a collective that broke in this one."""
    store = _store()
    if store is None:
        return None
    try:
        return int(store.get(FAILED_RANK_KEY)) if store.check([FAILED_RANK_KEY]) else None
    except Exception:  # noqa: BLE001
        return None


def shutdown(exit_code: int) -> None:
    """Leave the job. After a failure this process exits at once with ``exit_code``: waiting for peers that may be
    stuck in a collective (or tearing down the group with them) could hang; torchrun then stops the others."""
    if not is_initialized():
        return
    if exit_code != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    dist.barrier()  # no process tears the group down while a peer still uses it (gloo aborts on a closed peer)
    dist.destroy_process_group()
