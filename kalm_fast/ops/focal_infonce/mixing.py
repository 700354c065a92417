"""Online hard-negative mixing (step 3 of ``reference.py``), vectorized, shared by every backend.

All randomness of the loss is drawn here, once, from a ``torch.Generator`` by the oracle's ``mixing_draws`` (or
``list_mixing_draws``);
backends receive the finished synthetic negatives ``[B, S, D]`` (float32, no gradient), so every backend sees the
same candidates for the same generator state.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._constants import NORM_EPS
from .reference import list_mixing_draws, mixing_draws, mixing_top_k

_CHUNK = 1024  # query rows ranked at a time (bounds the float32 temporaries)


@torch.no_grad()
def synthetic_negatives(q: torch.Tensor, docs: torch.Tensor, *, num_synthetic: int, mix_top_k: Optional[int] = None,
                        mix_alpha: float = 2.0, mix_mode: str = "pair", similarity: str = "cos",
                        generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """Synthetic hard negatives ``[B, S, D]`` float32 for ``q [B, D]``, ``docs [>=B, 1+M, D]``, or None.

    Query i's hard negatives ``docs[i, 1:]`` are ranked by ``s(q_i, .)`` and the top K mixed (from the normalized
    vectors when ``similarity="cos"``): ``mix_mode="pair"`` gives ``h = normalize(lam * n_a + (1 - lam) * n_b)``,
    ``"list"`` gives ``h = normalize(sum_k w_k n_k)``, ``w ~ g * exp(s(q_i, n_k))`` with ``g ~ Dirichlet``.
    None when ``num_synthetic == 0`` or K < 2 (not enough hard negatives to mix).
    """
    batch = q.shape[0]
    top_k = mixing_top_k(docs.shape[1] - 1, mix_top_k)
    if num_synthetic == 0 or top_k < 2:
        return None
    if mix_mode == "list":
        g = list_mixing_draws(batch, num_synthetic, top_k, mix_alpha, generator, q.device)  # [B, S, K]
    else:
        a, b, lam = mixing_draws(batch, num_synthetic, top_k, mix_alpha, generator, q.device)  # [B, S] each
        lam = lam.unsqueeze(-1)
    out = torch.empty(batch, num_synthetic, q.shape[1], dtype=torch.float32, device=q.device)
    for i0 in range(0, batch, _CHUNK):
        i1 = min(i0 + _CHUNK, batch)
        qc, negs = q[i0:i1].float(), docs[i0:i1, 1:].float()
        if similarity == "cos":
            qc, negs = F.normalize(qc, dim=-1, eps=NORM_EPS), F.normalize(negs, dim=-1, eps=NORM_EPS)
        scores = torch.bmm(negs, qc.unsqueeze(-1)).squeeze(-1)  # [chunk, M]
        top = torch.topk(scores, top_k, dim=1)  # [chunk, K], hardest first
        rows = torch.arange(i1 - i0, device=q.device).unsqueeze(1)
        if mix_mode == "list":
            w = g[i0:i1] * torch.exp(top.values - top.values[:, :1]).unsqueeze(1)  # exp(s_k), shifted by the max
            h = torch.bmm(w / w.sum(dim=-1, keepdim=True), negs[rows, top.indices])  # [chunk, S, D]
        else:
            n_a = negs[rows, top.indices.gather(1, a[i0:i1])]  # [chunk, S, D]
            n_b = negs[rows, top.indices.gather(1, b[i0:i1])]
            h = lam[i0:i1] * n_a + (1 - lam[i0:i1]) * n_b
        out[i0:i1] = F.normalize(h, dim=-1, eps=NORM_EPS)
    return out
