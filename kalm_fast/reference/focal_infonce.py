"""Reference focal-InfoNCE (SPEC steps 1-7): materializes the whole similarity matrix; slow, obviously correct."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

EPS = 1e-12


def _sim(x: torch.Tensor, similarity: str) -> torch.Tensor:
    x = x.float()
    return F.normalize(x, dim=-1, eps=EPS) if similarity == "cos" else x


def log_p_rows(q: torch.Tensor, docs: torch.Tensor, synthetic: Optional[torch.Tensor], temperature: float,
               similarity: str, in_batch_negatives: bool, false_negative_margin: Optional[float]):
    """Per-query ``log p_i`` and similarities, the backend contract of ``kalm_fast.ops.focal_infonce``.

    ``q [B, D]``, ``docs [Bd >= B, 1+M, D]`` (query i's positive is ``docs[i, 0]``), ``synthetic [B, S, D]`` or None.
    Returns ``(log_p, pos_sim, hardest_neg_sim)``, each ``[B]`` float32; only ``log_p`` has a gradient.
    """
    batch, group = q.shape[0], docs.shape[1]
    qs = _sim(q, similarity)
    ds = _sim(docs, similarity)
    if in_batch_negatives:
        sims = qs @ ds.reshape(-1, ds.shape[-1]).T  # [B, Bd*(1+M)]
        pos_col = torch.arange(batch, device=q.device) * group
    else:
        sims = torch.einsum("bd,bgd->bg", qs, ds[:batch])  # [B, 1+M]
        pos_col = torch.zeros(batch, dtype=torch.long, device=q.device)
    if synthetic is not None:
        sims = torch.cat([sims, torch.einsum("bd,bsd->bs", qs, _sim(synthetic, similarity))], dim=1)
    is_pos = torch.zeros_like(sims, dtype=torch.bool)
    is_pos[torch.arange(batch), pos_col] = True
    pos_sim = sims[torch.arange(batch), pos_col]
    keep = torch.ones_like(is_pos)
    if false_negative_margin is not None:
        keep = ~(sims > pos_sim.unsqueeze(1) + false_negative_margin) | is_pos
    logits = (sims / temperature).masked_fill(~keep, float("-inf"))
    log_p = torch.log_softmax(logits, dim=1)[torch.arange(batch), pos_col]
    neg_sim = sims.detach().masked_fill(~keep | is_pos, float("-inf")).max(dim=1).values
    return log_p, pos_sim.detach(), neg_sim


@torch.no_grad()
def synthetic_negatives(q, docs, num_synthetic, mix_top_k, mix_alpha, similarity, generator):
    """SPEC step 3 with a loop over queries; the random draws come from the shared helper."""
    from kalm_fast.ops.mixing import mixing_draws  # imported here: kalm_fast.ops imports this module

    num_hard = docs.shape[1] - 1
    top_k = min(mix_top_k or num_hard, num_hard)
    if num_synthetic == 0 or top_k < 2:
        return None
    a, b, lam = mixing_draws(q.shape[0], num_synthetic, top_k, mix_alpha, generator, q.device)
    out = []
    for i in range(q.shape[0]):
        qi, negs = _sim(q[i], similarity), _sim(docs[i, 1:], similarity)
        order = torch.argsort(negs @ qi, descending=True)[:top_k]
        rows = []
        for s in range(num_synthetic):
            n_a, n_b = negs[order[a[i, s]]], negs[order[b[i, s]]]
            rows.append(F.normalize(lam[i, s] * n_a + (1 - lam[i, s]) * n_b, dim=0, eps=EPS))
        out.append(torch.stack(rows))
    return torch.stack(out)


def focal_infonce(q: torch.Tensor, docs: torch.Tensor, *, temperature: float = 0.01, gamma: float = 0.5,
                  similarity: str = "cos", in_batch_negatives: bool = True, num_synthetic: int = 0,
                  mix_top_k: Optional[int] = None, mix_alpha: float = 2.0,
                  generator: Optional[torch.Generator] = None, false_negative_margin: Optional[float] = None,
                  detach_focal_weight: bool = False, reduction: str = "mean") -> torch.Tensor:
    """``loss_i = -(1 - p_i) ** gamma * log p_i`` over ``q [B, D]``, ``docs [B, 1+M, D]``; float32 result."""
    synthetic = synthetic_negatives(q, docs, num_synthetic, mix_top_k, mix_alpha, similarity, generator)
    log_p, _, _ = log_p_rows(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin)
    one_minus_p = -torch.expm1(log_p)
    # clamp: at p == 1 the weight's derivative is 0 * inf; its limit is 0, which the clamp gives
    weight = one_minus_p.clamp_min(torch.finfo(torch.float32).tiny) ** gamma
    if detach_focal_weight:
        weight = weight.detach()
    loss = -weight * log_p
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
