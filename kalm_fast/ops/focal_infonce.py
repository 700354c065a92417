"""Focal-InfoNCE with online hard-negative mixing (SPEC ``focal_infonce``): checks, backends, autograd.

Backend contract (every backend registered for "focal_infonce" is called exactly like this)::

    fn(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin)
        -> (log_p, pos_sim, hardest_neg_sim)

- ``q [B, D]`` and ``docs [Bd, 1+M, D]`` with ``Bd >= B``, same float dtype; query i's positive is
  ``docs[i, 0]``, ``docs[i, 1:]`` its hard negatives. ``Bd > B`` happens with ``gather=True``: the ops put
  this rank's docs first, the other ranks' docs after them (extra in-batch negatives only).
- ``synthetic [B, S, D]`` float32 (already-drawn mixed negatives, no gradient) or None.
- ``temperature`` float > 0, ``similarity`` "cos" | "dot", ``in_batch_negatives`` bool,
  ``false_negative_margin`` float or None.
- Returns float32 ``[B]`` tensors: ``log_p`` (SPEC step 5, differentiable w.r.t. ``q`` and ``docs``),
  ``pos_sim = s(q_i, docs[i, 0])`` and ``hardest_neg_sim`` = the largest similarity among the kept
  candidates other than the positive (-inf if none); the last two carry no gradient.

The focal weight, the reduction, mixing draws and gathering across ranks are done here, once, for every
backend. Memory-efficient backends never hold the ``[B, |C|]`` score matrix: they walk tiles of queries x
candidates with a log-sum-exp, and recompute the tiles in backward. For cosine they scale dot products by
stored inverse norms instead of copying normalized inputs.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .._native import cuda_unavailable
from .._registry import BACKEND_NAMES, register, select, triton_unavailable
from ..reference import focal_infonce as _reference
from .mixing import synthetic_negatives

EPS = 1e-12  # norm clamp, as F.normalize
_TINY = torch.finfo(torch.float32).tiny
TILE_Q = 512  # torch backend tile: query rows x candidate rows
TILE_C = 2048


class FocalInfoNCEOutput(NamedTuple):
    """``loss`` (reduced, float32) and per-query float32 ``[B]`` rows for logging."""

    loss: torch.Tensor
    log_p: torch.Tensor
    pos_sim: torch.Tensor
    hardest_neg_sim: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# Shared pieces of the memory-efficient backends (torch and triton differ only in the in-batch tile pass).


def inverse_norms(x: torch.Tensor, cos: bool):
    """``(1 / max(|x_r|, eps), |x_r| > eps)`` as float32 ``[rows]`` (ones / zeros for dot similarity)."""
    if not cos:
        ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        return ones, torch.zeros_like(ones)
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    return 1.0 / norm.clamp_min(EPS), (norm > EPS).float()


def _row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[T, L]`` float32 dots of ``x [T, D]`` with each of ``y [T, L, D]``."""
    return torch.bmm(y.float(), x.float().unsqueeze(-1)).squeeze(-1)


def _local_scores(q, docs, synthetic, rq, rd, rs, i0, i1, in_batch):
    """Scores of queries ``i0:i1`` against their own candidates: own docs (when not in-batch), synthetic."""
    qt = q[i0:i1]
    parts = []
    if not in_batch:
        group = docs.shape[1]
        parts.append(_row_dots(qt, docs[i0:i1]) * rd.view(-1, group)[i0:i1])
    if synthetic is not None:
        parts.append(_row_dots(qt, synthetic[i0:i1]) * rs[i0:i1])
    return torch.cat(parts, dim=1) * rq[i0:i1, None]


def _local_keep(s, s_pos_t, margin, in_batch):
    """(keep, is_pos) masks of local scores ``[T, L]``; the positive is own column 0 when not in-batch."""
    is_pos = torch.zeros_like(s, dtype=torch.bool)
    if not in_batch:
        is_pos[:, 0] = True
    keep = torch.ones_like(is_pos) if margin is None else (s <= s_pos_t[:, None] + margin) | is_pos
    return keep, is_pos


def _local_forward(q, docs, synthetic, rq, rd, rs, s_pos, inv_tau, margin, in_batch):
    batch = q.shape[0]
    lse = torch.full((batch,), float("-inf"), device=q.device)
    neg = lse.clone()
    if in_batch and synthetic is None:
        return lse, neg
    for i0 in range(0, batch, TILE_Q):
        i1 = min(i0 + TILE_Q, batch)
        s = _local_scores(q, docs, synthetic, rq, rd, rs, i0, i1, in_batch)
        keep, is_pos = _local_keep(s, s_pos[i0:i1], margin, in_batch)
        lse[i0:i1] = torch.logsumexp((s * inv_tau).masked_fill(~keep, float("-inf")), dim=1)
        neg[i0:i1] = s.masked_fill(~keep | is_pos, float("-inf")).amax(dim=1)
    return lse, neg


def _local_backward(q, docs, synthetic, rq, rd, rs, s_pos, lse, gc, inv_tau, margin, in_batch, dq, dd):
    """Adds the local candidates' part of dL/ds into the accumulators (see ``_LogP.backward``)."""
    if in_batch and synthetic is None:
        return
    group = docs.shape[1]
    for i0 in range(0, q.shape[0], TILE_Q):
        i1 = min(i0 + TILE_Q, q.shape[0])
        s = _local_scores(q, docs, synthetic, rq, rd, rs, i0, i1, in_batch)
        keep, is_pos = _local_keep(s, s_pos[i0:i1], margin, in_batch)
        p = torch.exp(s * inv_tau - lse[i0:i1, None]) * keep
        grad = gc[i0:i1, None] * (is_pos.float() - p)  # dL/ds
        qt, rqt = q[i0:i1].float(), rq[i0:i1, None]
        if not in_batch:
            g_own = grad[:, :group]
            r_own = rd.view(-1, group)[i0:i1]
            dq[i0:i1] += torch.bmm((g_own * r_own).unsqueeze(1), docs[i0:i1].float()).squeeze(1)
            dd.view(-1, group, dd.shape[-1])[i0:i1] += (g_own * rqt).unsqueeze(-1) * qt.unsqueeze(1)
            grad = grad[:, group:]
        if synthetic is not None:
            dq[i0:i1] += torch.bmm((grad * rs[i0:i1]).unsqueeze(1), synthetic[i0:i1].float()).squeeze(1)


def _finish_grad(acc, x, inv, proj):
    """In place: the chain rule through ``x * inv`` (``inv = 1 / max(|x|, eps)``) of ``acc = sum_c dL/ds_c * r_c * c``.

    ``acc <- inv * acc - inv^3 * (x . acc) * proj * x``: since ``s_c = inv * r_c * (x . c)``, ``inv * (x . acc)``
    is ``sum_c dL/ds_c * s_c``, the coefficient of the projection (``proj = |x| > eps``, 0 for dot similarity).
    """
    for r0 in range(0, acc.shape[0], TILE_C):
        r1 = r0 + TILE_C
        xs, a, inv_r = x[r0:r1].float(), acc[r0:r1], inv[r0:r1]
        coef = inv_r ** 3 * torch.linalg.vecdot(xs, a) * proj[r0:r1]
        a.mul_(inv_r[:, None]).addcmul_(xs, coef[:, None], value=-1)
    return acc


class _LogP(torch.autograd.Function):
    """``log p_i`` of the memory-efficient backends; ``engine`` runs the in-batch tile passes."""

    @staticmethod
    def forward(ctx, q, docs, synthetic, temperature, cos, in_batch, margin, engine):
        batch, group = q.shape[0], docs.shape[1]
        flat = docs.reshape(-1, docs.shape[-1])
        rq, pq = inverse_norms(q, cos)
        rd, pd = inverse_norms(flat, cos)
        rs = None
        if synthetic is not None:
            rs = inverse_norms(synthetic.reshape(-1, synthetic.shape[-1]), cos)[0].view(batch, -1)
        inv_tau = 1.0 / temperature
        pos_rows = torch.arange(batch, device=q.device) * group
        s_pos = (q.float() * flat[pos_rows].float()).sum(dim=-1) * rq * rd[pos_rows]
        lse, neg = _local_forward(q, docs, synthetic, rq, rd, rs, s_pos, inv_tau, margin, in_batch)
        if in_batch:
            lse_b, neg_b = engine.forward(q, flat, rq, rd, s_pos, inv_tau, margin, group)
            lse, neg = torch.logaddexp(lse, lse_b), torch.maximum(neg, neg_b)
        ctx.save_for_backward(q, docs, synthetic, rq, pq, rd, pd, rs, s_pos, lse)
        ctx.inv_tau, ctx.in_batch, ctx.margin, ctx.engine = inv_tau, in_batch, margin, engine
        ctx.mark_non_differentiable(s_pos, neg)
        return s_pos * inv_tau - lse, s_pos, neg

    @staticmethod
    def backward(ctx, dlog_p, _dpos, _dneg):
        q, docs, synthetic, rq, pq, rd, pd, rs, s_pos, lse = ctx.saved_tensors
        flat = docs.reshape(-1, docs.shape[-1])
        # dL/ds_ic = gc_i * ([c is the positive] - P_ic), with gc_i = dL/dlog p_i / temperature. Accumulate
        # sum_c dL/ds_ic * r_c * c (and the transpose for the docs), then finish with the inverse norms.
        gc = dlog_p.float() * ctx.inv_tau
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dd = torch.zeros(flat.shape, dtype=torch.float32, device=q.device)
        if ctx.in_batch:
            ctx.engine.backward(q, flat, rq, rd, s_pos, lse, gc, ctx.inv_tau, ctx.margin, docs.shape[1], dq, dd)
        _local_backward(q, docs, synthetic, rq, rd, rs, s_pos, lse, gc, ctx.inv_tau, ctx.margin, ctx.in_batch, dq, dd)
        dq = _finish_grad(dq, q, rq, pq).to(q.dtype)
        dd = _finish_grad(dd, flat, rd, pd).view(docs.shape).to(docs.dtype)
        return dq, dd, None, None, None, None, None, None


class TorchEngine:
    """In-batch candidates in pure PyTorch: float32 tiles of TILE_Q queries x TILE_C candidates, in place."""

    @staticmethod
    def _tiles(batch, n):
        for i0 in range(0, batch, TILE_Q):
            for c0 in range(0, n, TILE_C):
                yield i0, min(i0 + TILE_Q, batch), c0, min(c0 + TILE_C, n)

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
        for i0, i1, c0, c1 in cls._tiles(q.shape[0], flat.shape[0]):
            z, pos = cls._logits(q, flat, rq, rd, s_pos, inv_tau, margin, group, i0, i1, c0, c1)
            lse[i0:i1] = torch.logaddexp(lse[i0:i1], torch.logsumexp(z, dim=1))
            z[pos] = float("-inf")
            neg[i0:i1] = torch.maximum(neg[i0:i1], z.amax(dim=1) / inv_tau)
        return lse, neg

    @classmethod
    def backward(cls, q, flat, rq, rd, s_pos, lse, gc, inv_tau, margin, group, dq, dd):
        """Adds the in-batch part of ``G = dL/ds``: ``dq += (G * rd) @ flat`` and ``dd += (G * rq)^T @ q``."""
        for i0, i1, c0, c1 in cls._tiles(q.shape[0], flat.shape[0]):
            grad, pos = cls._logits(q, flat, rq, rd, s_pos, inv_tau, margin, group, i0, i1, c0, c1)
            grad.sub_(lse[i0:i1, None]).exp_().mul_(-gc[i0:i1, None])  # -gc * P
            grad.index_put_(pos, gc[i0 + pos[0]], accumulate=True)  # + gc at the positive
            dd[c0:c1].addmm_(grad.T, q[i0:i1].float() * rq[i0:i1, None])
            dq[i0:i1].addmm_(grad.mul_(rd[None, c0:c1]), flat[c0:c1].float())


def _torch_backend(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin):
    return _LogP.apply(q, docs, synthetic, temperature, similarity == "cos", in_batch_negatives,
                       false_negative_margin, TorchEngine)


def _triton_backend(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin):
    from ..kernels.focal_infonce import TritonEngine

    return _LogP.apply(q.contiguous(), docs.contiguous(), synthetic, temperature, similarity == "cos",
                       in_batch_negatives, false_negative_margin, TritonEngine)


_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
register("focal_infonce", "reference", _reference.log_p_rows, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, rank=100)
register("focal_infonce", "torch", _torch_backend, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, rank=10,
         tolerances=_TOLERANCES)
register("focal_infonce", "triton", _triton_backend, devices=("cuda",), dtypes=FLOAT_DTYPES, rank=1,
         tolerances=_TOLERANCES, available=triton_unavailable)


def _cuda_backend(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin):
    from ..cuda.focal_infonce import focal_infonce_cuda

    return focal_infonce_cuda(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin)


# Not verified on hardware yet: ranked after torch, so `auto` never prefers it.
register("focal_infonce", "cuda", _cuda_backend, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), rank=60,
         tolerances=_TOLERANCES, available=cuda_unavailable)


# ----------------------------------------------------------------------------------------------------------
# Public API


def _check_number(name, value, *, low=None, low_inclusive=False, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite {'int' if integer else 'number'}, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}")


def check_options(*, temperature, gamma, similarity, num_synthetic, mix_top_k, mix_alpha, false_negative_margin,
                  reduction="mean", backend="auto"):
    """Raises ValueError/TypeError naming the first bad scalar option of ``focal_infonce``."""
    _check_number("temperature", temperature, low=0)
    _check_number("gamma", gamma, low=0, low_inclusive=True)
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be 'cos' or 'dot', got {similarity!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_number("num_synthetic", num_synthetic, low=0, low_inclusive=True, integer=True)
    if mix_top_k is not None:
        _check_number("mix_top_k", mix_top_k, low=1, low_inclusive=True, integer=True)
    _check_number("mix_alpha", mix_alpha, low=0)
    if false_negative_margin is not None:
        _check_number("false_negative_margin", false_negative_margin)
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def _check_args(q, docs, generator):
    check_tensor("q", q, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("docs", docs, ndim=3, dtypes=FLOAT_DTYPES)
    if docs.dtype != q.dtype:
        raise TypeError(f"docs must have the dtype of q ({q.dtype}), got {docs.dtype}")
    if q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q must be [B, D] with B, D >= 1, got shape {tuple(q.shape)}")
    if docs.shape[0] != q.shape[0] or docs.shape[2] != q.shape[1] or docs.shape[1] < 1:
        raise ValueError(f"docs must be [B, 1+M, D] = [{q.shape[0]}, 1+M, {q.shape[1]}] for q of shape "
                         f"{tuple(q.shape)}, got {tuple(docs.shape)}")
    check_same_device(q=q, docs=docs)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def focal_weighted(log_p: torch.Tensor, gamma: float, detach_focal_weight: bool, reduction: str) -> torch.Tensor:
    """SPEC steps 6-7: ``loss_i = -(1 - p_i) ** gamma * log p_i``, reduced; float32."""
    one_minus_p = -torch.expm1(log_p)
    # clamp: at p == 1 the weight's derivative is 0 * inf, whose limit (0) the clamp gives
    weight = one_minus_p.clamp_min(_TINY) ** gamma
    if detach_focal_weight:
        weight = weight.detach()
    loss = -weight * log_p
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def focal_infonce_with_stats(q: torch.Tensor, docs: torch.Tensor, *, temperature: float = 0.01, gamma: float = 0.5,
                             similarity: str = "cos", in_batch_negatives: bool = True, num_synthetic: int = 0,
                             mix_top_k: Optional[int] = None, mix_alpha: float = 2.0,
                             generator: Optional[torch.Generator] = None,
                             false_negative_margin: Optional[float] = None, detach_focal_weight: bool = False,
                             gather: bool = False, reduction: str = "mean",
                             backend: str = "auto") -> FocalInfoNCEOutput:
    """``focal_infonce`` plus the per-query rows ``log_p``, ``pos_sim``, ``hardest_neg_sim`` (float32 ``[B]``)."""
    check_options(temperature=temperature, gamma=gamma, similarity=similarity, num_synthetic=num_synthetic,
                  mix_top_k=mix_top_k, mix_alpha=mix_alpha, false_negative_margin=false_negative_margin,
                  reduction=reduction, backend=backend)
    _check_args(q, docs, generator)
    chosen = select("focal_infonce", backend, q.device, q.dtype)
    # scores are divided by a small temperature: never let an enclosing autocast run them in 16 bits
    with torch.autocast(q.device.type, enabled=False):
        synthetic = synthetic_negatives(q, docs, num_synthetic=num_synthetic, mix_top_k=mix_top_k,
                                        mix_alpha=mix_alpha, similarity=similarity, generator=generator)
        if gather and in_batch_negatives:
            from ..distributed import gather_local_first

            docs = gather_local_first(docs)
        margin = None if false_negative_margin is None else float(false_negative_margin)
        log_p, pos_sim, neg_sim = chosen.fn(q, docs, synthetic, float(temperature), similarity,
                                            bool(in_batch_negatives), margin)
        loss = focal_weighted(log_p, gamma, detach_focal_weight, reduction)
    return FocalInfoNCEOutput(loss, log_p, pos_sim, neg_sim)


def focal_infonce(q: torch.Tensor, docs: torch.Tensor, *, temperature: float = 0.01, gamma: float = 0.5,
                  similarity: str = "cos", in_batch_negatives: bool = True, num_synthetic: int = 0,
                  mix_top_k: Optional[int] = None, mix_alpha: float = 2.0, generator: Optional[torch.Generator] = None,
                  false_negative_margin: Optional[float] = None, detach_focal_weight: bool = False,
                  gather: bool = False, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Focal-InfoNCE of ``q [B, D]`` against ``docs [B, 1+M, D]`` (positive first, then M hard negatives).

    ``loss_i = -(1 - p_i) ** gamma * log p_i`` where ``p_i`` is the softmax probability (at ``temperature``) of
    the positive among the candidates of SPEC.md. Returns a float32 scalar (``reduction`` "mean" / "sum") or
    ``[B]`` ("none"). With ``gather=True`` every rank's docs join the candidates and "mean" is over this rank's
    queries, so that DDP's gradient averaging gives exactly the gradient of the global-batch loss.
    """
    return focal_infonce_with_stats(
        q, docs, temperature=temperature, gamma=gamma, similarity=similarity, in_batch_negatives=in_batch_negatives,
        num_synthetic=num_synthetic, mix_top_k=mix_top_k, mix_alpha=mix_alpha, generator=generator,
        false_negative_margin=false_negative_margin, detach_focal_weight=detach_focal_weight, gather=gather,
        reduction=reduction, backend=backend).loss
