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
    if mix_mode not in ("pair", "list"):
        raise ValueError(f"mix_mode must be 'pair' or 'list', got {mix_mode!r}")
    batch = q.shape[0]
    top_k = mixing_top_k(docs.shape[1] - 1, mix_top_k)
    if num_synthetic == 0 or top_k < 2:
        return None
    ranked, top_scores = [], []
    for i0 in range(0, batch, _CHUNK):
        qc = q[i0:i0 + _CHUNK].float()
        negs = docs[i0:i0 + qc.shape[0], 1:].float()
        if similarity == "cos":
            qc, negs = F.normalize(qc, dim=-1, eps=NORM_EPS), F.normalize(negs, dim=-1, eps=NORM_EPS)
        scores = torch.bmm(negs, qc.unsqueeze(-1)).squeeze(-1)  # [chunk, M]
        top = torch.topk(scores, top_k, dim=1)
        ranked.append(top.indices)
        top_scores.append(top.values)
    ranked = torch.cat(ranked)  # [B, K], hardest first
    if mix_mode == "list":
        return _list_mix(docs, ranked, torch.cat(top_scores), num_synthetic, mix_alpha, similarity, generator)
    a, b, lam = mixing_draws(batch, num_synthetic, top_k, mix_alpha, generator, q.device)
    rows = torch.arange(batch, device=q.device).unsqueeze(1)
    n_a = docs[rows, 1 + ranked.gather(1, a)].float()  # [B, S, D]
    n_b = docs[rows, 1 + ranked.gather(1, b)].float()
    if similarity == "cos":
        n_a, n_b = F.normalize(n_a, dim=-1, eps=NORM_EPS), F.normalize(n_b, dim=-1, eps=NORM_EPS)
    lam = lam.unsqueeze(-1)
    return F.normalize(lam * n_a + (1 - lam) * n_b, dim=-1, eps=NORM_EPS)


def _list_mix(docs, ranked, top_scores, num_synthetic, mix_alpha, similarity, generator) -> torch.Tensor:
    """List-wise mixing of each query's top K (``ranked [B, K]``, their scores ``top_scores [B, K]``, hardest first):
    ``normalize(sum_k w_k n_k)``, ``w_k ~ g_k exp(s_k)``, a chunk of queries at a time."""
    batch, top_k = ranked.shape
    g = list_mixing_draws(batch, num_synthetic, top_k, mix_alpha, generator, docs.device)  # [B, S, K], >= tiny
    out = torch.empty(batch, num_synthetic, docs.shape[-1], dtype=torch.float32, device=docs.device)
    for i0 in range(0, batch, _CHUNK):
        i1 = min(i0 + _CHUNK, batch)
        rows = torch.arange(i0, i1, device=docs.device).unsqueeze(1)
        negs = docs[rows, 1 + ranked[i0:i1]].float()  # [chunk, K, D]
        if similarity == "cos":
            negs = F.normalize(negs, dim=-1, eps=NORM_EPS)
        # exp(s_k) shifted by each row's largest score: the hardest negative's weight is g_0 > 0, so the sum is too
        w = g[i0:i1] * torch.exp(top_scores[i0:i1] - top_scores[i0:i1, :1]).unsqueeze(1)
        out[i0:i1] = F.normalize(torch.bmm(w / w.sum(dim=-1, keepdim=True), negs), dim=-1, eps=NORM_EPS)
    return out
