"""Backend ``reference`` of ``focal_infonce``, the oracle and the definition: materializes the whole similarity
matrix; slow, obviously correct.

Inputs: ``q [B, D]`` query embeddings; ``docs [B, 1+M, D]``: ``docs[i, 0]`` is the positive of query i and
``docs[i, 1:]`` its M hard negatives (M >= 0).

1. Similarity ``s(x, y)``: cosine (inputs L2-normalized inside) for ``"cos"``, plain dot for ``"dot"``.
2. Candidates of query i: ``C_i`` = every document of the batch, ``docs[j, m]`` for all j, m, when
   ``in_batch_negatives``; otherwise only ``docs[i, :]``. With ``gather=True`` (inside an initialized
   ``torch.distributed`` group) "the batch" is every rank's ``docs``, and the loss equals the single-process loss on
   the global batch.
3. Online hard-negative mixing (``num_synthetic = S > 0``): rank query i's own hard negatives ``docs[i, 1:]`` by
   ``s(q_i, .)``, keep the top ``K = min(mix_top_k or M, M)``. If ``K >= 2``, for each of the S synthetic negatives
   draw two distinct indices a, b uniformly from those K and ``lambda ~ Beta(mix_alpha, mix_alpha)``
   (``mixing_draws``, from ``generator``), and form ``h = normalize(lambda * n_a + (1 - lambda) * n_b)`` (from the
   normalized vectors when ``"cos"``). That is ``mix_mode="pair"``; with ``mix_mode="list"`` each synthetic
   negative mixes all K: ``h = normalize(sum_k w_k n_k)``, ``w_k = g_k exp(s_k) / sum_j g_j exp(s_j)`` with
   ``s_k = s(q_i, n_k)`` and K independent ``g_k ~ Gamma(mix_alpha)`` (``list_mixing_draws``), i.e. weights
   ``g / sum g ~ Dirichlet(mix_alpha, ..., mix_alpha)`` tilted by ``exp(s_k)`` (the pair mode's Beta is the
   Dirichlet of two): a random convex combination leaning towards the negatives most similar to the query.
   Synthetic negatives carry no gradient; they join ``C_i`` for query i only.
4. False-negative masking (``false_negative_margin = m``, off when None): drop from ``C_i`` every candidate other
   than the positive with ``s(q_i, c) > s(q_i, docs[i, 0]) + m``, up to a rounding slack of
   ``MARGIN_SLACK * (1 + |s(q_i, docs[i, 0])|)`` (the backends' scores of one pair may differ in the last bits, so
   that a copy of the positive, at ``s = s_pos`` exactly, would be kept or dropped by chance at ``m = 0``).
5. ``z_ic = s(q_i, c) / temperature``; ``log p_i = z_i,pos - logsumexp_{c in C_i} z_ic``.
6. Focal weight ``w_i = (1 - p_i) ** gamma`` (``gamma = 0`` gives plain InfoNCE); with ``detach_focal_weight`` it is
   a constant in the gradient.
7. ``loss_i = - w_i * log p_i``; ``reduction`` "mean" (default) / "sum" / "none" (``[B]``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._constants import NORM_EPS

MARGIN_SLACK = 1e-5  # relative: candidates within float32 rounding of the margin's bound are kept, on every backend


def margin_bound(s_pos: torch.Tensor) -> torch.Tensor:
    """The positives' scores widened by the rounding slack: with a margin m, a candidate other than the positive is
    dropped when ``s > margin_bound(s_pos) + m``."""
    return s_pos + MARGIN_SLACK * (1 + s_pos.abs())


def _sim(x: torch.Tensor, similarity: str) -> torch.Tensor:
    x = x.float()
    return F.normalize(x, dim=-1, eps=NORM_EPS) if similarity == "cos" else x


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
        keep = ~(sims > margin_bound(pos_sim).unsqueeze(1) + false_negative_margin) | is_pos
    logits = (sims / temperature).masked_fill(~keep, float("-inf"))
    log_p = torch.log_softmax(logits, dim=1)[torch.arange(batch), pos_col]
    neg_sim = sims.detach().masked_fill(~keep | is_pos, float("-inf")).max(dim=1).values
    return log_p, pos_sim.detach(), neg_sim


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


def list_mixing_draws(batch: int, num_synthetic: int, top_k: int, alpha: float,
                      generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """The random part of list-wise mixing: ``g [batch, num_synthetic, top_k]`` float32 Gamma(alpha) draws (from
    ``generator`` on its device, then moved to ``device``); each row divided by its sum is a ``Dirichlet(alpha, ...,
    alpha)`` draw. Left unnormalized: the mixing weights ``g_k exp(s_k)`` are normalized once, and every draw is
    at least the smallest normal float (torch clamps), so their sum never underflows to 0."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    conc = torch.full((batch, num_synthetic, top_k), float(alpha), dtype=torch.float32, device=gen_device)
    return torch._standard_gamma(conc, generator=generator).to(device)


@torch.no_grad()
def synthetic_negatives(q, docs, num_synthetic, mix_top_k, mix_alpha, similarity, generator, mix_mode="pair"):
    """Step 3 with a loop over queries; the random draws come from ``mixing_draws`` / ``list_mixing_draws``."""
    top_k = mixing_top_k(docs.shape[1] - 1, mix_top_k)
    if num_synthetic == 0 or top_k < 2:
        return None
    if mix_mode == "list":
        g = list_mixing_draws(q.shape[0], num_synthetic, top_k, mix_alpha, generator, q.device)
    else:
        a, b, lam = mixing_draws(q.shape[0], num_synthetic, top_k, mix_alpha, generator, q.device)
    out = []
    for i in range(q.shape[0]):
        qi, negs = _sim(q[i], similarity), _sim(docs[i, 1:], similarity)
        order = torch.argsort(negs @ qi, descending=True)[:top_k]
        rows = []
        for s in range(num_synthetic):
            if mix_mode == "list":
                sims = negs[order] @ qi
                w = g[i, s] * torch.exp(sims - sims.max())  # exp(s_k), shifted: the ratios are the same
                h = (w / w.sum()) @ negs[order]
            else:
                h = lam[i, s] * negs[order[a[i, s]]] + (1 - lam[i, s]) * negs[order[b[i, s]]]
            rows.append(F.normalize(h, dim=0, eps=NORM_EPS))
        out.append(torch.stack(rows))
    return torch.stack(out)


def focal_infonce(q: torch.Tensor, docs: torch.Tensor, *, temperature: float = 0.01, gamma: float = 0.5,
                  similarity: str = "cos", in_batch_negatives: bool = True, num_synthetic: int = 0,
                  mix_top_k: Optional[int] = None, mix_alpha: float = 2.0, mix_mode: str = "pair",
                  generator: Optional[torch.Generator] = None, false_negative_margin: Optional[float] = None,
                  detach_focal_weight: bool = False, reduction: str = "mean") -> torch.Tensor:
    """``loss_i = -(1 - p_i) ** gamma * log p_i`` over ``q [B, D]``, ``docs [B, 1+M, D]``; float32 result."""
    synthetic = synthetic_negatives(q, docs, num_synthetic, mix_top_k, mix_alpha, similarity, generator, mix_mode)
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
