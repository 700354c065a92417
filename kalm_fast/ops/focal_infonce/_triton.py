"""Backend ``triton`` of ``focal_infonce``: kernels of the in-batch pass (the attention forward's loop without V),
their launchers and the engine of ``logp.LogP``.

Scores ``s = (q_i . c_j) * rq_i * rc_j`` (inverse norms; ones for dot similarity) of a query tile against
candidate tiles, with an online log-sum-exp of ``s / temperature`` (base 2 inside), the false-negative mask
and the hardest kept negative. Backward recomputes the tiles: ``dL/ds_ij = gc_i * ([j is i's positive] - P_ij)``
and accumulates ``dq += (dL/ds * rc) @ C`` and ``dC += (dL/ds * rq)^T @ Q``; ``logp.LogP`` finishes the cosine
chain rule. fp32 accumulation for every input dtype.

The backward, by ``KALM_FOCAL_INFONCE_BWD`` (read at each backward): ``fused`` (default): a dq kernel and a dC
kernel, each recomputing every score tile once per chunk of ``BLOCK_DO`` features (8 recomputations at D = 896);
``gemm``: for each chunk of candidates, one kernel recomputes the chunk's score tiles once and writes
``G = dL/ds [B, chunk]`` in the input dtype, then two matmuls (cuBLAS on a GPU, fp32 output) add
``G @ (C * rc)`` into dq and ``G^T @ (Q * rq)`` into dC (straight into the float32 accumulators where this torch's
``addmm`` takes ``out_dtype``, else through a float32 product); ``G`` is at most ``GRAD_CHUNK_BYTES``.
fp16 products could underflow: for fp16 inputs ``gc`` is divided by its largest magnitude inside the kernels and
the float32 results multiplied back (bf16 has float32's range).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..._constants import LN2, LOG2E
from ..._cuda import LAUNCH_OPTIONS, launch_device, sms_to_fill
from ..._registry import triton_interpreting
from .logp import LogP, split_columns

_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
BACKWARD_MODES = ("fused", "gemm")
GRAD_CHUNK_BYTES = 128 * 2**20  # the score-gradient block of the ``gemm`` backward (B = 32k bf16: 2048 columns)


def backward_mode() -> str:
    """``KALM_FOCAL_INFONCE_BWD`` (``fused`` when unset), see the module docstring."""
    mode = os.environ.get("KALM_FOCAL_INFONCE_BWD", "fused")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"KALM_FOCAL_INFONCE_BWD must be one of {BACKWARD_MODES}, got {mode!r}")
    return mode


@triton.jit
def _score_tile(Q, C, rq, rc, rows, cols, row_ok, col_ok, D, stride_q, stride_c, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` float32 scaled similarities of query rows x candidate rows."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    q_ptr = Q + rows.to(tl.int64)[:, None] * stride_q
    c_ptr = C + cols.to(tl.int64)[:, None] * stride_c
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(q_ptr + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(c_ptr + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc * rq[:, None] * rc[None, :]


@triton.jit
def _keep_mask(s, rows, cols, col_ok, s_pos, margin, group, HAS_MARGIN: tl.constexpr):
    """(kept candidates, positive) masks of a score tile; query i's positive is candidate i * group."""
    is_pos = cols[None, :] == (rows * group)[:, None]
    keep = col_ok[None, :] & (rows >= 0)[:, None]
    if HAS_MARGIN:
        keep = keep & ((s <= s_pos[:, None] + margin) | is_pos)
    return keep, is_pos


@triton.jit
def _fwd_kernel(Q, C, RQ, RC, SPOS, LSE, NEG, B, N, D, group, stride_q, stride_c, cols_per_split, scale_log2,
                margin, HAS_MARGIN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (query tiles, column splits): ``LSE[split, rows]``, ``NEG[split, rows]`` over the split's candidates."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_lo = tl.program_id(1) * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, N)
    row_ok = rows < B
    rq = tl.load(RQ + rows, mask=row_ok, other=0.0)
    s_pos = tl.load(SPOS + rows, mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    neg = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_hi
        rc = tl.load(RC + cols, mask=col_ok, other=0.0)
        s = _score_tile(Q, C, rq, rc, rows, cols, row_ok, col_ok, D, stride_q, stride_c,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        keep, is_pos = _keep_mask(s, rows, cols, col_ok, s_pos, margin, group, HAS_MARGIN)
        z = tl.where(keep, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), 1)
        m_i = m_new
        neg = tl.maximum(neg, tl.max(tl.where(keep & (~is_pos), s, float("-inf")), 1))
    out = tl.program_id(1) * B + rows
    tl.store(LSE + out, (m_i + tl.log2(l_i)) * _LN2, mask=row_ok)
    tl.store(NEG + out, neg, mask=row_ok)


@triton.jit
def _grad_tile(s, keep, is_pos, lse_log2, gc, scale_log2):
    """dL/ds of a tile: ``gc_i * ([positive] - P_ij)``."""
    p = tl.where(keep, tl.exp2(s * scale_log2 - lse_log2[:, None]), 0.0)
    return gc[:, None] * (is_pos.to(tl.float32) - p)


@triton.jit
def _rows_grad_tile(Q, C, RQ, SPOS, LSE, GC, rc, rows, cols, row_ok, col_ok, D, group, stride_q, stride_c, scale_log2,
                    margin, HAS_MARGIN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(dL/ds [BLOCK_M, BLOCK_N], rq [BLOCK_M])`` of query ``rows`` x candidate ``cols``: the score tile recomputed
    with the rows' inverse norms, positives' scores, log-sum-exps and ``gc`` loaded here."""
    rq = tl.load(RQ + rows, mask=row_ok, other=0.0)
    s_pos = tl.load(SPOS + rows, mask=row_ok, other=0.0)
    lse_log2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * _LOG2E
    gc = tl.load(GC + rows, mask=row_ok, other=0.0)
    s = _score_tile(Q, C, rq, rc, rows, cols, row_ok, col_ok, D, stride_q, stride_c,
                    BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    keep, is_pos = _keep_mask(s, rows, cols, col_ok, s_pos, margin, group, HAS_MARGIN)
    return _grad_tile(s, keep, is_pos, lse_log2, gc, scale_log2), rq


@triton.jit
def _dot_scaled(g, x, r, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + g @ (x * r[:, None])``: the rows of x scaled to unit norm (cosine) before any rounding to 16 bits,
    and ``g`` (normalized by the caller to |g| <= 1), so that no product underflows fp16."""
    xs = x.to(tl.float32) * r[:, None]
    if UPCAST:
        return tl.dot(g, xs, acc, input_precision=PRECISION)
    return tl.dot(g.to(x.dtype), xs.to(x.dtype), acc, input_precision=PRECISION)


@triton.jit
def _bwd_dq_kernel(Q, C, RQ, RC, SPOS, LSE, GC, GSCALE, DQ, B, c_base, c_end, D, group, stride_q, stride_c,
                   cols_per_split, scale_log2, margin, HAS_MARGIN: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    """Grid (query tiles, feature chunks, column splits of candidates ``c_base:c_end``):
    ``DQ[split, rows, chunk] += (dL/ds * rc) @ C[split's columns, chunk]`` (``DQ`` float32 ``[splits, B, D]``)."""
    c_lo = c_base + tl.program_id(2) * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, c_end)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dcols < D
    rq = tl.load(RQ + rows, mask=row_ok, other=0.0)
    s_pos = tl.load(SPOS + rows, mask=row_ok, other=0.0)
    lse_log2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * _LOG2E
    gc = tl.load(GC + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_hi
        rc = tl.load(RC + cols, mask=col_ok, other=0.0)
        s = _score_tile(Q, C, rq, rc, rows, cols, row_ok, col_ok, D, stride_q, stride_c,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        keep, is_pos = _keep_mask(s, rows, cols, col_ok, s_pos, margin, group, HAS_MARGIN)
        g = _grad_tile(s, keep, is_pos, lse_log2, gc, scale_log2)
        v = tl.load(C + cols.to(tl.int64)[:, None] * stride_c + dcols[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot_scaled(g, v, rc, acc, UPCAST, PRECISION)
    out = DQ + (tl.program_id(2) * B + rows).to(tl.int64)[:, None] * D + dcols[None, :]
    out_ok = row_ok[:, None] & d_ok[None, :]
    tl.store(out, tl.load(out, mask=out_ok, other=0.0) + acc * tl.load(GSCALE), mask=out_ok)


@triton.jit
def _bwd_dc_kernel(Q, C, RQ, RC, SPOS, LSE, GC, GSCALE, DC, B, c_base, c_end, D, group, stride_q, stride_c,
                   stride_dc, scale_log2, margin, HAS_MARGIN: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    """Grid (tiles of candidates ``c_base:c_end``, feature chunks):
    ``DC[cols - c_base, chunk] += (dL/ds * rq)^T @ Q[:, chunk]``."""
    cols = c_base + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < c_end
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dcols < D
    rc = tl.load(RC + cols, mask=col_ok, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for r0 in range(0, B, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        g, rq = _rows_grad_tile(Q, C, RQ, SPOS, LSE, GC, rc, rows, cols, row_ok, col_ok, D, group, stride_q,
                                stride_c, scale_log2, margin, HAS_MARGIN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        u = tl.load(Q + rows.to(tl.int64)[:, None] * stride_q + dcols[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot_scaled(tl.trans(g), u, rq, acc, UPCAST, PRECISION)
    out = DC + (cols - c_base).to(tl.int64)[:, None] * stride_dc + dcols[None, :]
    out_ok = col_ok[:, None] & d_ok[None, :]
    tl.store(out, tl.load(out, mask=out_ok, other=0.0) + acc * tl.load(GSCALE), mask=out_ok)


@triton.jit
def _bwd_grad_kernel(Q, C, RQ, RC, SPOS, LSE, GC, G, B, c_hi, D, group, stride_q, stride_c, stride_g, c_lo,
                     scale_log2, margin, HAS_MARGIN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (candidate tiles of columns ``c_lo:c_hi``, query tiles): ``G[rows, cols - c_lo] = dL/ds``, in G's
    dtype."""
    cols = c_lo + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    col_ok = cols < c_hi
    rc = tl.load(RC + cols, mask=col_ok, other=0.0)
    g, _ = _rows_grad_tile(Q, C, RQ, SPOS, LSE, GC, rc, rows, cols, row_ok, col_ok, D, group, stride_q, stride_c,
                           scale_log2, margin, HAS_MARGIN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    out = G + rows.to(tl.int64)[:, None] * stride_g + (cols - c_lo)[None, :]
    tl.store(out, g.to(G.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# launch

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) a GPU may run, per kernel and input width, each compiling for
# sm_80 and sm_90 without register spills, with Triton 3.6 to 3.9 (tests/test_kernel_build.py), but for those that
# SM80_SKIPS names: at sm_80's register limit, 128 x 128 x 64 tiles spill there with some of these versions. The
# forward and the gemm backward's gradient kernel write only their outputs: they autotune among theirs (per D, margin
# and dtype). The fused backward's kernels accumulate into theirs: one config each, with BLOCK_DO. The interpreter
# runs 16 x 16 x 16 tiles.
GPU_CONFIGS = {
    ("fwd", "half"): [(128, 64, 32, 8, 2), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3)],
    ("fwd", "fp32"): [(64, 64, 16, 4, 1)],
    ("grad", "half"): [(128, 64, 64, 8, 4), (128, 64, 32, 8, 3), (128, 128, 64, 8, 3)],
    ("grad", "fp32"): [(64, 64, 16, 8, 1)],
}
SM80_SKIPS = {("fwd", "half", (128, 128, 64, 8, 3)), ("grad", "half", (128, 128, 64, 8, 3))}
FUSED_BWD_CONFIGS = {"half": (32, 32, 32, 256, 8, 1), "fp32": (32, 32, 32, 128, 8, 1)}  # + BLOCK_DO
_INTERPRET_BLOCK = 16
# the largest tile side of any config: column splits and gradient chunks are whole multiples of it
MAX_TILE = _INTERPRET_BLOCK if triton_interpreting() else 128


def _width(precision: str) -> str:
    return "fp32" if precision == "ieee" else "half"


def gpu_configs(kernel: str, width: str, major: int) -> list:
    """The configs of ``GPU_CONFIGS[kernel, width]`` that a GPU of compute capability ``major``.x runs."""
    return [c for c in GPU_CONFIGS[kernel, width] if major >= 9 or (kernel, width, c) not in SM80_SKIPS]


def _autotuned(kernel, fn):
    if triton_interpreting():
        configs = [triton.Config(dict(BLOCK_M=_INTERPRET_BLOCK, BLOCK_N=_INTERPRET_BLOCK, BLOCK_K=_INTERPRET_BLOCK))]
    else:
        configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
                   for width in ("half", "fp32") for bm, bn, bk, w, st in GPU_CONFIGS[kernel, width]]

    def prune(configs, named_args, **kwargs):
        if triton_interpreting():
            return configs
        allowed = gpu_configs(kernel, _width(kwargs["PRECISION"]), torch.cuda.get_device_capability()[0])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                       c.num_stages) in allowed]

    return triton.autotune(configs, key=["D", "HAS_MARGIN"], prune_configs_by={"early_config_prune": prune})(fn)


_fwd_tuned = _autotuned("fwd", _fwd_kernel)
_bwd_grad_tuned = _autotuned("grad", _bwd_grad_kernel)


def _flags(dtype, margin) -> dict:
    """The kernels' constexpr flags for ``dtype`` inputs (bf16 dots are upcast in the interpreter)."""
    return dict(HAS_MARGIN=margin is not None,
                UPCAST=dtype == torch.float32 or (triton_interpreting() and dtype == torch.bfloat16),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _fused_bwd_meta(dtype, margin) -> dict:
    meta = _flags(dtype, margin)
    if triton_interpreting():
        return dict(meta, BLOCK_M=_INTERPRET_BLOCK, BLOCK_N=_INTERPRET_BLOCK, BLOCK_K=_INTERPRET_BLOCK,
                    BLOCK_DO=_INTERPRET_BLOCK)
    bm, bn, bk, bdo, warps, stages = FUSED_BWD_CONFIGS[_width(meta["PRECISION"])]
    return dict(meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=bdo, num_warps=warps, num_stages=stages)


class TritonEngine:
    """The in-batch pass of ``logp.LogP`` on Triton kernels (same contract as ``_torch.TorchEngine``).

    Few queries against many candidates (small local batches with ``gather=True``) would leave most SMs idle, so
    the forward and the dq kernel also split the candidates; the splits' partial results are combined here.
    """

    @staticmethod
    def forward(q, flat, rq, rd, s_pos, inv_tau, margin, group):
        batch, n, d = q.shape[0], flat.shape[0], q.shape[1]
        cols, splits = split_columns(n, MAX_TILE, triton.cdiv(batch, MAX_TILE), sms_to_fill(q.device))
        lse = torch.empty(splits, batch, dtype=torch.float32, device=q.device)
        neg = torch.empty_like(lse)
        _fwd_tuned[lambda meta: (triton.cdiv(batch, meta["BLOCK_M"]), splits)](
            q, flat, rq, rd, s_pos, lse, neg, batch, n, d, group, q.stride(0), flat.stride(0), cols, inv_tau * LOG2E,
            0.0 if margin is None else margin, **_flags(q.dtype, margin), **LAUNCH_OPTIONS)
        return torch.logsumexp(lse, dim=0), neg.amax(dim=0)

    @staticmethod
    def backward(q, flat, rq, rd, s_pos, lse, gc, inv_tau, margin, group, dq, dd, c0=0):
        """Adds the in-batch part of ``G = dL/ds`` of candidates ``c0 .. c0 + len(dd)`` into the float32
        accumulators: ``dq += (G * rd) @ flat``, ``dd += (G * rq)^T @ q``."""
        if q.dtype == torch.float16:  # |gc| <= 1 inside the kernels (no fp16 product underflows), scaled back after
            g_scale = gc.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
            gc = gc / g_scale
        else:
            g_scale = torch.ones(1, device=q.device)
        args = (q, flat, rq, rd, s_pos, lse, gc, g_scale, inv_tau * LOG2E, margin, group, dq, dd, c0)
        if backward_mode() == "gemm":
            _backward_gemm(*args)
        else:
            _backward_fused(*args)


def _backward_fused(q, flat, rq, rd, s_pos, lse, gc, g_scale, scale_log2, margin, group, dq, dd, c0):
    batch, d = q.shape
    c1 = c0 + dd.shape[0]
    meta = _fused_bwd_meta(q.dtype, margin)
    row_tiles, chunks = triton.cdiv(batch, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DO"])
    cols, splits = split_columns(c1 - c0, meta["BLOCK_N"], row_tiles * chunks, sms_to_fill(q.device))
    # one column split adds into dq itself; several into zeroed partial sums, added up here
    part = dq[None] if splits == 1 else torch.zeros(splits, batch, d, dtype=torch.float32, device=q.device)
    args = (batch, c0, c1, d, group, q.stride(0), flat.stride(0))
    m = 0.0 if margin is None else margin
    _bwd_dq_kernel[(row_tiles, chunks, splits)](q, flat, rq, rd, s_pos, lse, gc, g_scale, part, *args, cols,
                                                scale_log2, m, **meta, **LAUNCH_OPTIONS)
    if splits > 1:
        dq += part.sum(dim=0)
    _bwd_dc_kernel[(triton.cdiv(c1 - c0, meta["BLOCK_N"]), chunks)](
        q, flat, rq, rd, s_pos, lse, gc, g_scale, dd, *args, dd.stride(0), scale_log2, m, **meta, **LAUNCH_OPTIONS)


def _backward_gemm(q, flat, rq, rd, s_pos, lse, gc, g_scale, scale_log2, margin, group, dq, dd, c0):
    batch, d = q.shape
    n = dd.shape[0]
    # G [B, chunk] and the [chunk, D] float32 temporaries stay within GRAD_CHUNK_BYTES (at least one tile)
    chunk = GRAD_CHUNK_BYTES // max(batch * q.element_size(), d * 4)
    chunk = min(n, max(MAX_TILE, chunk // MAX_TILE * MAX_TILE))
    grad = torch.empty(batch, chunk, dtype=q.dtype, device=q.device)
    q_unit = _scale_rows(q, rq)
    flags = _flags(q.dtype, margin)
    for g0 in range(c0, c0 + n, chunk):
        g1 = min(g0 + chunk, c0 + n)
        g = grad[:, :g1 - g0]
        _bwd_grad_tuned[lambda meta: (triton.cdiv(g1 - g0, meta["BLOCK_N"]), triton.cdiv(batch, meta["BLOCK_M"]))](
            q, flat, rq, rd, s_pos, lse, gc, g, batch, g1, d, group, q.stride(0), flat.stride(0), g.stride(0), g0,
            scale_log2, 0.0 if margin is None else margin, **flags, **LAUNCH_OPTIONS)
        _add_matmul(dq, g, _scale_rows(flat[g0:g1], rd[g0:g1]), g_scale)
        _add_matmul(dd[g0 - c0:g1 - c0], g.T, q_unit, g_scale)


def _add_matmul(acc, a, b, g_scale):
    """``acc += (a @ b) * g_scale`` into float32 ``acc``: bf16 products (``g_scale`` is one) straight into it on a GPU
    whose torch's ``addmm`` can, else through a float32 product (``_matmul_fp32``)."""
    if a.dtype == torch.bfloat16 and a.is_cuda and _addmm_into_float32(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += _matmul_fp32(a, b).mul_(g_scale)


@functools.cache
def _addmm_into_float32(device) -> bool:
    """Whether this torch's cuBLAS ``addmm`` adds bf16 products into a float32 tensor (``out_dtype=float32`` with a
    float32 ``self``; older versions want ``self`` in the inputs' dtype), tried once per device on a tiny case."""
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    acc = torch.ones(16, 16, device=device)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool((acc == 17).all())


def _scale_rows(x, r):
    """``x * r[:, None]`` computed in float32, in x's dtype (rows of unit norm for cosine similarity)."""
    return (x.float() * r[:, None]).to(x.dtype)


def _matmul_fp32(a, b):
    """``a @ b`` with a float32 result: fp16/bf16 operands accumulate in fp32 and are not rounded on a GPU (cuBLAS
    with ``out_dtype``); elsewhere they are upcast first. fp32 follows ``torch.set_float32_matmul_precision``."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def focal_infonce_triton(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin):
    """The backend contract of ``kalm_fast.ops.focal_infonce``; launches on ``q``'s device."""
    with launch_device(q):
        return LogP.apply(q.contiguous(), docs.contiguous(), synthetic, temperature, similarity == "cos",
                          in_batch_negatives, false_negative_margin, TritonEngine)
