"""Online hard-negative mixing (step 3 of ``reference.py``), vectorized, shared by every backend.

All randomness of the loss is drawn here, once, from a ``torch.Generator`` by the oracle's ``mixing_draws``;
backends receive the finished synthetic negatives ``[B, S, D]`` (float32, no gradient), so every backend sees the
same candidates for the same generator state.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._constants import NORM_EPS
from .reference import mixing_draws, mixing_top_k

_CHUNK = 1024  # query rows ranked at a time (bounds the float32 temporaries)


@torch.no_grad()
def synthetic_negatives(q: torch.Tensor, docs: torch.Tensor, *, num_synthetic: int, mix_top_k: Optional[int] = None,
                        mix_alpha: float = 2.0, similarity: str = "cos",
                        generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """Synthetic hard negatives ``[B, S, D]`` float32 for ``q [B, D]``, ``docs [>=B, 1+M, D]``, or None.

    Query i's hard negatives ``docs[i, 1:]`` are ranked by ``s(q_i, .)``; the top K are mixed pairwise:
    ``h = normalize(lam * n_a + (1 - lam) * n_b)`` (from the normalized vectors when ``similarity="cos"``).
    None when ``num_synthetic == 0`` or K < 2 (not enough hard negatives to mix).
    """
    batch = q.shape[0]
    top_k = mixing_top_k(docs.shape[1] - 1, mix_top_k)
    if num_synthetic == 0 or top_k < 2:
        return None
    ranked = []
    for i0 in range(0, batch, _CHUNK):
        qc = q[i0:i0 + _CHUNK].float()
        negs = docs[i0:i0 + qc.shape[0], 1:].float()
        if similarity == "cos":
            qc, negs = F.normalize(qc, dim=-1, eps=NORM_EPS), F.normalize(negs, dim=-1, eps=NORM_EPS)
        scores = torch.bmm(negs, qc.unsqueeze(-1)).squeeze(-1)  # [chunk, M]
        ranked.append(torch.topk(scores, top_k, dim=1).indices)
    ranked = torch.cat(ranked)  # [B, K], hardest first
    a, b, lam = mixing_draws(batch, num_synthetic, top_k, mix_alpha, generator, q.device)
    rows = torch.arange(batch, device=q.device).unsqueeze(1)
    n_a = docs[rows, 1 + ranked.gather(1, a)].float()  # [B, S, D]
    n_b = docs[rows, 1 + ranked.gather(1, b)].float()
    if similarity == "cos":
        n_a, n_b = F.normalize(n_a, dim=-1, eps=NORM_EPS), F.normalize(n_b, dim=-1, eps=NORM_EPS)
    lam = lam.unsqueeze(-1)
    return F.normalize(lam * n_a + (1 - lam) * n_b, dim=-1, eps=NORM_EPS)
