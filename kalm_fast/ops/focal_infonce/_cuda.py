"""Backend ``cuda`` of ``focal_infonce`` (csrc/focal_infonce.cu): the in-batch engine of ``logp.LogP``.

``focal_infonce_cuda(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin)``
follows the backend contract of ``kalm_fast.ops.focal_infonce`` and returns
``(log_p, pos_sim, hardest_neg_sim)``. The shared ``LogP`` autograd Function does the cheap per-query work
(norms, positives, synthetic and own-group candidates) in PyTorch; ``CudaEngine`` runs the in-batch
score tiles (forward: log-sum-exp and hardest negative; backward: recomputed scores, dq and dd) on tensor
cores. fp16/bf16 inputs with an embedding dim that is a multiple of 8.
"""
from __future__ import annotations

import torch

from ... import _native
from ..._constants import LOG2E, NORM_EPS
from ..._cuda import aligned, cdiv, dtype_code, launch_device, pack, sm_count, stream_of
from .logp import LogP, split_columns

TILE = 64       # rows and columns per block tile
CHUNK = 64      # features per k-step / backward output chunk
THREADS = 128
DTYPES = (torch.float16, torch.bfloat16)
_TINY = torch.finfo(torch.float32).tiny


def forward_plan(*, n_rows: int, n_cols: int, sms: int) -> dict:
    row_tiles = cdiv(n_rows, TILE)
    cols_per_split, splits = split_columns(n_cols, TILE, row_tiles, sms)
    return dict(grid=(row_tiles, splits), cols_per_split=cols_per_split, col_splits=splits)


def backward_plan(*, n_rows: int, n_cols: int, dim: int, sms: int) -> dict:
    row_tiles, chunks = cdiv(n_rows, TILE), cdiv(dim, CHUNK)
    cols_per_split, splits = split_columns(n_cols, TILE, row_tiles * chunks, sms)
    return dict(grid=(row_tiles, chunks, splits), cols_per_split=cols_per_split, col_splits=splits)


def engine_args(rows, cols, r_row, r_col, s_pos, group, inv_tau, margin, *, stream: int, **extra):
    """The InfoNCEArgs shared by the forward and both backward launches (rows/cols contiguous [n, dim])."""
    return pack("InfoNCEArgs", dtype=dtype_code(rows.dtype, DTYPES), rows=rows.data_ptr(), cols=cols.data_ptr(),
                n_rows=rows.shape[0], n_cols=cols.shape[0], dim=rows.shape[1], row_stride=rows.stride(0),
                col_stride=cols.stride(0), r_row=r_row.data_ptr(), r_col=r_col.data_ptr(), s_pos=s_pos.data_ptr(),
                group=group, inv_tau_log2=inv_tau * LOG2E, has_margin=int(margin is not None),
                margin=0.0 if margin is None else margin, device=rows.device.index or 0, stream=stream, **extra)


class CudaEngine:
    """The in-batch pass of ``LogP`` on csrc/focal_infonce.cu (same contract as ``_torch.TorchEngine``)."""

    @staticmethod
    def forward(q, flat, rq, rd, s_pos, inv_tau, margin, group):
        """``(lse, hardest_neg)`` float32 ``[B]`` over every row of ``flat [N, D]``."""
        p = forward_plan(n_rows=q.shape[0], n_cols=flat.shape[0], sms=sm_count(q.device.index or 0))
        lse_part = torch.empty(p["col_splits"], q.shape[0], dtype=torch.float32, device=q.device)
        neg_part = torch.empty_like(lse_part)
        _native.cuda_lib().infonce_fwd(engine_args(
            q, flat, rq, rd, s_pos, group, inv_tau, margin, stream=stream_of(q.device),
            cols_per_split=p["cols_per_split"], col_splits=p["col_splits"], lse_part=lse_part.data_ptr(),
            neg_part=neg_part.data_ptr()))
        return torch.logsumexp(lse_part, dim=0), neg_part.amax(dim=0)

    @staticmethod
    def backward(q, flat, rq, rd, s_pos, lse, gc, inv_tau, margin, group, dq, dd, c0=0):
        """Adds the in-batch part of ``G = dL/ds`` of candidates ``c0 .. c0 + len(dd)`` into the float32
        accumulators: ``dq += (G * rd) @ flat``, ``dd += (G * rq)^T @ q``."""
        lib, stream, sms = _native.cuda_lib(), stream_of(q.device), sm_count(q.device.index or 0)
        docs, r_docs = flat[c0:c0 + dd.shape[0]], rd[c0:c0 + dd.shape[0]]
        if q.shape[0] == 0 or docs.shape[0] == 0:
            return
        # the kernel rounds each score gradient G * r_col to the tile dtype: divided by their largest possible
        # magnitude, they stay in [-1, 1] (no fp16 underflow at tiny dL/dlog p or large norms), scaled back after
        gc_max = gc.abs().amax().clamp_min(_TINY)
        lse, gc = lse.contiguous(), (gc / gc_max).contiguous()
        for rows, cols, r_row, r_col, out, transposed in ((q, docs, rq, r_docs, dq, 0), (docs, q, r_docs, rq, dd, 1)):
            # over real rows: a zero vector's 1 / NORM_EPS would push every other factor to 0 (the kernel caps its
            # own at 1, harmless: it multiplies zeros)
            r_max = r_col.masked_fill(r_col >= 1.0 / NORM_EPS, 0.0).amax().clamp_min(_TINY)
            g_scale = torch.stack([1.0 / r_max, gc_max * r_max]).float().contiguous()
            p = backward_plan(n_rows=rows.shape[0], n_cols=cols.shape[0], dim=rows.shape[1], sms=sms)
            lib.infonce_bwd(engine_args(
                rows, cols, r_row, r_col, s_pos, group, inv_tau, margin, stream=stream, lse=lse.data_ptr(),
                gc=gc.data_ptr(), g_scale=g_scale.data_ptr(), cols_per_split=p["cols_per_split"],
                col_splits=p["col_splits"], out=out.data_ptr(), out_stride=out.stride(0), transposed=transposed,
                doc_offset=c0))


def focal_infonce_cuda(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin):
    """Backend "cuda" of focal_infonce: ``(log_p, pos_sim, hardest_neg_sim)``, float32 ``[B]`` each (dtype and device
    were checked by the op)."""
    if q.shape[-1] % 8:
        raise ValueError(f"backend 'cuda' of focal_infonce needs the embedding dim D to be a multiple of 8 "
                         f"(16-byte rows), got q of shape {tuple(q.shape)}; use backend='triton'")
    q, docs = aligned(q.contiguous()), aligned(docs.contiguous())
    with launch_device(q):
        return LogP.apply(q, docs, synthetic, temperature, similarity == "cos", in_batch_negatives,
                          false_negative_margin, CudaEngine)
