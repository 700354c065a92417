"""Backend ``triton`` of ``mean_pool``: the forward in two kernels (sums of the first ``dim`` features over row
splits of each sequence, so that a batch of a few long sequences still fills the GPU; then one program per sequence
adds the splits, divides by the count and normalizes), one backward kernel, their launchers and the autograd
Function.

A sequence ``n`` is a run of rows of ``hidden``: packed ``[T, H]`` rows ``cu_seqlens[n]:cu_seqlens[n+1]``,
padded ``[B, L, H]`` rows ``0:L`` of batch ``n`` weighted by ``mask[n]``. Accumulation is fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._cuda import LAUNCH_OPTIONS, launch_device, sms_to_fill
from ..varlen import sequence_layout


@triton.jit
def _sequence_bounds(n, cu_ptr, L, IS_PACKED: tl.constexpr):
    """First row (relative to sequence 0) and length of sequence ``n``."""
    if IS_PACKED:
        start = tl.load(cu_ptr + n)
        length = tl.load(cu_ptr + n + 1) - start
    else:
        start = n * 0
        length = L
    return start, length


@triton.jit
def _row_weights(mask_ptr, n, stride_mb, rows, row_ok, HAS_MASK: tl.constexpr):
    """fp32 weights ``[BLOCK_T]`` of ``rows`` of sequence ``n``: its mask's values (0 past ``row_ok``), else 1."""
    if HAS_MASK:
        return tl.load(mask_ptr + n.to(tl.int64) * stride_mb + rows, mask=row_ok, other=0).to(tl.float32)
    return row_ok.to(tl.float32)


@triton.jit
def _mean_pool_sum_kernel(
    hidden_ptr, mask_ptr, cu_ptr, part_ptr, weight_ptr,
    L, DIM, rows_per_split, stride_hb, stride_ht, stride_mb,
    IS_PACKED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid ``(N, cdiv(DIM, BLOCK_H), splits)``: ``part[split, n, cols]`` (fp32) is the weighted sum of rows
    ``split * rows_per_split`` up to the next split's of sequence ``n``, ``weight[split, n]`` their weight."""
    n = tl.program_id(0)
    split = tl.program_id(2)
    num_seqs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < DIM
    start, length = _sequence_bounds(n, cu_ptr, L, IS_PACKED)
    base = hidden_ptr + n.to(tl.int64) * stride_hb + start.to(tl.int64) * stride_ht
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, length)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    weight = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < hi
        w = _row_weights(mask_ptr, n, stride_mb, rows, row_ok, HAS_MASK)
        # rows of weight 0 (padding) are not read: they cost no bandwidth and never enter the sum, not even a NaN
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_ht + cols[None, :],
                    mask=(w != 0)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += x * w[:, None]
        weight += w
    part = split * num_seqs + n
    tl.store(part_ptr + part.to(tl.int64) * DIM + cols, tl.sum(acc, axis=0), mask=col_ok)
    tl.store(weight_ptr + part, tl.sum(weight, axis=0), mask=tl.program_id(1) == 0)


@triton.jit
def _mean_pool_finish_kernel(
    part_ptr, weight_ptr, out_ptr, mean_ptr, count_ptr, DIM, SPLITS, stride_ob, eps,
    NORMALIZE: tl.constexpr, SAVE_MEAN: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid ``(N,)``, ``BLOCK_H >= DIM``: ``out[n]`` = the splits' sums over their weight, L2-normalized if asked."""
    n = tl.program_id(0)
    num_seqs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < DIM
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    count = 0.0
    for split in range(0, SPLITS):
        part = split * num_seqs + n
        total += tl.load(part_ptr + part.to(tl.int64) * DIM + cols, mask=col_ok, other=0.0)
        count += tl.load(weight_ptr + part)
    mean = total / tl.maximum(count, 1.0)
    if SAVE_MEAN:
        tl.store(mean_ptr + n.to(tl.int64) * DIM + cols, mean, mask=col_ok)
        tl.store(count_ptr + n, count)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(mean * mean, axis=0))
        mean = mean / tl.maximum(norm, eps)
    tl.store(out_ptr + n.to(tl.int64) * stride_ob + cols, mean.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _mean_pool_bwd_kernel(
    grad_out_ptr, mean_ptr, count_ptr, mask_ptr, cu_ptr, grad_hidden_ptr,
    L, H, DIM, stride_gb, stride_mb, stride_dhb, stride_dht, eps,
    IS_PACKED: tl.constexpr, HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid ``(N, row programs)``, ``BLOCK_H >= H``: program ``(n, r)`` writes row blocks ``r, r + row programs, ...``
    of sequence ``n``, every row (zeros past DIM / masked)."""
    n = tl.program_id(0)
    start, length = _sequence_bounds(n, cu_ptr, L, IS_PACKED)
    cols = tl.arange(0, BLOCK_H)
    keep = cols < DIM
    g = tl.load(grad_out_ptr + n.to(tl.int64) * stride_gb + cols, mask=keep, other=0.0).to(tl.float32)
    if NORMALIZE:
        e = tl.load(mean_ptr + n.to(tl.int64) * DIM + cols, mask=keep, other=0.0)
        norm = tl.sqrt(tl.sum(e * e, axis=0))
        if norm > eps:
            y = e / norm
            g = (g - y * tl.sum(y * g, axis=0)) / norm
        else:
            g = g / eps
    count = tl.load(count_ptr + n)
    g = g / tl.maximum(count, 1.0)
    base = grad_hidden_ptr + n.to(tl.int64) * stride_dhb + start.to(tl.int64) * stride_dht
    for t0 in range(tl.program_id(1) * BLOCK_T, length, tl.num_programs(1) * BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < length
        w = _row_weights(mask_ptr, n, stride_mb, rows, row_ok, HAS_MASK)
        dh = w[:, None] * g[None, :]
        tl.store(base + rows[:, None].to(tl.int64) * stride_dht + cols[None, :],
                 dh.to(grad_hidden_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < H)[None, :])


def _mask_arg(mask: Optional[torch.Tensor], hidden: torch.Tensor):
    if mask is None:
        return hidden, 0  # never read (HAS_MASK=False)
    if mask.dtype == torch.bool:
        mask = mask.to(torch.uint8)
    mask = mask.contiguous()  # the kernels step along a row with stride 1
    return mask, mask.stride(0)


PROGRAMS_PER_SM = 8  # what the row splits of the forward aim for
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second and third axes
MIN_SPLIT_ROWS = 64


def _rows_per_split(num_programs: int, max_len: int, block_t: int, device) -> int:
    """Rows each program of the sum kernel covers: a whole sequence, unless its ``num_programs`` (sequences x
    feature blocks) would leave SMs idle; then sequences are cut into splits of at least MIN_SPLIT_ROWS rows (a
    whole number of BLOCK_T) until about PROGRAMS_PER_SM programs per SM run."""
    splits = min(triton.cdiv(PROGRAMS_PER_SM * sms_to_fill(device), max(num_programs, 1)),
                 triton.cdiv(max_len, MIN_SPLIT_ROWS))
    return max(block_t, triton.cdiv(triton.cdiv(max_len, max(splits, 1)), block_t) * block_t)


def mean_pool_forward(hidden, mask, cu_seqlens, max_len: int, dim: int, normalize: bool, eps: float,
                      save_for_backward: bool):
    """Returns ``(out [N, dim], mean fp32 [N, dim] or None, count fp32 [N] or None)``; ``max_len`` is the longest
    sequence."""
    N, L, stride_hb, stride_ht = sequence_layout(hidden, cu_seqlens)
    out = torch.empty(N, dim, dtype=hidden.dtype, device=hidden.device)
    mean = torch.empty(N, dim, dtype=torch.float32, device=hidden.device) if save_for_backward else out
    count = torch.empty(N, dtype=torch.float32, device=hidden.device) if save_for_backward else out
    if N == 0:
        return out, (mean if save_for_backward else None), (count if save_for_backward else None)
    mask_t, stride_mb = _mask_arg(mask, hidden)
    cu = cu_seqlens if cu_seqlens is not None else hidden
    block_h, block_t = min(128, triton.next_power_of_2(dim)), 32
    col_blocks = triton.cdiv(dim, block_h)
    rows_per_split = _rows_per_split(N * col_blocks, max_len, block_t, hidden.device)
    splits = max(1, triton.cdiv(max_len, rows_per_split))
    part = torch.empty(splits, N, dim, dtype=torch.float32, device=hidden.device)
    weight = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    _mean_pool_sum_kernel[(N, col_blocks, splits)](
        hidden, mask_t, cu, part, weight, L, dim, rows_per_split, stride_hb, stride_ht, stride_mb,
        IS_PACKED=cu_seqlens is not None, HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
        **LAUNCH_OPTIONS)
    finish_h = triton.next_power_of_2(dim)
    _mean_pool_finish_kernel[(N,)](
        part, weight, out, mean, count, dim, splits, out.stride(0), eps, NORMALIZE=normalize,
        SAVE_MEAN=save_for_backward, BLOCK_H=finish_h, num_warps=4 if finish_h <= 1024 else 8, **LAUNCH_OPTIONS)
    if not save_for_backward:
        return out, None, None
    return out, mean, count


def mean_pool_backward(grad_out, mean, count, hidden_shape, hidden_dtype, mask, cu_seqlens, max_len: int,
                       normalize: bool, eps: float):
    """Gradient w.r.t. ``hidden`` (shape ``hidden_shape``) of ``mean_pool_forward``."""
    grad_out = grad_out.contiguous()
    grad_hidden = torch.empty(hidden_shape, dtype=hidden_dtype, device=grad_out.device)
    N, dim = grad_out.shape
    if N == 0 or max_len == 0 or grad_hidden.numel() == 0:
        return grad_hidden.zero_()
    H = hidden_shape[-1]
    if cu_seqlens is not None:
        L, stride_dhb, stride_dht = 0, 0, grad_hidden.stride(0)
    else:
        L, stride_dhb, stride_dht = hidden_shape[1], grad_hidden.stride(0), grad_hidden.stride(1)
    mask_t, stride_mb = _mask_arg(mask, grad_hidden)
    cu = cu_seqlens if cu_seqlens is not None else grad_hidden
    block_h = triton.next_power_of_2(H)
    block_t = max(1, min(32, 4096 // block_h))
    grid = (N, min(triton.cdiv(max_len, block_t), MAX_GRID_Y))
    _mean_pool_bwd_kernel[grid](
        grad_out, mean, count, mask_t, cu, grad_hidden, L, H, dim, grad_out.stride(0), stride_mb,
        stride_dhb, stride_dht, eps, IS_PACKED=cu_seqlens is not None, HAS_MASK=mask is not None,
        NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4 if block_h <= 1024 else 8,
        **LAUNCH_OPTIONS)
    return grad_hidden


class _MeanPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, varlen, dim, normalize, eps):
        cu_seqlens = None if varlen is None else varlen.cu_seqlens
        max_len = hidden.shape[1] if varlen is None else varlen.max_seqlen
        out, mean, count = mean_pool_forward(hidden, mask, cu_seqlens, max_len, dim, normalize, eps,
                                             save_for_backward=hidden.requires_grad)
        if hidden.requires_grad:
            ctx.save_for_backward(mean, count, mask, cu_seqlens)
            ctx.meta = (hidden.shape, hidden.dtype, max_len, normalize, eps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mean, count, mask, cu_seqlens = ctx.saved_tensors
        shape, dtype, max_len, normalize, eps = ctx.meta
        with launch_device(grad_out):
            grad = mean_pool_backward(grad_out, mean, count, shape, dtype, mask, cu_seqlens, max_len, normalize, eps)
        return grad, None, None, None, None, None


def mean_pool_triton(hidden, mask, varlen, dim, normalize, eps):
    """The backend contract of ``kalm_fast.ops.mean_pool``; launches on ``hidden``'s device."""
    with launch_device(hidden):
        return _MeanPool.apply(hidden, mask, varlen, dim, normalize, eps)
