"""Process group setup shared by every training stage: one code path for CPU (gloo) and GPU (NCCL).

Under torchrun (or torchx, which runs torchrun) the usual RANK / WORLD_SIZE / MASTER_ADDR variables are set and the
group comes from them. Without them (`python -m kubellama.components.pretrain`, a notebook, the KFP component with one process)
a one-rank group over an in-memory store stands in, so FSDP2 and DCP run exactly the same code either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def lead(self) -> bool:
        return self.rank == 0


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(init_method: str | None = None, rank: int | None = None, world_size: int | None = None) -> Env:
    """Join (or create) the default process group; a no-op when one exists already.

    `init_method`/`rank`/`world_size` are for callers that spawn ranks themselves (tests use a file:// rendezvous,
    cheaper than torchrun); normally everything comes from the environment torchrun sets.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", rank or 0))
    device = device_for(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend_for(device)
        if init_method is not None:
            dist.init_process_group(backend, init_method=init_method, rank=rank or 0, world_size=world_size or 1)
        elif "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    _GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def under_launcher() -> bool:
    """True inside a torchrun-started worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks in one collective (fp64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


_GROUPS: dict[str, object] = {}


def groups() -> None:
    """Create the side groups (collective: every rank calls it at the same point, the trainer's constructor):
    - `control`: small messages of the training loop (stop flags), gloo so they never wait behind the GPU stream;
    - `checkpoint`: DCP's background saves, whose collectives run in another thread and so must not share a
      group with the training loop's."""
    if not _GROUPS:
        many = dist.get_world_size() > 1
        _GROUPS["control"] = dist.new_group(backend="gloo") if many and dist.get_backend() != "gloo" else None
        _GROUPS["checkpoint"] = dist.new_group(backend="gloo")


def control_group():
    groups()
    return _GROUPS["control"]


def checkpoint_group():
    groups()
    return _GROUPS["checkpoint"]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
