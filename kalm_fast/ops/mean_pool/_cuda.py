"""Backend ``cuda`` of ``mean_pool`` (csrc/mean_pool.cu): launch plans, argument packing and the autograd Function.

``mean_pool_cuda(hidden, mask, varlen, dim, normalize, eps)`` takes already-checked arguments
(see ``kalm_fast.ops.mean_pool``): padded ``hidden [B, L, H]`` with ``mask [B, L]`` or None, or packed
``hidden [T, H]`` with a ``Varlen``; returns ``[B or N, dim]`` in ``hidden.dtype``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _native
from ..._cuda import address, cdiv, dtype_code, launch_device, pack, sm_count, stream_of
from ..varlen import sequence_layout

MAX_THREADS = 1024
MAX_DIM = (48 * 1024) // 4 - 32  # the fp32 sums of one sequence live in 48 KiB of shared memory
RESIDENT_THREADS_PER_SM = 2048   # what the forward grid aims to fill
BLOCK_THREADS = 512              # forward block size to aim for


def vector_width(element_size: int, dim: int, address: int = 0, strides=()) -> int:
    """Elements per load/store: 16 bytes when the address, every stride and ``dim`` allow, else less."""
    vec = 16 // element_size
    while vec > 1 and (address % (vec * element_size) or dim % vec or any(s % vec for s in strides)):
        vec //= 2
    return vec


def plan_forward(*, num_seqs: int, typical_len: int, dim: int, element_size: int, address: int, strides,
                 sms: int) -> dict:
    """Launch plan of the forward: blocks of ``col_threads`` threads across the ``dim / vec`` feature chunks
    times ``groups`` token groups; each sequence's tokens are cut into ``splits`` slices (one block each)
    until the grid fills ``sms`` SMs, with at least 4 tokens per thread and slice."""
    if dim > MAX_DIM:
        raise ValueError(f"backend 'cuda' of mean_pool supports dim <= {MAX_DIM}, got {dim}; use backend='triton'")
    vec = vector_width(element_size, dim, address, strides)
    col_threads = min(dim // vec, 256)
    groups = max(1, min(BLOCK_THREADS // col_threads, typical_len))
    threads = cdiv(col_threads * groups, 32) * 32
    wanted_blocks = cdiv(sms * RESIDENT_THREADS_PER_SM, threads)
    splits = max(1, min(cdiv(wanted_blocks, max(num_seqs, 1)), cdiv(typical_len, 4 * groups), 65535))
    return dict(vec=vec, col_threads=col_threads, groups=groups, threads=threads, splits=splits)


def plan_backward(*, max_len: int, hidden_size: int, dim: int, element_size: int) -> dict:
    """Block shape of the scatter kernel: ``col_threads`` threads across ``hidden_size / vec`` chunks times
    ``threads / col_threads`` token rows; each block writes ``tokens_per_block`` tokens of one sequence."""
    if dim > MAX_DIM:
        raise ValueError(f"backend 'cuda' of mean_pool supports dim <= {MAX_DIM}, got {dim}; use backend='triton'")
    vec = vector_width(element_size, dim, 0, (hidden_size,))
    col_threads = min(hidden_size // vec, 256)
    rows = max(1, 256 // col_threads)
    tokens_per_block = 4 * rows
    return dict(vec=vec, col_threads=col_threads, threads=col_threads * rows, tokens_per_block=tokens_per_block,
                chunks_per_seq=max(1, cdiv(max_len, tokens_per_block)))


def _mask_u8(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask as uint8 0/1 (bool is reinterpreted, other dtypes compared with 0)."""
    if mask is None or mask.dtype == torch.uint8:
        return mask
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return (mask != 0).to(torch.uint8)


def forward_plan(hidden, cu_seqlens, dim: int, sms: int) -> dict:
    num_seqs, seq_len, stride_b, stride_t = sequence_layout(hidden, cu_seqlens)
    typical_len = seq_len if cu_seqlens is None else cdiv(hidden.shape[0], max(num_seqs, 1))
    return plan_forward(num_seqs=num_seqs, typical_len=typical_len, dim=dim, element_size=hidden.element_size(),
                        address=hidden.data_ptr(), strides=(stride_b, stride_t), sms=sms)


def forward_args(hidden, mask_u8, cu_seqlens, dim, normalize, eps, out, mean_out, partial, plan, *, stream: int):
    """The MeanPoolFwdArgs of one forward launch (``partial``: float32 ``[plan["splits"], N, dim]``)."""
    num_seqs, seq_len, stride_b, stride_t = sequence_layout(hidden, cu_seqlens)
    return pack("MeanPoolFwdArgs", dtype=dtype_code(hidden.dtype), hidden=hidden.data_ptr(),
                cu_seqlens=address(cu_seqlens), mask=address(mask_u8), out=out.data_ptr(), mean_out=address(mean_out),
                partial=partial.data_ptr(),
                num_seqs=num_seqs, stride_b=stride_b, stride_t=stride_t,
                mask_stride_b=0 if mask_u8 is None else mask_u8.stride(0),
                mask_stride_t=0 if mask_u8 is None else mask_u8.stride(1),
                seq_len=seq_len, dim=dim, normalize=int(normalize), eps=eps,
                device=hidden.device.index or 0, stream=stream, **plan)


def backward_args(grad_out, mean, mask_u8, cu_seqlens, ge, grad_hidden, *, seq_len: int, max_len: int, dim: int,
                  normalize: bool, eps: float, stream: int):
    """The MeanPoolBwdArgs of one backward launch (grad_hidden contiguous)."""
    hidden_size = grad_hidden.shape[-1]
    plan = plan_backward(max_len=max_len, hidden_size=hidden_size, dim=dim, element_size=grad_hidden.element_size())
    return pack("MeanPoolBwdArgs", dtype=dtype_code(grad_hidden.dtype), grad_out=grad_out.data_ptr(),
                mean=address(mean), cu_seqlens=address(cu_seqlens), mask=address(mask_u8), ge=ge.data_ptr(),
                grad_hidden=grad_hidden.data_ptr(), num_seqs=grad_out.shape[0],
                mask_stride_b=0 if mask_u8 is None else mask_u8.stride(0),
                mask_stride_t=0 if mask_u8 is None else mask_u8.stride(1),
                seq_len=seq_len, dim=dim, hidden_size=hidden_size, normalize=int(normalize), eps=eps,
                device=grad_out.device.index or 0, stream=stream, **plan)


class _MeanPoolCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, varlen, dim, normalize, eps):
        cu_seqlens = None if varlen is None else varlen.cu_seqlens
        device = hidden.device
        lib = _native.cuda_lib()
        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        mask_u8 = _mask_u8(mask)
        num_seqs = hidden.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        out = torch.empty(num_seqs, dim, dtype=hidden.dtype, device=device)
        needs_grad = ctx.needs_input_grad[0]
        mean = torch.empty(num_seqs, dim, dtype=torch.float32, device=device) if needs_grad and normalize else None
        plan = forward_plan(hidden, cu_seqlens, dim, sm_count(device.index or 0))
        partial = torch.empty(plan["splits"], num_seqs, dim, dtype=torch.float32, device=device)
        lib.mean_pool_fwd(forward_args(hidden, mask_u8, cu_seqlens, dim, normalize, eps, out, mean, partial, plan,
                                       stream=stream_of(device)))
        if needs_grad:
            max_len = hidden.shape[1] if varlen is None else varlen.max_seqlen
            ctx.save_for_backward(mean, mask_u8, cu_seqlens)
            ctx.meta = (tuple(hidden.shape), max_len, dim, normalize, eps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mean, mask_u8, cu_seqlens = ctx.saved_tensors
        shape, max_len, dim, normalize, eps = ctx.meta
        grad_out = grad_out.contiguous()
        grad_hidden = torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device)
        ge = torch.empty(grad_out.shape[0], dim, dtype=torch.float32, device=grad_out.device)
        seq_len = shape[1] if cu_seqlens is None else 0
        with launch_device(grad_out):
            _native.cuda_lib().mean_pool_bwd(backward_args(
                grad_out, mean, mask_u8, cu_seqlens, ge, grad_hidden, seq_len=seq_len, max_len=max_len, dim=dim,
                normalize=normalize, eps=eps, stream=stream_of(grad_out.device)))
        return grad_hidden, None, None, None, None, None


def mean_pool_cuda(hidden: torch.Tensor, mask: Optional[torch.Tensor], varlen, dim: int, normalize: bool,
                   eps: float) -> torch.Tensor:
    """Mean pooling on the GPU with csrc/mean_pool.cu; differentiable w.r.t. ``hidden``."""
    with launch_device(hidden):
        return _MeanPoolCuda.apply(hidden, mask, varlen, dim, normalize, eps)
