"""The core every memory-efficient backend of ``focal_infonce`` shares: ``LogP``, the autograd Function of
``log p_i``, and the per-query passes (positives, own candidates, synthetic negatives) that need no tiling.

A backend supplies an *engine* for the in-batch pass (every query against every document of the batch), with
``forward(q, flat, rq, rd, s_pos, inv_tau, margin, group) -> (lse, hardest_neg)`` and
``backward(q, flat, rq, rd, s_pos, lse, gc, inv_tau, margin, group, dq, dd, c0=0)``, which adds the part of
candidates ``c0 .. c0 + len(dd)`` into the float32 accumulators ``dq [B, D]`` and ``dd [len(dd), D]``; see
``_torch.TorchEngine``. Their ``s_pos`` is what the margin is added to, ``reference.margin_bound`` of the positives'
scores (those widened by a rounding slack): a candidate is dropped when ``s > s_pos + margin``. ``LogP`` calls the
backward once per chunk of candidates (``candidate_chunk``) and turns each chunk's ``dd`` into the documents'
gradient at once: no float32 copy of all the documents is ever held (norms and positives' scores are also computed
in blocks of rows). For cosine similarity the scores are dot products scaled by stored inverse norms, not dot
products of normalized copies.
"""
from __future__ import annotations

import torch

from ..._constants import NORM_EPS
from ..._cuda import launch_device
from .reference import margin_bound

TILE_Q = 512  # tile of the torch passes: query rows x candidate rows
TILE_C = 2048
PROGRAMS_PER_SM = 4  # what the GPU engines' column split aims for
# the backward's float32 block of document gradients: about 1/CANDIDATE_CHUNKS of the candidates, at least
# MIN_CHUNK_BYTES (fewer, larger launches) unless that is all of them, in whole multiples of CHUNK_ALIGN rows (the
# largest tile side of any engine)
CANDIDATE_CHUNKS = 16
MIN_CHUNK_BYTES = 16 * 2**20
CHUNK_ALIGN = 128


def split_columns(n_cols: int, tile: int, other_programs: int, sms: int) -> tuple[int, int]:
    """``(cols_per_split, splits)``: the GPU engines split the candidate columns, in whole tiles, until their grid has
    about ``PROGRAMS_PER_SM * sms`` programs (``other_programs`` per split), so that few queries against many
    candidates (small local batches with ``gather=True``) still fill the GPU."""
    tiles = max(1, -(-n_cols // tile))
    splits = max(1, min(tiles, PROGRAMS_PER_SM * sms // max(other_programs, 1)))
    cols_per_split = -(-tiles // splits) * tile
    return cols_per_split, max(1, -(-n_cols // cols_per_split))


def candidate_chunk(n_cols: int, dim: int) -> int:
    """Candidates per backward chunk of ``n_cols`` candidates of ``dim`` features (see ``CANDIDATE_CHUNKS``)."""
    rows = max(-(-n_cols // CANDIDATE_CHUNKS), MIN_CHUNK_BYTES // (4 * dim))
    return max(CHUNK_ALIGN, -(-rows // CHUNK_ALIGN) * CHUNK_ALIGN)


def _row_blocks(x: torch.Tensor):
    """``(r0, r1)`` blocks of ``candidate_chunk`` rows of ``x [rows, D]``: float32 copies made one block at a time
    stay within the backward's chunk budget."""
    rows = candidate_chunk(x.shape[0], x.shape[1])
    return [(r0, min(r0 + rows, x.shape[0])) for r0 in range(0, x.shape[0], rows)]


def inverse_norms(x: torch.Tensor, cos: bool):
    """``(1 / max(|x_r|, eps), |x_r| > eps)`` as float32 ``[rows]`` (ones / zeros for dot similarity)."""
    if not cos:
        ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        return ones, torch.zeros_like(ones)
    norm = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for r0, r1 in _row_blocks(x):
        torch.linalg.vector_norm(x[r0:r1], dim=-1, dtype=torch.float32, out=norm[r0:r1])
    return 1.0 / norm.clamp_min(NORM_EPS), (norm > NORM_EPS).float()


def _positive_scores(q, flat, rq, rd, group):
    """``s(q_i, flat[i * group])`` float32 ``[B]``: each query's score with its positive."""
    dots = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for r0, r1 in _row_blocks(q):
        dots[r0:r1] = torch.linalg.vecdot(q[r0:r1].float(), flat[r0 * group:r1 * group:group].float())
    return dots * rq * rd[:q.shape[0] * group:group]


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
    """Adds the local candidates' part of dL/ds into the accumulators (see ``LogP.backward``); ``dd`` (all the
    candidates) is only written when not in-batch."""
    if in_batch and synthetic is None:
        return
    group = docs.shape[1]
    for i0 in range(0, q.shape[0], TILE_Q):
        i1 = min(i0 + TILE_Q, q.shape[0])
        s = _local_scores(q, docs, synthetic, rq, rd, rs, i0, i1, in_batch)
        keep, is_pos = _local_keep(s, s_pos[i0:i1], margin, in_batch)
        # dropped candidates' exponents masked first: exp(z - lse) of one far above the positive overflows (inf * 0)
        p = torch.exp((s * inv_tau - lse[i0:i1, None]).masked_fill(~keep, float("-inf")))
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


class LogP(torch.autograd.Function):
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
        s_pos = _positive_scores(q, flat, rq, rd, group)
        bound = margin_bound(s_pos)  # what the margin is added to
        lse, neg = _local_forward(q, docs, synthetic, rq, rd, rs, bound, inv_tau, margin, in_batch)
        if in_batch:
            lse_b, neg_b = engine.forward(q, flat, rq, rd, bound, inv_tau, margin, group)
            lse, neg = torch.logaddexp(lse, lse_b), torch.maximum(neg, neg_b)
        ctx.save_for_backward(q, docs, synthetic, rq, pq, rd, pd, rs, bound, lse)
        ctx.inv_tau, ctx.in_batch, ctx.margin, ctx.engine = inv_tau, in_batch, margin, engine
        ctx.mark_non_differentiable(s_pos, neg)
        # at most 0 (lse holds the positive's own term; the two are rounded apart): p <= 1 whatever the rounding
        return (s_pos * inv_tau - lse).clamp_max_(0.0), s_pos, neg

    @staticmethod
    def backward(ctx, dlog_p, _dpos, _dneg):
        q, docs, synthetic, rq, pq, rd, pd, rs, bound, lse = ctx.saved_tensors
        flat = docs.reshape(-1, docs.shape[-1])
        # dL/ds_ic = gc_i * ([c is the positive] - P_ic), with gc_i = dL/dlog p_i / temperature. Accumulate
        # sum_c dL/ds_ic * r_c * c (and the transpose for the docs), then finish with the inverse norms.
        gc = dlog_p.float() * ctx.inv_tau
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        local = (q, docs, synthetic, rq, rd, rs, bound, lse, gc, ctx.inv_tau, ctx.margin, ctx.in_batch, dq)
        if ctx.in_batch:
            _local_backward(*local, None)  # the synthetic negatives' part of dq
            dd = _in_batch_backward(ctx.engine, q, flat, rq, rd, pd, bound, lse, gc, ctx.inv_tau, ctx.margin,
                                    docs.shape[1], dq)
        else:  # own candidates only: one float32 block of all the documents (group x the size of dq)
            acc = torch.zeros(flat.shape, dtype=torch.float32, device=q.device)
            _local_backward(*local, acc)
            dd = _finish_grad(acc, flat, rd, pd).to(docs.dtype)
        dq = _finish_grad(dq, q, rq, pq).to(q.dtype)
        return dq, dd.view(docs.shape), None, None, None, None, None, None


def _in_batch_backward(engine, q, flat, rq, rd, pd, s_pos, lse, gc, inv_tau, margin, group, dq):
    """The documents' gradient ``[N, D]`` in their dtype (and the in-batch part of ``dq``), ``candidate_chunk``
    documents at a time: float32 documents accumulate in place, others in one reused float32 chunk, cast as each is
    finished."""
    n, dim = flat.shape
    dd = torch.empty(flat.shape, dtype=flat.dtype, device=q.device)
    rows = candidate_chunk(n, dim)
    chunk = None
    if dd.dtype != torch.float32:
        chunk = torch.empty((min(rows, n), dim), dtype=torch.float32, device=q.device)
    for c0 in range(0, n, rows):
        c1 = min(c0 + rows, n)
        acc = (dd[c0:c1] if chunk is None else chunk[:c1 - c0]).zero_()
        with launch_device(q):  # backward may run on another thread, whose current device is not q's
            engine.backward(q, flat, rq, rd, s_pos, lse, gc, inv_tau, margin, group, dq, acc, c0)
        _finish_grad(acc, flat[c0:c1], rd[c0:c1], pd[c0:c1])
        if chunk is not None:
            dd[c0:c1] = acc
    return dd
