"""``flash_attention``: bidirectional (or causal) attention over packed or padded sequences with GQA; ``pad``/``unpad``.

Backends (all share one signature, ``fn(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, causal, softmax_scale,
return_lse)``, with checked arguments, ``softmax_scale`` a float, ``max_seqlen`` an int for packed input and
``key_padding_mask`` bool or None):

- ``reference``: materializes every score matrix (``kalm_fast.reference.attention``).
- ``torch``: ``scaled_dot_product_attention`` per length bucket; the CPU path of the encoder.
- ``triton``: the fused kernels of ``kalm_fast.kernels.attention`` (CUDA; CPU only under ``TRITON_INTERPRET=1``).

The log-sum-exp (``return_lse=True``) is returned for inspection and is not differentiable; it is ``+inf`` on rows
that attend to no key (padded query rows).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _registry
from .._native import cuda_unavailable
from .._checks import FLOAT_DTYPES, check_cu_seqlens, check_mask, check_same_device, check_tensor
from ..reference.attention import flash_attention_reference

OP = "flash_attention"
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------------------
# padded <-> packed


def unpad(x: torch.Tensor, mask: torch.Tensor):
    """Drop the padding of a batch: ``x [B, L, ...]``, ``mask [B, L]`` (bool or 0/1, True = real token) ->
    ``(x_packed [T, ...], indices [T] int64 into the flattened B*L rows, cu_seqlens [B+1] int32, max_seqlen int)``.
    Differentiable w.r.t. ``x``."""
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be [B, L, ...], got shape {tuple(x.shape)}")
    check_mask("mask", mask, x.shape[:2])
    check_same_device(x=x, mask=mask)
    mask = mask.bool()
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return x.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen


def pad(x_packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of ``unpad``: ``x_packed [T, ...]`` -> ``[batch, seqlen, ...]`` with zeros at the padding.
    Differentiable w.r.t. ``x_packed``."""
    return _scatter_rows(x_packed, indices, batch, seqlen, 0.0)


def _scatter_rows(x, indices, batch, seqlen, fill):
    check_tensor("x_packed", x)
    check_tensor("indices", indices, ndim=1)
    if x.dim() < 1 or x.shape[0] != indices.shape[0]:
        raise ValueError(f"x_packed must be [T, ...] with T = len(indices) = {indices.shape[0]}, got {tuple(x.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be torch.int64 (as returned by unpad), got {indices.dtype}")
    out = x.new_full((batch * seqlen, *x.shape[1:]), fill)
    return out.index_copy(0, indices, x).view(batch, seqlen, *x.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# public op


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                    max_seqlen: Optional[int] = None, key_padding_mask: Optional[torch.Tensor] = None,
                    causal: bool = False, softmax_scale: Optional[float] = None, return_lse: bool = False,
                    backend: str = "auto"):
    """``softmax(scale * Q K^T + mask) V`` per sequence and head, fp32 accumulation, result in ``q.dtype``.

    packed: ``q [T, Hq, D]``, ``k, v [T, Hkv, D]``, ``cu_seqlens`` int32 ``[N+1]``, ``max_seqlen`` (computed when
    None) -> ``[T, Hq, D]`` (lse ``[Hq, T]``).
    padded: ``q [B, L, Hq, D]``, ``k, v [B, L, Hkv, D]``, ``key_padding_mask [B, L]`` or None -> ``[B, L, Hq, D]``
    (lse ``[B, Hq, L]``); padded query rows give 0.
    Query head ``h`` reads key/value head ``h // (Hq // Hkv)``. Bidirectional unless ``causal``.
    Differentiable w.r.t. q, k, v.
    """
    check_tensor("q", q, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    layout = "packed [T, H, D]" if q.dim() == 3 else "padded [B, L, H, D]"
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=q.dim(), dtypes=FLOAT_DTYPES)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must be {layout} with the token dims and head dim of q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"the query heads Hq={hq} must be a positive multiple of the key/value heads Hkv={hkv}")
    if not (8 <= d <= MAX_HEAD_DIM and d % 8 == 0):
        raise ValueError(f"head dim D must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got D={d}")
    if q.dim() == 3:
        if cu_seqlens is None:
            raise ValueError("packed q [T, Hq, D] needs cu_seqlens int32 [N+1]; padded input is q [B, L, Hq, D]")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask [B, L] is for padded q [B, L, Hq, D]; packed input uses cu_seqlens only")
        check_cu_seqlens(cu_seqlens, q.shape[0])
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1])
        longest = int(lengths.max()) if lengths.numel() else 0
        if max_seqlen is None:
            max_seqlen = longest
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < longest:
            raise ValueError(f"max_seqlen must be an int >= the longest sequence in cu_seqlens ({longest}), "
                             f"got {max_seqlen!r}")
    else:
        if cu_seqlens is not None or max_seqlen is not None:
            raise ValueError("cu_seqlens/max_seqlen are for packed q [T, Hq, D]; padded q [B, L, Hq, D] takes "
                             "key_padding_mask [B, L]")
        if key_padding_mask is not None:
            check_mask("key_padding_mask", key_padding_mask, q.shape[:2])
            key_padding_mask = key_padding_mask.bool()
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask)
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
    impl = _registry.select(OP, backend, q.device, q.dtype)
    return impl.fn(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, bool(causal), float(softmax_scale),
                   bool(return_lse))


# ----------------------------------------------------------------------------------------------------------------
# torch backend: one scaled_dot_product_attention call per length bucket


BUCKET_RATIO = 0.8  # a bucket holds sequences at least this fraction of its longest one


def _sdpa(q, k, v, key_mask, causal, scale, need_lse):
    """q [n, Hq, Lq, D], k/v [n, Hkv, L, D], key_mask [n, 1, 1, L] bool or None -> (out [n, Hq, Lq, D], lse or None)."""
    if need_lse and q.device.type == "cpu":
        bias = None if key_mask is None else \
            torch.zeros(key_mask.shape, dtype=q.dtype).masked_fill(~key_mask, -math.inf)
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse.detach()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    if not need_lse:
        return out, None
    with torch.no_grad():  # off CPU SDPA keeps its lse private: recompute it (materializes the scores)
        group = q.shape[1] // k.shape[1]
        scores = scale * q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, -math.inf)
        if causal:
            scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                        -math.inf)
        return out, torch.logsumexp(scores, -1)


def _buckets(lengths: list):
    """Group sequence ids by similar length: a list of (ids, longest) with every length >= BUCKET_RATIO * longest."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        if current and lengths[i] < BUCKET_RATIO * lengths[current[0]]:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return [(ids, lengths[ids[0]]) for ids in groups]


def _torch_packed(q, k, v, cu_seqlens, max_seqlen, causal, scale, return_lse):
    """Packed path: each length bucket padded to [n, Lb, H, D] (a zero-copy view when its sequences are equal and
    adjacent), one SDPA call per bucket, the real rows written back into [T, Hq, D]. The buckets come from
    ``cu_seqlens``; ``max_seqlen`` is not needed."""
    T, hq, d = q.shape
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    buckets = _buckets(lengths)
    if not buckets:  # no tokens: an empty result, still part of the graph
        return (q * 0.0, q.new_zeros(hq, 0, dtype=torch.float32)) if return_lse else q * 0.0
    out = None if len(buckets) == 1 else q.new_zeros(T, hq, d)
    lse = q.new_zeros(T, hq, dtype=torch.float32) if return_lse else None
    for ids, longest in buckets:
        ids = sorted(ids)
        n, first = len(ids), starts[ids[0]]
        run = all(lengths[i] == longest and starts[i] == first + j * longest for j, i in enumerate(ids))
        if run:  # equal lengths, adjacent in memory
            rows = slice(first, first + n * longest)
            qb, kb, vb = (x[rows].view(n, longest, x.shape[1], d) for x in (q, k, v))
            key_mask = None
        else:
            start = torch.tensor([starts[i] for i in ids], device=q.device)
            length = torch.tensor([lengths[i] for i in ids], device=q.device)
            pos = torch.arange(longest, device=q.device)
            valid = (pos[None, :] < length[:, None]).flatten()                            # [n * Lb]
            index = (start[:, None] + torch.minimum(pos[None, :], length[:, None] - 1)).flatten()
            qb, kb, vb = (x.index_select(0, index).view(n, longest, x.shape[1], d) for x in (q, k, v))
            key_mask = None if bool(valid.all()) else valid.view(n, 1, 1, longest)
            keep = torch.nonzero(valid).flatten()
            rows = index.index_select(0, keep)
        ob, lb = _sdpa(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), key_mask, causal, scale, return_lse)
        ob = ob.transpose(1, 2).reshape(n * longest, hq, d)                                # [n * Lb, Hq, D]
        lb = lb.transpose(1, 2).reshape(n * longest, hq) if return_lse else None
        if not run:
            ob = ob.index_select(0, keep)
            lb = lb.index_select(0, keep) if return_lse else None
        if out is None and run:  # one bucket holding every token: nothing to scatter
            out = ob
        elif out is None:
            out = q.new_zeros(T, hq, d).index_copy(0, rows, ob)
        elif run:
            out[rows] = ob
        else:
            out.index_copy_(0, rows, ob)
        if return_lse:
            lse[rows] = lb.float()
    return (out, lse.T.contiguous()) if return_lse else out


def _torch(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, causal, scale, return_lse):
    if q.dim() == 3:
        return _torch_packed(q, k, v, cu_seqlens, max_seqlen, causal, scale, return_lse)
    if key_padding_mask is None:
        ob, lse = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, causal, scale, return_lse)
        out = ob.transpose(1, 2)
        return (out, lse.float()) if return_lse else out
    return padded_via_packed(_torch_packed, q, k, v, key_padding_mask, causal, scale, return_lse)


def padded_via_packed(packed_fn, q, k, v, key_padding_mask, causal, scale, return_lse):
    """Padded ``[B, L, H, D]`` input through a packed implementation
    ``packed_fn(q, k, v, cu_seqlens, max_seqlen, causal, scale, return_lse)``.

    Without a mask every row is real and the batch is a free ``[B*L, H, D]`` view; with one: unpad, attend, pad
    (zeros / lse +inf at the padding). lse comes back ``[B, Hq, L]``.
    """
    B, L = q.shape[:2]
    if key_padding_mask is None:
        cu_seqlens = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=q.device)
        result = packed_fn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, L, causal, scale, return_lse)
        if not return_lse:
            return result.view(q.shape)
        out, lse = result
        return out.view(q.shape), lse.view(-1, B, L).transpose(0, 1)
    qp, indices, cu_seqlens, max_seqlen = unpad(q, key_padding_mask)
    kp, vp = k.flatten(0, 1)[indices], v.flatten(0, 1)[indices]
    result = packed_fn(qp, kp, vp, cu_seqlens, max_seqlen, causal, scale, return_lse)
    if not return_lse:
        return pad(result, indices, B, L)
    out, lse = result
    return pad(out, indices, B, L), _scatter_rows(lse.T, indices, B, L, math.inf).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# triton backend


class _TritonAttention(torch.autograd.Function):
    """Packed Triton attention; saves q, k, v, out and the fp32 lse, recomputes the scores in backward."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        from ..kernels.attention import attention_forward

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.meta = (max_seqlen, causal, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from ..kernels.attention import attention_backward

        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, *ctx.meta)
        return dq, dk, dv, None, None, None, None


def _triton_packed(q, k, v, cu_seqlens, max_seqlen, causal, scale, return_lse):
    out, lse = _TritonAttention.apply(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return (out, lse) if return_lse else out


def _triton(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, causal, scale, return_lse):
    if q.numel() >= 2 ** 31:
        raise ValueError(f"q has {q.numel()} elements; the triton backend indexes with int32 (< 2**31): "
                         "split the batch")
    if q.dim() == 3:
        return _triton_packed(q, k, v, cu_seqlens, max_seqlen, causal, scale, return_lse)
    return padded_via_packed(_triton_packed, q, k, v, key_padding_mask, causal, scale, return_lse)


def _reference(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, causal, scale, return_lse):
    return flash_attention_reference(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, causal, scale, return_lse)


# (atol, rtol) against the reference; atol is scaled by max(1, |expected|max) in the tests, as gradients grow with L.
_registry.register(OP, "reference", _reference, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, rank=100,
                   tolerances={torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)})
_registry.register(OP, "torch", _torch, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, rank=50,
                   tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)})
_registry.register(OP, "triton", _triton, devices=("cuda",), dtypes=FLOAT_DTYPES, rank=10,
                   tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)},
                   available=_registry.triton_unavailable)


def _cuda(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, causal, scale, return_lse):
    from ..cuda.attention import flash_attention_cuda

    return flash_attention_cuda(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, causal, scale, return_lse)


# Forward only (inference) and not verified on hardware yet: ranked after torch, so `auto` never prefers it.
_registry.register(OP, "cuda", _cuda, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), rank=60,
                   tolerances={torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}, available=cuda_unavailable)
