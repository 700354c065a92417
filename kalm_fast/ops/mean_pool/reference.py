"""Backend ``reference`` of ``mean_pool``, the oracle: a Python loop over sequences, fp32, obviously correct
(and slow)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
              cu_seqlens: Optional[torch.Tensor] = None, dim: Optional[int] = None,
              normalize: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Mean of the real tokens of each sequence.

    padded: ``hidden [B, L, H]``, ``attention_mask [B, L]`` (None: every token is real; any nonzero value marks a
    real token, weight 1); packed: ``hidden [T, H]``, ``cu_seqlens [N+1]``. Returns ``[B or N, dim or H]`` in
    ``hidden.dtype``.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        rows = [hidden[s:e].float() for s, e in zip(bounds[:-1], bounds[1:])]
        real = [torch.ones(r.shape[0], dtype=torch.bool, device=hidden.device) for r in rows]
    else:
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
        rows = [hidden[b].float() for b in range(hidden.shape[0])]
        real = [mask[b] != 0 for b in range(hidden.shape[0])]
    out = []
    for h, keep in zip(rows, real):
        total = h[keep].sum(dim=0)  # padding never enters the sum (not even a NaN there)
        out.append(total / max(int(keep.sum()), 1))
    result = torch.stack(out) if out else hidden.new_zeros(0, hidden.shape[-1], dtype=torch.float32)
    if dim is not None:
        result = result[:, :dim]
    if normalize:
        result = F.normalize(result, p=2.0, dim=-1, eps=eps)
    return result.to(hidden.dtype)


def mean_pool_reference(hidden, mask, varlen, dim, normalize, eps):
    """The oracle under the backend contract of ``kalm_fast.ops.mean_pool``."""
    return mean_pool(hidden, mask, cu_seqlens=None if varlen is None else varlen.cu_seqlens, dim=dim,
                     normalize=normalize, eps=eps)
