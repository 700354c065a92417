"""Padded <-> packed: ``unpad`` / ``pad`` for users, and ``padded_via_packed`` for backends that run packed only."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._checks import check_int, check_mask, check_same_device, check_tensor
from ..varlen import Varlen


def unpad_layout(mask: torch.Tensor):
    """``(indices [T] int64 into the flattened B*L rows, Varlen)`` of a checked bool ``mask [B, L]``: one host copy
    of the lengths."""
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    lengths = mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return indices, Varlen(cu_seqlens, tuple(lengths.tolist()))


def _unpad(x: torch.Tensor, mask: torch.Tensor):
    """``(x_packed [T, ...], indices [T] int64, Varlen)`` of a checked ``x [B, L, ...]`` and bool ``mask [B, L]``."""
    indices, varlen = unpad_layout(mask)
    return x.flatten(0, 1)[indices], indices, varlen


def unpad(x: torch.Tensor, mask: torch.Tensor):
    """Drop the padding of a batch: ``x [B, L, ...]``, ``mask [B, L]`` (bool or 0/1, True = real token) ->
    ``(x_packed [T, ...], indices [T] int64 into the flattened B*L rows, cu_seqlens [B+1] int32, max_seqlen int)``.
    Differentiable w.r.t. ``x``."""
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be [B, L, ...], got shape {tuple(x.shape)}")
    check_mask("mask", mask, x.shape[:2])
    check_same_device(x=x, mask=mask)
    packed, indices, varlen = _unpad(x, mask.bool())
    return packed, indices, varlen.cu_seqlens, varlen.max_seqlen


def pad(x_packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of ``unpad``: ``x_packed [T, ...]`` -> ``[batch, seqlen, ...]`` with zeros at the padding.
    Differentiable w.r.t. ``x_packed``."""
    check_tensor("x_packed", x_packed)
    check_tensor("indices", indices, ndim=1)
    if x_packed.dim() < 1 or x_packed.shape[0] != indices.shape[0]:
        raise ValueError(f"x_packed must be [T, ...] with T = len(indices) = {indices.shape[0]}, "
                         f"got {tuple(x_packed.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be torch.int64 (as returned by unpad), got {indices.dtype}")
    batch = check_int("batch", batch, low=0, allow_none=False)
    seqlen = check_int("seqlen", seqlen, low=0, allow_none=False)
    if indices.shape[0] > batch * seqlen:
        raise ValueError(f"batch * seqlen = {batch} * {seqlen} rows cannot hold the {indices.shape[0]} packed rows; "
                         "pass the batch and seqlen that unpad's input had")
    return _scatter_rows(x_packed, indices, batch, seqlen, 0.0)


def _scatter_rows(x, indices, batch, seqlen, fill):
    out = x.new_full((batch * seqlen, *x.shape[1:]), fill)
    return out.index_copy(0, indices, x).view(batch, seqlen, *x.shape[1:])


def padded_via_packed(packed_fn, q, k, v, key_padding_mask, causal, window, scale, return_lse, softcap):
    """Padded ``[B, L, H, D]`` input through a packed implementation
    ``packed_fn(q, k, v, varlen, causal, window, scale, return_lse, softcap)``.

    Without a mask every row is real and the batch is a free ``[B*L, H, D]`` view (no synchronization); with one:
    unpad (one host copy of the lengths), attend, pad (zeros / lse +inf at the padding). lse comes back ``[B, Hq, L]``.
    """
    B, L = q.shape[:2]
    if key_padding_mask is None:
        varlen = Varlen.from_lengths([L] * B, q.device)
        result = packed_fn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), varlen, causal, window, scale, return_lse,
                           softcap)
        if not return_lse:
            return result.view(q.shape)
        out, lse = result
        return out.view(q.shape), lse.view(lse.shape[0], B, L).transpose(0, 1)  # [Hq, B*L] (B or L may be 0)
    qp, indices, varlen = _unpad(q, key_padding_mask)
    kp, vp = k.flatten(0, 1)[indices], v.flatten(0, 1)[indices]
    result = packed_fn(qp, kp, vp, varlen, causal, window, scale, return_lse, softcap)
    if not return_lse:
        return _scatter_rows(result, indices, B, L, 0.0)
    out, lse = result
    return _scatter_rows(out, indices, B, L, 0.0), _scatter_rows(lse.T, indices, B, L, math.inf).transpose(1, 2)
