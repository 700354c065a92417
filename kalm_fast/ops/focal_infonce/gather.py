"""Collectives with gradients for losses whose candidates span every rank (``gather=True``)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather=True needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


class _GatherLocalFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        world, rank = _world(group)
        shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape, group=group)
        shapes = [tuple(s.tolist()) for s in shapes]
        if any(s[1:] != tuple(x.shape[1:]) for s in shapes):
            raise ValueError(f"gather=True needs the same trailing shape on every rank, got shapes {shapes}")
        sizes = [s[0] for s in shapes]
        padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        order = [(rank + k) % world for k in range(world)]
        ctx.group, ctx.sizes, ctx.order, ctx.rank = group, sizes, order, rank
        return torch.cat([parts[r][: sizes[r]] for r in order])

    @staticmethod
    def backward(ctx, grad):
        sizes, world = ctx.sizes, len(ctx.sizes)
        buf = grad.new_zeros((world, max(sizes)) + tuple(grad.shape[1:]))
        start = 0
        for r in ctx.order:
            buf[r, : sizes[r]] = grad[start: start + sizes[r]]
            start += sizes[r]
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=ctx.group)  # every rank's loss reads every rank's x
        return buf[ctx.rank, : sizes[ctx.rank]], None


def gather_local_first(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``x [n_r, ...]`` concatenated along dim 0: this rank's first, then ranks r+1, ..., r-1.

    Differentiable: the gradient each rank's ``x`` receives is the sum over all ranks of the gradients
    flowing into its copies. Sizes along dim 0 may differ between ranks; the other dims must match.
    """
    return _GatherLocalFirst.apply(x, group)
