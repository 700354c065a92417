"""Backend ``reference`` of ``flash_attention``, the oracle: every score matrix materialized, one sequence at a
time, in fp32.

Slow and obviously correct. Rows that attend to no key (padded query rows) give output 0 and lse +inf.
"""
from __future__ import annotations

import torch


def _attend(q, k, v, key_mask, causal, window, scale, softcap):
    """One sequence. q [L, Hq, D], k/v [L, Hkv, D], key_mask [L] bool or None, window (left, right) or None,
    softcap a float or None -> out [L, Hq, D] fp32, lse [Hq, L]."""
    L, Hq, _ = q.shape
    group = Hq // k.shape[1]
    qf = q.float().transpose(0, 1)                                    # [Hq, L, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)    # [Hq, L, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = scale * qf @ kf.transpose(1, 2)                          # [Hq, L, L]
    if softcap is not None:  # a score that is not finite stays NaN (a query row holding NaN or inf gives NaN)
        scores = torch.where(scores.abs() < float("inf"), softcap * torch.tanh(scores / softcap), float("nan"))
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        allowed = allowed & key_mask[None, :] & key_mask[:, None]     # padded queries attend to nothing
        vf = vf.masked_fill(~key_mask[None, :, None], 0.0)            # padded values never reach a real row
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    if window is not None:
        i = torch.arange(L, device=q.device)
        offset = i[None, :] - i[:, None]                              # key j - query i
        allowed = allowed & (offset >= -window[0]) & (offset <= window[1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                             # [Hq, L], -inf where every score is -inf
    empty = ~allowed.any(-1)                                          # [L] padded queries: zeros, lse +inf
    # a real row whose scores are not all finite (its query holds an infinity or NaN): NaN, as its output (every
    # score -inf: softmax's 0/0; a +inf or NaN score: inf - inf)
    lse = lse.masked_fill(~torch.isfinite(lse) & ~empty, float("nan"))
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
    out = (probs @ vf).transpose(0, 1)                                # [L, Hq, D]
    return out, lse.masked_fill(empty, float("inf"))


def flash_attention(q, k, v, cu_seqlens=None, max_seqlen=None, key_padding_mask=None, causal=False, window=None,
                    softmax_scale=None, return_lse=False, softcap=None):
    """Packed: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [N+1] -> out [T, Hq, D] (lse [Hq, T]).
    Padded: q [B, L, Hq, D], k/v [B, L, Hkv, D], key_padding_mask [B, L] or None -> out [B, L, Hq, D]
    (lse [B, Hq, L])."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if q.dim() == 3:
        bounds = cu_seqlens.tolist()
        outs, lses = [], []
        for s, e in zip(bounds[:-1], bounds[1:]):
            o, l = _attend(q[s:e], k[s:e], v[s:e], None, causal, window, scale, softcap)
            outs.append(o)
            lses.append(l)
        out = torch.cat(outs, 0) if outs else q.float() * 0
        lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32)
    else:
        outs, lses = [], []
        for b in range(q.shape[0]):
            mask = None if key_padding_mask is None else key_padding_mask[b].bool()
            o, l = _attend(q[b], k[b], v[b], mask, causal, window, scale, softcap)
            outs.append(o)
            lses.append(l)
        B, L, Hq, _ = q.shape
        out = torch.stack(outs) if outs else q.float() * 0
        lse = torch.stack(lses) if lses else q.new_zeros(0, Hq, L, dtype=torch.float32)
    out = out.to(q.dtype)
    return (out, lse.detach()) if return_lse else out  # lse is an output, not differentiable (as every backend's)


def flash_attention_reference(q, k, v, varlen, key_padding_mask, causal, window, scale, return_lse, softcap=None):
    """The oracle under the backend contract of ``kalm_fast.ops.flash_attention``."""
    cu_seqlens = None if varlen is None else varlen.cu_seqlens
    return flash_attention(q, k, v, cu_seqlens, None, key_padding_mask, causal, window, scale, return_lse, softcap)
