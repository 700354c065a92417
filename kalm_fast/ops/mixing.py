"""Online hard-negative mixing (SPEC focal_infonce step 3), shared by every backend.

All randomness of the loss is drawn here, once, from a ``torch.Generator``; backends receive the finished
synthetic negatives ``[B, S, D]`` (float32, no gradient), so every backend sees the same candidates for the
same generator state.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

EPS = 1e-12  # as F.normalize
_CHUNK = 1024  # query rows ranked at a time (bounds the float32 temporaries)


def mixing_top_k(num_hard: int, mix_top_k: Optional[int]) -> int:
    """K = min(mix_top_k or M, M): how many of a query's hard negatives are mixed."""
    return min(mix_top_k or num_hard, num_hard)


def mixing_draws(batch: int, num_synthetic: int, top_k: int, alpha: float,
                 generator: Optional[torch.Generator] = None, device=None):
    """The random part of mixing: ``(a, b, lam)``, each ``[batch, num_synthetic]``.

    ``a != b`` are uniform ranks in ``[0, top_k)`` (0 = the hardest negative), ``lam ~ Beta(alpha, alpha)``
    (float32). Drawn in this order from ``generator`` (the default generator when None) on the generator's
    device, then moved to ``device``.
    """
    if top_k < 2:
        raise ValueError(f"mixing needs top_k >= 2 hard negatives to choose from, got {top_k}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    shape = (batch, num_synthetic)
    a = torch.randint(0, top_k, shape, generator=generator, device=gen_device)
    b = torch.randint(0, top_k - 1, shape, generator=generator, device=gen_device)
    b = b + (b >= a).long()  # uniform over the other top_k - 1 ranks
    conc = torch.full(shape, float(alpha), dtype=torch.float32, device=gen_device)
    g1 = torch._standard_gamma(conc, generator=generator)
    g2 = torch._standard_gamma(conc, generator=generator)
    lam = g1 / (g1 + g2)  # Beta(alpha, alpha)
    return a.to(device), b.to(device), lam.to(device)


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
            qc, negs = F.normalize(qc, dim=-1, eps=EPS), F.normalize(negs, dim=-1, eps=EPS)
        scores = torch.bmm(negs, qc.unsqueeze(-1)).squeeze(-1)  # [chunk, M]
        ranked.append(torch.topk(scores, top_k, dim=1).indices)
    ranked = torch.cat(ranked)  # [B, K], hardest first
    a, b, lam = mixing_draws(batch, num_synthetic, top_k, mix_alpha, generator, q.device)
    rows = torch.arange(batch, device=q.device).unsqueeze(1)
    n_a = docs[rows, 1 + ranked.gather(1, a)].float()  # [B, S, D]
    n_b = docs[rows, 1 + ranked.gather(1, b)].float()
    if similarity == "cos":
        n_a, n_b = F.normalize(n_a, dim=-1, eps=EPS), F.normalize(n_b, dim=-1, eps=EPS)
    lam = lam.unsqueeze(-1)
    return F.normalize(lam * n_a + (1 - lam) * n_b, dim=-1, eps=EPS)
