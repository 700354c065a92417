"""``torchrun`` support: the environment, process group setup and teardown, model wrapping (DDP or FSDP), rank-0
helpers.

Each rank takes its slice of every global batch; the loss with ``gather=True`` sees every rank's documents
as candidates, and the gradients averaged by DDP/FSDP equal those of the single-process global batch.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


COLLECTIVE_TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def torchrun_env() -> DistInfo:
    """This process's rank, world size and local rank as ``torchrun`` describes them (one process without it)."""
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device=None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (nothing to do for one process).

    NCCL on CUDA, gloo on CPU. Returns this process's rank, world size and local rank.
    """
    env = torchrun_env()
    if env.world_size <= 1 and not dist.is_initialized():
        return DistInfo()
    local_rank = env.local_rank
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():  # rank 0 alone evaluates, soups and saves while the others wait: no 10-min cap
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


@contextlib.contextmanager
def process_group():
    """Tears down the process group a command made, when it ends: leaving gloo's threads to die with the interpreter
    can abort a rank ("terminate called without an active exception"). On a normal end the ranks first meet at a
    barrier, so that none tears its group down while another still talks to it (a failed rank's peers are stopped by
    torchrun)."""
    try:
        yield
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def check_device(device) -> torch.device:
    """``device`` (None: cuda if available, else cpu) as a ``torch.device``; a ``ValueError`` if it is not a device
    name or names a device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {device!r}: CUDA is not available here ({why}); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"device {device!r}: kalm_fast runs on cpu or cuda")
    return parsed


def local_device(info: DistInfo, device=None) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` when CUDA is used, else the given/CPU device."""
    device = check_device(device)
    if device.type == "cuda" and device.index is not None and info.enabled:
        raise ValueError(f"device {str(device)!r}: under torchrun every rank computes on cuda:LOCAL_RANK (one GPU "
                         "each); give device 'cuda' (or none), and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    return device


def wrap_model(model: torch.nn.Module, info: DistInfo, parallel: str, device: torch.device) -> torch.nn.Module:
    """DDP (``parallel="ddp"``) or FSDP2 (``"fsdp"``: every transformer block sharded, then the root).

    FSDP2 (``torch.distributed.fsdp.fully_shard``) turns the model into an ``FSDPModule`` in place and runs
    on CPU (gloo) as well as on GPUs (NCCL).
    """
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for blocks in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
            for block in blocks:
                fully_shard(block)
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 models are their own wrapper)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: torch.nn.Module) -> dict:
    """The full (unsharded) state dict on CPU; every rank must call it for an FSDP model."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def no_sync_of(model: torch.nn.Module):
    """A context factory that skips the gradient all-reduce (DDP ``no_sync`` / FSDP2 gradient sync off)."""
    if is_fsdp(model):
        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return no_sync
    return getattr(model, "no_sync", None)


def to_local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and optimizer state); other tensors unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


def barrier(info: DistInfo):
    if info.enabled:
        dist.barrier()


def from_main(info: DistInfo, obj):
    """Rank 0's ``obj`` (picklable) on every rank, so that every rank takes the same decisions from it."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reduced(value: float, op) -> float:
    """``value`` reduced over every rank with ``op`` (on the GPU under NCCL)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return float(t.item())


def any_across(info: DistInfo, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any."""
    return bool(_reduced(float(flag), dist.ReduceOp.MAX)) if info.enabled else flag


def mean_across(info: DistInfo, value: float) -> float:
    """Mean of a float over ranks (for logging)."""
    return _reduced(value, dist.ReduceOp.SUM) / info.world_size if info.enabled else value
