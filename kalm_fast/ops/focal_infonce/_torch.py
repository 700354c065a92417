"""Backend ``torch`` of ``focal_infonce``: the in-batch pass in pure PyTorch, float32 tiles, never the whole
score matrix."""
from __future__ import annotations

import torch

from . import logp
from .logp import LogP


class TorchEngine:
    """In-batch candidates in pure PyTorch: float32 tiles of ``logp.TILE_Q`` queries x ``logp.TILE_C`` candidates,
    computed in place."""

    @staticmethod
    def _tiles(batch, c_lo, c_hi):
        for i0 in range(0, batch, logp.TILE_Q):
            for c0 in range(c_lo, c_hi, logp.TILE_C):
                yield i0, min(i0 + logp.TILE_Q, batch), c0, min(c0 + logp.TILE_C, c_hi)

    @staticmethod
    def _logits(q, flat, rq, rd, s_pos, inv_tau, margin, group, i0, i1, c0, c1):
        """``z = s / temperature`` of a tile (dropped false negatives at -inf) and the tile's positives' indices."""
        z = (q[i0:i1].float() * (rq[i0:i1, None] * inv_tau)) @ flat[c0:c1].float().T
        z.mul_(rd[None, c0:c1])
        rows = torch.arange(i0, i1, device=q.device)
        here = (rows * group >= c0) & (rows * group < c1)
        pos = (rows[here] - i0, rows[here] * group - c0)  # (row, column) of the positives inside the tile
        if margin is not None:
            drop = z > ((s_pos[i0:i1] + margin) * inv_tau)[:, None]
            drop[pos] = False
            z.masked_fill_(drop, float("-inf"))
        return z, pos

    @classmethod
    def forward(cls, q, flat, rq, rd, s_pos, inv_tau, margin, group):
        """``(lse, hardest_neg)`` ``[B]`` over all rows of ``flat [N, D]`` (query i's positive is row i*group)."""
        lse = torch.full((q.shape[0],), float("-inf"), device=q.device)
        neg = lse.clone()
        for i0, i1, c0, c1 in cls._tiles(q.shape[0], 0, flat.shape[0]):
            z, pos = cls._logits(q, flat, rq, rd, s_pos, inv_tau, margin, group, i0, i1, c0, c1)
            lse[i0:i1] = torch.logaddexp(lse[i0:i1], torch.logsumexp(z, dim=1))
            z[pos] = float("-inf")
            neg[i0:i1] = torch.maximum(neg[i0:i1], z.amax(dim=1) / inv_tau)
        return lse, neg

    @classmethod
    def backward(cls, q, flat, rq, rd, s_pos, lse, gc, inv_tau, margin, group, dq, dd, c0=0):
        """Adds the in-batch part of ``G = dL/ds`` of candidates ``c0 .. c0 + len(dd)``: ``dq += (G * rd) @ flat``
        and ``dd += (G * rq)^T @ q``."""
        for i0, i1, t0, t1 in cls._tiles(q.shape[0], c0, c0 + dd.shape[0]):
            grad, pos = cls._logits(q, flat, rq, rd, s_pos, inv_tau, margin, group, i0, i1, t0, t1)
            grad.sub_(lse[i0:i1, None]).exp_().mul_(-gc[i0:i1, None])  # -gc * P
            grad.index_put_(pos, gc[i0 + pos[0]], accumulate=True)  # + gc at the positive
            dd[t0 - c0:t1 - c0].addmm_(grad.T, q[i0:i1].float() * rq[i0:i1, None])
            dq[i0:i1].addmm_(grad.mul_(rd[None, t0:t1]), flat[t0:t1].float())


def focal_infonce_torch(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin):
    """The backend contract of ``kalm_fast.ops.focal_infonce``."""
    return LogP.apply(q, docs, synthetic, temperature, similarity == "cos", in_batch_negatives,
                      false_negative_margin, TorchEngine)
