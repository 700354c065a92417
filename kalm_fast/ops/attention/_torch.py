"""Backend ``torch`` of ``flash_attention``: one ``scaled_dot_product_attention`` call per length bucket.

The CPU path of the encoder. Sequences of similar length are padded to a bucket ``[n, Lb, H, D]`` (a zero-copy
view when they are equal and adjacent, as in a length-sorted encode batch), attended with a key mask, and their
real rows written back into ``[T, Hq, D]``. The buckets come from the ``Varlen``'s host lengths: no synchronization.
A ``window`` becomes a band mask ``[Lb, Lb]`` (with the causal mask folded in). Soft-capped scores (``softcap``),
which no fused SDPA kernel takes, are materialized in fp32 instead, a block of a bucket's sequences (or of one long
sequence's query rows) at a time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._cuda import to_device
from .padding import padded_via_packed

BUCKET_RATIO = 0.8  # a bucket holds sequences at least this fraction of its longest one
CAPPED_SCORES_PER_CHUNK = 2 ** 22  # fp32 scores the soft-capped path materializes at a time (16 MiB, a few copies)


def _zeros_in_graph(q, k, v):
    """Zeros shaped like ``q``, attached to ``q``, ``k`` and ``v`` in the autograd graph: the result of an empty batch,
    whose gradients are zeros (of empty ``k`` / ``v``: their sums are 0), as the oracle's."""
    return q * 0.0 + (k.sum() + v.sum()) * 0.0


def _sdpa(q, k, v, allowed, causal, scale, need_lse, softcap):
    """q [n, Hq, Lq, D], k/v [n, Hkv, L, D], allowed: a bool mask broadcast to [n, 1, Lq, L] or None
    -> (out [n, Hq, Lq, D], lse or None)."""
    if q.shape[0] * q.shape[2] == 0:  # nothing to attend (CPU's flash kernel faults on zero-length inputs)
        return _zeros_in_graph(q, k, v), (q.new_zeros(q.shape[:3], dtype=torch.float32) if need_lse else None)
    if softcap is not None:
        return _capped(q, k, v, allowed, causal, scale, need_lse, softcap)
    if need_lse and q.device.type == "cpu":
        bias = None if allowed is None else \
            torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, -math.inf)
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse.detach()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    if not need_lse:
        return out, None
    with torch.no_grad():  # off CPU SDPA keeps its lse private: recompute it (materializes the scores)
        group = q.shape[1] // k.shape[1]
        scores = scale * q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -math.inf)
        if causal:
            scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                        -math.inf)
        return out, torch.logsumexp(scores, -1)


def _capped(q, k, v, allowed, causal, scale, need_lse, softcap):
    """``_sdpa`` with the scores ``softcap * tanh(scale * q.k / softcap)`` (NaN where not finite, as uncapped), in
    fp32, a block of sequences or of one sequence's query rows at a time (about CAPPED_SCORES_PER_CHUNK scores). Rows
    that see no key (padding rows, dropped later) give zeros."""
    n, hq, lq, d = q.shape
    group, length = hq // k.shape[1], k.shape[2]
    if causal:
        below = torch.ones(lq, length, dtype=torch.bool, device=q.device).tril()
        allowed = below if allowed is None else allowed & below
    per_row = max(1, hq * length)
    seqs = max(1, CAPPED_SCORES_PER_CHUNK // (per_row * lq))
    rows = lq if seqs > 1 else max(1, CAPPED_SCORES_PER_CHUNK // per_row)
    outs, lses = [], []
    for i in range(0, n, seqs):
        kc, vc = (x[i:i + seqs].float().repeat_interleave(group, 1) for x in (k, v))
        mask = allowed[i:i + seqs] if allowed is not None and allowed.dim() == 4 else allowed
        for r in range(0, lq, rows):
            scores = scale * q[i:i + seqs, :, r:r + rows].float() @ kc.transpose(-1, -2)
            scores = torch.where(scores.abs() < math.inf, softcap * torch.tanh(scores / softcap), math.nan)
            if mask is not None:
                scores = scores.masked_fill(~(mask[..., r:r + rows, :] if mask.shape[-2] > 1 else mask), -math.inf)
            lse = torch.logsumexp(scores, -1)
            probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
            outs.append((probs @ vc).to(q.dtype))
            lses.append(lse.detach())
    blocks = -(-lq // rows)  # row blocks per block of sequences
    out = torch.cat([torch.cat(outs[j:j + blocks], 2) for j in range(0, len(outs), blocks)])
    lse = torch.cat([torch.cat(lses[j:j + blocks], 2) for j in range(0, len(lses), blocks)]) if need_lse else None
    return out, lse


def _allowed(key_mask, length, causal, window, device):
    """(the bool mask for ``_sdpa`` or None, its causal flag) of a bucket padded to ``length`` with ``key_mask``
    ``[n, 1, 1, length]`` or None; a ``window``, or the causal mask beside a ``key_mask`` (SDPA takes a mask or its
    causal flag, not both, since torch 2.15), is a band (causal folded in), which padding query rows (dropped later)
    ignore so that none of them attends to nothing."""
    if window is None and (key_mask is None or not causal):
        return key_mask, causal
    left, right = window if window is not None else (length, length)
    offset = torch.arange(length, device=device)[None, :] - torch.arange(length, device=device)[:, None]  # j - i
    band = (offset >= -left) & (offset <= (0 if causal else right))                                      # [L, L]
    if key_mask is None:
        return band, False
    return key_mask & (band | ~key_mask.transpose(-1, -2)), False


def _buckets(lengths) -> list:
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


def _packed(q, k, v, varlen, causal, window, scale, return_lse, softcap):
    return _nan_rows(q, _buckets_attention(q, k, v, varlen, causal, window, scale, return_lse, softcap), return_lse)


def _buckets_attention(q, k, v, varlen, causal, window, scale, return_lse, softcap):
    T, hq, d = q.shape
    lengths = varlen.lengths
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    buckets = _buckets(lengths)
    if not buckets:  # no tokens: an empty result, still part of the graph
        out = _zeros_in_graph(q, k, v)
        return (out, q.new_zeros(hq, 0, dtype=torch.float32)) if return_lse else out
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
            index, valid, keep, rows = _gather_plan([starts[i] for i in ids], [lengths[i] for i in ids], longest,
                                                    q.device)
            qb, kb, vb = (x.index_select(0, index).view(n, longest, x.shape[1], d) for x in (q, k, v))
            all_valid = all(lengths[i] == longest for i in ids)
            key_mask = None if all_valid else valid.view(n, 1, 1, longest)
        allowed, bucket_causal = _allowed(key_mask, longest, causal, window, q.device)
        ob, lb = _sdpa(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), allowed, bucket_causal, scale,
                       return_lse, softcap)
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


def _gather_plan(starts, lengths, longest, device):
    """Row indices of a bucket of ``n`` sequences padded to ``longest`` rows each, built on the host and copied
    without a synchronization: ``index [n * longest]`` (padding rows repeat a sequence's last row), ``valid`` (bool,
    same shape), ``keep`` (the positions of the valid rows) and ``rows`` (``index[keep]``, the packed rows)."""
    start, length = torch.tensor(starts)[:, None], torch.tensor(lengths)[:, None]
    pos = torch.arange(longest)[None, :]
    valid = (pos < length).flatten()
    index = (start + torch.minimum(pos, length - 1)).flatten()
    keep = torch.nonzero(valid).flatten()
    return tuple(to_device(x, device) for x in (index, valid, keep, index[keep]))


def _nan_rows(q, result, return_lse):
    """NaN (output and lse) where a query row holds a NaN or an infinity, as the oracle gives (its scores are then
    NaN or infinite): CPU SDPA's flash kernel returns 0 there."""
    bad = ~torch.isfinite(q).all(-1, keepdim=True)  # [T, Hq, 1] or [B, L, Hq, 1]; lse is [Hq, T] or [B, Hq, L]
    out = result[0] if return_lse else result
    out = out.masked_fill(bad, float("nan"))
    return (out, result[1].masked_fill(bad[..., 0].transpose(-1, -2), float("nan"))) if return_lse else out


def flash_attention_torch(q, k, v, varlen, key_padding_mask, causal, window, scale, return_lse, softcap=None):
    """The backend contract of ``kalm_fast.ops.flash_attention``."""
    if q.dim() == 3:
        return _packed(q, k, v, varlen, causal, window, scale, return_lse, softcap)
    if key_padding_mask is None:
        allowed, causal = _allowed(None, q.shape[1], causal, window, q.device)
        ob, lse = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed, causal, scale, return_lse,
                        softcap)
        out = ob.transpose(1, 2)
        return _nan_rows(q, (out, lse.float()) if return_lse else out, return_lse)
    return padded_via_packed(_packed, q, k, v, key_padding_mask, causal, window, scale, return_lse, softcap)
