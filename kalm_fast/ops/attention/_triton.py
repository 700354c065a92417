"""Backend ``triton`` of ``flash_attention``: fused kernels over packed (varlen) sequences, forward and a backward in
three kernels, their launchers and the autograd Function.

Layout: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, ``cu_seqlens`` int32 ``[N+1]``; query head ``h`` reads K/V head
``h // GROUP``. The GROUP query heads sharing a K/V head are folded into the query rows: row ``r`` of a sequence
is token ``r // GROUP`` of head ``kv_head * GROUP + r % GROUP``, so one tile serves the whole group and short
sequences (20-60 tokens, the usual embedding input) still fill a 64/128-row tile. Every program handles one tile
of one KV head of one sequence: the grid is (work items, KV heads), and a host-built work list (``tile_work``)
names the (sequence, tile) of each item, the longest sequences first, so that a packed batch of short texts with a
few long ones launches no empty programs and its longest tiles start first. With ``KALM_ATTENTION_TMA=1``
(fp16/bf16, sm_90+) the forward and the dQ kernel load K/V tiles through tensor descriptors bounded by each sequence
(``use_tma``).
Scores are kept in base 2 (``qk_scale = softmax_scale * log2(e)``); the saved log-sum-exp ``lse [Hq, T]`` is fp32
in natural units. With SOFTCAP (Gemma 2's soft-capped logits) a score is ``cap_scale * tanh(qk_scale * q.k)``, with
``qk_scale = softmax_scale / softcap`` and ``cap_scale = softcap * log2(e)``; the backward multiplies dS by the
derivative ``1 - tanh^2``.

Backward: ``delta = rowsum(dO * O)``; one program per (key tile, KV head) accumulates dK/dV over the
folded rows of its whole group (no atomics). dQ, by ``KALM_ATTENTION_DQ`` (read at each backward):
``separate`` (default): one more program per folded query tile, which recomputes the scores and dP (7 GEMMs per
tile pair in all, deterministic); ``atomic``: the dK/dV programs also add each tile pair's ``dS K`` into an fp32
dQ buffer with atomic adds (5 GEMMs, Q/dO and K/V read once; the order of the adds, hence the last bits, varies).
Causal attention and local windows (``window=(left, right)``) are one band, ``tok - left <= key <= tok + right``
(causal: right 0), passed as two ints with BANDED on (no band: BANDED off, nothing masked but the sequence end).
Tiles entirely outside the band are skipped; forward and dQ mask only the tiles that cross its edges or the sequence
end, dK/dV every tile under BANDED.
``seqlen_bucket`` (max_seqlen rounded up to a power of two) is only an autotuning key. Offsets are int32: tensors
stay below 2**31 elements (checked here). No other argument checking (see ``kalm_fast.ops.attention``).
Not used: Triton 3.6's automatic warp specialization (``tl.range(..., warp_specialize=True)`` on the key loop)
leaves the 8-warp sm_90 forward configs unchanged and fails the 4-warp one in its NVGPUWarpSpecialization pass
(compiled ahead of time, 2026-12-06).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from ..._constants import LOG2E
from ..._cuda import LAUNCH_OPTIONS, launch_device, to_device
from ..._registry import triton_interpreting
from .padding import padded_via_packed

_LOG2E = tl.constexpr(LOG2E)
TILE_HEIGHTS = (16, 32, 64, 128)  # every BLOCK_M of fwd/dq and BLOCK_N of dkdv in the config tables
DQ_MODES = ("separate", "atomic")


def use_tma(k, v) -> bool:
    """Whether the forward and dQ kernels load K/V tiles through tensor descriptors (Hopper's copy engine, TMA):
    ``KALM_ATTENTION_TMA=1``, fp16/bf16 (fp32 tiles spill), on a GPU of compute capability 9+ (or in the
    interpreter, for the tests), with 16-byte aligned rows and heads. The descriptors are made on the device, which
    needs a Triton allocator: one is set (torch's caching allocator) if none was."""
    if os.environ.get("KALM_ATTENTION_TMA", "0") not in ("0", "1"):
        raise ValueError(f"KALM_ATTENTION_TMA must be 0 or 1, got {os.environ['KALM_ATTENTION_TMA']!r}")
    if os.environ.get("KALM_ATTENTION_TMA") != "1" or k.dtype == torch.float32 or any(
            t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16 or (t.stride(1) * t.element_size()) % 16
            for t in (k, v)):
        return False
    if triton_interpreting():
        return True
    if k.device.type != "cuda" or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    return True


def dq_mode() -> str:
    """How the backward computes dQ: ``KALM_ATTENTION_DQ`` (``separate`` when unset), see the module docstring."""
    mode = os.environ.get("KALM_ATTENTION_DQ", "separate")
    if mode not in DQ_MODES:
        raise ValueError(f"KALM_ATTENTION_DQ must be one of {DQ_MODES}, got {mode!r}")
    return mode


# ----------------------------------------------------------------------------------------------------------------
# the work list


def tile_work(varlen, rows_per_token: int, device) -> tuple:
    """``(work int32 tensor on device, {tile height: number of items})``: the (sequence, tile) items of a launch
    whose sequences have ``length * rows_per_token`` rows, for every height in TILE_HEIGHTS (the autotuner picks one
    per launch). Layout: ``work[i]`` (i < 4) is where the items of ``TILE_HEIGHTS[i]`` begin, then ``work[4 + 2j]``,
    ``work[5 + 2j]`` are the sequence and tile index of item j; the longest sequences come first. Built on the host
    once per ``Varlen`` (one upload, from pinned memory on CUDA) and shared by every layer that reuses the batch."""
    device = torch.device(device)
    return varlen.derived(("triton_attention_tiles", rows_per_token, device),
                          lambda: _build_tile_work(varlen.lengths, rows_per_token, device))


def _build_tile_work(lengths, rows_per_token, device):
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")  # longest first
    starts, items, counts = [], [], {}
    for height in TILE_HEIGHTS:
        tiles = -(-lens[order] * rows_per_token // height)  # ceil
        seq = np.repeat(order, tiles)
        tile = np.arange(seq.size) - np.repeat(np.cumsum(tiles) - tiles, tiles)
        starts.append(sum(counts.values()))
        counts[height] = seq.size
        items.append(np.stack([seq, tile], 1).ravel())
    work = np.concatenate([np.asarray(starts, dtype=np.int64)] + items)
    if work.max(initial=0) >= 2 ** 31:
        raise ValueError(f"the batch needs {counts[TILE_HEIGHTS[0]]} attention tiles; the triton backend indexes "
                         "them with int32: split the batch")
    return to_device(torch.from_numpy(work.astype(np.int32)), device), counts


@triton.jit
def _work_item(WORK, HEIGHT: tl.constexpr, RELOAD: tl.constexpr = False):
    """(sequence, first row) of this program's item in the work list of tiles of HEIGHT rows (see tile_work).
    RELOAD: volatile loads, which the compiler keeps apart from earlier loads of the same entries: reading the item
    again after the main loop frees the registers that holding it through the loop would take."""
    if HEIGHT == 16:
        slot = 0
    elif HEIGHT == 32:
        slot = 1
    elif HEIGHT == 64:
        slot = 2
    else:
        tl.static_assert(HEIGHT == 128, "tile heights are 16, 32, 64, 128 (TILE_HEIGHTS)")
        slot = 3
    item = tl.load(WORK + slot, volatile=RELOAD) + tl.program_id(0)
    return tl.load(WORK + 4 + 2 * item, volatile=RELOAD), tl.load(WORK + 5 + 2 * item, volatile=RELOAD) * HEIGHT


# ----------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, lo, hi, tok, seqlen, window_left, window_right,
               qk_scale, cap_scale, offs_n, offs_d, d_ok, BANDED: tl.constexpr, SOFTCAP: tl.constexpr,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax of one query tile (``tok``: token of each row) over key tiles [lo, hi); MASKED tiles may
    cross the sequence end or the band's edges. K/V come from ``k_src``/``v_src``: the sequence's first
    row (pointers) or, with USE_TMA, tensor descriptors of its ``[seqlen, HEAD_DIM]`` rows."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_ok = d_ok[None, :]
        if MASKED:
            kv_ok = kv_ok & (cols < seqlen)[:, None]
        if USE_TMA:
            k_t = tl.trans(k_src.load([n0, 0]))
        else:
            k_t = tl.load(k_src + cols[None, :] * stride_kt + offs_d[:, None], mask=tl.trans(kv_ok), other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            s = _tanh(s) * cap_scale
        if MASKED:
            s = tl.where(_visible(tok[:, None], cols[None, :], seqlen, window_left, window_right, BANDED), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_src.load([n0, 0])
        else:
            v = tl.load(v_src + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _tanh(x):
    """tanh in fp32 (Triton has none of its own): its Taylor series near 0, where ``1 - 2 / (e^2x + 1)`` would lose
    the digits a large softcap multiplies, that form elsewhere (+-1 far from 0); NaN where ``x`` is not finite (a
    query row holding NaN or an infinity gives NaN, as without a cap)."""
    x2 = x * x
    t = tl.where(x2 < 0.01, x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0)))),
                 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2E)) + 1.0))
    return tl.where(tl.abs(x) < float("inf"), t, float("nan"))


@triton.jit
def _visible(tok, cols, seqlen, window_left, window_right, BANDED: tl.constexpr):
    """Whether key ``cols`` of the sequence is visible from token ``tok`` (broadcast): inside the sequence and,
    under BANDED, ``tok - window_left <= cols <= tok + window_right``."""
    ok = cols < seqlen
    if BANDED:
        ok = ok & (cols >= tok - window_left) & (cols <= tok + window_right)
    return ok


@triton.jit
def _key_range(m0, seqlen, window_left, window_right, GROUP: tl.constexpr, BANDED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of the query tile starting at folded row ``m0`` (tokens ``t0 .. t1``): ``[lo, full_lo)`` and
    ``[full_hi, hi)`` need a mask, ``[full_lo, full_hi)`` do not; the tiles outside ``[lo, hi)`` lie outside the band
    for every row and are skipped. Without BANDED: ``lo = full_lo = 0``, ``hi = seqlen``."""
    if BANDED:
        t0 = m0 // GROUP
        t1 = tl.minimum((m0 + BLOCK_M - 1) // GROUP, seqlen - 1)
        lo = tl.maximum(t0 - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(seqlen, t1 + window_right + 1)
        full_lo = tl.minimum(tl.cdiv(tl.maximum(t1 - window_left, 0), BLOCK_N) * BLOCK_N, hi)
        full_hi = tl.maximum(tl.minimum(seqlen, t0 + window_right + 1) // BLOCK_N * BLOCK_N, full_lo)
    else:
        lo = 0
        full_lo = 0
        hi = seqlen
        full_hi = seqlen // BLOCK_N * BLOCK_N
    return lo, full_lo, full_hi, hi


@triton.jit
def _kv_sources(K, V, start, seqlen, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM: tl.constexpr,
                USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where a program's key tiles come from: pointers to the sequence's first K/V row of ``kv_head`` or, with
    USE_TMA (Hopper's copy engine), tensor descriptors of its ``[seqlen, HEAD_DIM]`` rows, which load rows past the
    sequence and columns past HEAD_DIM as zeros."""
    k_src = K + start * stride_kt + kv_head * stride_kh
    v_src = V + start * stride_vt + kv_head * stride_vh
    if USE_TMA:
        k_src = tl.make_tensor_descriptor(k_src, shape=[seqlen, HEAD_DIM], strides=[stride_kt, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_src, shape=[seqlen, HEAD_DIM], strides=[stride_vt, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
    return k_src, v_src


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, WORK, CU_SEQLENS, qk_scale, cap_scale, window_left, window_right, seqlen_bucket,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BANDED: tl.constexpr,
              SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """O, LSE for the folded query tile of work item program_id(0), KV head program_id(1)."""
    seq, m0 = _work_item(WORK, BLOCK_M)
    kv_head = tl.program_id(1)
    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    r = m0 + tl.arange(0, BLOCK_M)
    tok = r // GROUP                                  # folded row r: token r // GROUP, head kv_head*GROUP + r%GROUP
    head = kv_head * GROUP + r % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ld = (r < seqlen * GROUP)[:, None] & d_ok[None, :]
    q = tl.load(Q + ((start + tok) * stride_qt + head * stride_qh)[:, None] + offs_d[None, :], mask=ld, other=0.0)
    k_src, v_src = _kv_sources(K, V, start, seqlen, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM,
                               USE_TMA, BLOCK_N, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m0, seqlen, window_left, window_right, GROUP, BANDED, BLOCK_M, BLOCK_N)
    if BANDED:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, lo, full_lo, tok, seqlen,
                                   window_left, window_right, qk_scale, cap_scale, offs_n, offs_d, d_ok, BANDED,
                                   SOFTCAP, True, BLOCK_N, PRECISION, USE_TMA)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, full_lo, full_hi, tok, seqlen,
                               window_left, window_right, qk_scale, cap_scale, offs_n, offs_d, d_ok, BANDED, SOFTCAP,
                               False, BLOCK_N, PRECISION, USE_TMA)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, full_hi, hi, tok, seqlen,
                               window_left, window_right, qk_scale, cap_scale, offs_n, offs_d, d_ok, BANDED, SOFTCAP,
                               True, BLOCK_N, PRECISION, USE_TMA)
    # every score of the row -inf (every stored row sees a key: its query holds an infinity): softmax's 0/0, NaN
    empty = l_i == 0.0
    out = tl.where(empty[:, None], float("nan"), acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("nan"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / _LOG2E)
    seq, m0 = _work_item(WORK, BLOCK_M, RELOAD=True)  # read again, not kept live through the loop (registers)
    r = m0 + tl.arange(0, BLOCK_M)
    tok = r // GROUP
    head = kv_head * GROUP + r % GROUP
    tl.store(O + ((start + tok) * stride_ot + head * stride_oh)[:, None] + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=(r < seqlen * GROUP)[:, None] & d_ok[None, :])
    tl.store(LSE + head * stride_lh + start + tok, lse, mask=r < seqlen * GROUP)


# ----------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_delta(O, DO, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """DELTA[h, t] = sum_d O[t, h, d] * dO[t, h, d] in fp32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + head * stride_dh + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < T)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, start, kv_head, stride_qt, stride_qh, stride_dot, stride_doh,
                stride_lh, stride_dqt, stride_dqh, lo, hi, cols, window_left, window_right, qk_scale, cap_scale, offs_m,
                offs_d, d_ok, GROUP: tl.constexpr, BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over the folded query rows [lo, hi) of its head group (row r: token
    r // GROUP, head kv_head * GROUP + r % GROUP); with ATOMIC_DQ also add each row tile's ``dS K`` to DQ_ACC.
    Rows past ``hi`` (the sequence end or the band's) load lse = +inf: probability 0; keys past the sequence are
    zero rows of ``k``: no dQ share."""
    for m0 in range(lo, hi, BLOCK_M):
        r = m0 + offs_m
        tok = r // GROUP
        head = kv_head * GROUP + r % GROUP
        row_ok = r < hi
        ld = row_ok[:, None] & d_ok[None, :]
        q_off = (start + tok) * stride_qt + head * stride_qh
        q_t = tl.load(Q + q_off[None, :] + offs_d[:, None], mask=tl.trans(ld), other=0.0)
        lse = tl.load(LSE + head * stride_lh + start + tok, mask=row_ok, other=float("inf")) * _LOG2E
        s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        if SOFTCAP:
            t_t = _tanh(s_t)
            s_t = t_t * cap_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if BANDED:
            in_band = (cols[:, None] >= tok[None, :] - window_left) & (cols[:, None] <= tok[None, :] + window_right)
            p_t = tl.where(in_band, p_t, 0.0)
        do = tl.load(DO + ((start + tok) * stride_dot + head * stride_doh)[:, None] + offs_d[None, :], mask=ld,
                     other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(DELTA + head * stride_lh + start + tok, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION)  # [BLOCK_M, BLOCK_D]
            tl.atomic_add(DQ_ACC + ((start + tok) * stride_dqt + head * stride_dqh)[:, None] + offs_d[None, :], dq,
                          mask=ld, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, WORK, CU_SEQLENS, qk_scale, cap_scale, sm_scale,
                   window_left, window_right, seqlen_bucket,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BANDED: tl.constexpr,
                   SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """dK, dV of the key tile of work item program_id(0), KV head program_id(1), summed over the group; with
    ATOMIC_DQ also its share of dQ (unscaled, fp32) added into DQ_ACC."""
    seq, n0 = _work_item(WORK, BLOCK_N)
    kv_head = tl.program_id(1)
    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ld = (cols < seqlen)[:, None] & d_ok[None, :]
    k = tl.load(K + (start + cols)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=ld, other=0.0)
    v = tl.load(V + (start + cols)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=ld, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    hi = seqlen * GROUP
    if BANDED:  # only tokens in [n0 - window_right, last key + window_left] see these keys
        lo = tl.maximum(n0 - window_right, 0) * GROUP // BLOCK_M * BLOCK_M
        hi = tl.minimum(seqlen, tl.minimum(n0 + BLOCK_N, seqlen) + window_left) * GROUP
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, start, kv_head, stride_qt, stride_qh, stride_dot,
                         stride_doh, stride_lh, stride_dqt, stride_dqh, lo, hi, cols, window_left, window_right,
                         qk_scale, cap_scale, offs_m, offs_d, d_ok, GROUP, BANDED, SOFTCAP, ATOMIC_DQ, BLOCK_M,
                         PRECISION)
    tl.store(DK + (start + cols)[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=ld)
    tl.store(DV + (start + cols)[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=ld)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt, lo, hi, tok, seqlen, window_left,
              window_right, qk_scale, cap_scale, offs_n, offs_d, d_ok, BANDED: tl.constexpr, SOFTCAP: tl.constexpr,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dQ of one query tile (``tok``: token of each row) over key tiles [lo, hi); MASKED tiles may cross
    the sequence end or the band's edges. K/V from ``_kv_sources``."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_ok = d_ok[None, :]
        if MASKED:
            kv_ok = kv_ok & (cols < seqlen)[:, None]
        if USE_TMA:
            k_t = tl.trans(k_src.load([n0, 0]))
            v_t = tl.trans(v_src.load([n0, 0]))
        else:
            k_t = tl.load(k_src + cols[None, :] * stride_kt + offs_d[:, None], mask=tl.trans(kv_ok), other=0.0)
            v_t = tl.load(v_src + cols[None, :] * stride_vt + offs_d[:, None], mask=tl.trans(kv_ok), other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            t = _tanh(s)
            s = t * cap_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(tok[:, None], cols[None, :], seqlen, window_left, window_right, BANDED), p, 0.0)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, WORK, CU_SEQLENS, qk_scale, cap_scale, sm_scale, window_left,
                 window_right, seqlen_bucket, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                 stride_dot, stride_doh, stride_lh, stride_dqt, stride_dqh,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BANDED: tl.constexpr,
                 SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """dQ of the folded query tile of work item program_id(0), KV head program_id(1)."""
    seq, m0 = _work_item(WORK, BLOCK_M)
    kv_head = tl.program_id(1)
    start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - start
    r = m0 + tl.arange(0, BLOCK_M)
    tok = r // GROUP
    head = kv_head * GROUP + r % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = r < seqlen * GROUP
    ld = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + ((start + tok) * stride_qt + head * stride_qh)[:, None] + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(DO + ((start + tok) * stride_dot + head * stride_doh)[:, None] + offs_d[None, :], mask=ld,
                 other=0.0)
    lse = tl.load(LSE + head * stride_lh + start + tok, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + head * stride_lh + start + tok, mask=row_ok, other=0.0)
    k_src, v_src = _kv_sources(K, V, start, seqlen, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM,
                               USE_TMA, BLOCK_N, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m0, seqlen, window_left, window_right, GROUP, BANDED, BLOCK_M, BLOCK_N)
    if BANDED:
        dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt, lo, full_lo, tok, seqlen,
                       window_left, window_right, qk_scale, cap_scale, offs_n, offs_d, d_ok, BANDED, SOFTCAP, True,
                       BLOCK_N, PRECISION, USE_TMA)
    dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt, full_lo, full_hi, tok, seqlen,
                   window_left, window_right, qk_scale, cap_scale, offs_n, offs_d, d_ok, BANDED, SOFTCAP, False,
                   BLOCK_N, PRECISION, USE_TMA)
    dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt, full_hi, hi, tok, seqlen,
                   window_left, window_right, qk_scale, cap_scale, offs_n, offs_d, d_ok, BANDED, SOFTCAP, True,
                   BLOCK_N, PRECISION, USE_TMA)
    tl.store(DQ + ((start + tok) * stride_dqt + head * stride_dqh)[:, None] + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=ld)


# ----------------------------------------------------------------------------------------------------------------
# configurations: one small config in the interpreter; on a GPU a few per kernel, pruned by arch and head dim


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, arch class, input width and head-dim class (BLOCK_D <= 64,
# <= 128, 256). Every entry compiles for its arch without register spills and within its shared memory, with Triton
# 3.6 to 3.9 (ptxas -v, tests/test_kernel_build.py); autotuning picks among them per key. "sm90" is compute capability
# 9.x and newer, "sm80" covers 8.x. fp32 inputs ("ieee" dots on the CUDA cores, 4-byte tiles) need smaller tiles than
# fp16/bf16.
_TABLE = {
    "fwd": {
        "sm90": {"half": {64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 2)],
                          128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 2)],
                          256: [(64, 32, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)]},
                 "fp32": {64: [(32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)],
                          128: [(16, 64, 4, 2), (16, 16, 8, 2)],
                          256: [(16, 16, 4, 2), (16, 16, 8, 2)]}},
        "sm80": {"half": {64: [(128, 64, 8, 3), (64, 32, 4, 2)],
                          128: [(128, 32, 8, 3), (128, 32, 8, 2)],
                          256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
                 "fp32": {64: [(32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)],
                          128: [(16, 64, 8, 2), (16, 16, 8, 2)],
                          256: [(16, 16, 4, 2), (16, 16, 8, 2)]}},
    },
    "dkdv": {
        "sm90": {"half": {64: [(32, 128, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)],
                          128: [(32, 128, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)],
                          256: [(16, 64, 8, 2), (32, 32, 8, 2)]},
                 "fp32": {64: [(32, 32, 8, 2), (16, 64, 8, 2)],
                          128: [(16, 64, 8, 2), (16, 32, 8, 2)],
                          256: [(16, 16, 8, 2), (16, 32, 8, 2)]}},
        "sm80": {"half": {64: [(16, 64, 4, 2)],
                          128: [(32, 64, 8, 2), (16, 64, 4, 2)],
                          256: [(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)]},
                 "fp32": {64: [(32, 16, 4, 2), (16, 32, 8, 2)],
                          128: [(16, 32, 4, 2), (16, 16, 4, 2)],
                          256: [(16, 16, 4, 2), (16, 16, 4, 1)]}},
    },
    "dq": {
        "sm90": {"half": {64: [(128, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
                          128: [(128, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
                          256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
                 "fp32": {64: [(64, 32, 8, 2), (32, 32, 8, 2)],
                          128: [(16, 32, 8, 2), (16, 64, 4, 2)],
                          256: [(16, 16, 4, 2)]}},
        "sm80": {"half": {64: [(64, 32, 4, 2), (32, 32, 4, 2)],
                          128: [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
                          256: [(64, 64, 8, 2), (32, 32, 4, 2)]},
                 "fp32": {64: [(64, 32, 8, 2)],
                          128: [(32, 16, 4, 2), (16, 32, 8, 2)],
                          256: [(16, 16, 4, 2)]}},
    },
}
# The interpreter runs one config per kernel, shaped like the GPU ones (BLOCK_M != BLOCK_N, to exercise the
# diagonal bookkeeping).
_INTERPRETER = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}


def delta_block(dtype, block_d: int) -> int:
    """Rows per program of ``_bwd_delta``: 64, fewer for wide fp32 rows (at most 4096 fp32 values per tile, what
    compiles without spills)."""
    rows = 64 if dtype != torch.float32 else min(64, 4096 // block_d)
    return min(rows, 32) if triton_interpreting() else rows


def arch_class(device=None) -> str:
    """The config tables' arch class of a CUDA device: ``sm90`` (compute capability 9 and newer) or ``sm80``."""
    return "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"


def head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


# dkdv configs that one variant runs without: those that spill with ATOMIC_DQ's extra dQ tile, and those that spill
# without it (ptxas -v) where that variant has others; (arch class, width, head-dim class, config) per ATOMIC_DQ.
_DKDV_SKIPS = {
    True: {("sm90", "half", 128, (16, 64, 4, 2)), ("sm90", "half", 256, (16, 64, 8, 2)),
           ("sm90", "fp32", 64, (16, 64, 8, 2)), ("sm80", "half", 128, (16, 64, 4, 2)),
           ("sm80", "half", 256, (16, 64, 8, 2)), ("sm80", "half", 256, (32, 32, 8, 2)),
           ("sm80", "fp32", 64, (16, 32, 8, 2)), ("sm80", "fp32", 128, (16, 32, 4, 2)),
           ("sm80", "fp32", 256, (16, 16, 4, 2))},
    False: {("sm80", "fp32", 256, (16, 16, 4, 1))},
}


# configs that spill with BANDED's masks (ptxas -v, Triton 3.6 or 3.9; half precision, where BANDED is compiled
# ahead of time): (kernel, arch class, width, head-dim class, config)
_BANDED_SKIPS = {("dq", "sm90", "half", 128, (128, 64, 8, 3)), ("dq", "sm90", "half", 256, (64, 32, 8, 2)),
                 ("dkdv", "sm80", "half", 256, (16, 64, 8, 2)), ("dkdv", "sm90", "half", 256, (16, 64, 8, 2))}
# configs that spill with SOFTCAP's tanh (ptxas -v, Triton 3.6; half precision, where SOFTCAP is compiled ahead of
# time): (kernel, arch class, width, head-dim class, config, banded)
_SOFTCAP_SKIPS = {("dkdv", "sm80", "half", 128, (16, 64, 4, 2), True),
                  ("dkdv", "sm80", "half", 256, (16, 64, 8, 2), False),
                  ("dkdv", "sm90", "half", 256, (16, 64, 8, 2), False),
                  ("dq", "sm80", "half", 256, (64, 64, 8, 2), True)}


def gpu_configs(kernel: str, arch: str, width: str, block_d: int, atomic_dq: bool = False,
                banded: bool = False, softcap: bool = False) -> list:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) a GPU may run (also what tests/tools/aot_specs.py compiles);
    ``atomic_dq``: of the dkdv kernel with ATOMIC_DQ; ``banded``: with BANDED (causal or a window); ``softcap``: with
    SOFTCAP."""
    hd = head_dim_class(block_d)
    skip = _DKDV_SKIPS[atomic_dq] if kernel == "dkdv" else set()
    return [c for c in _TABLE[kernel][arch][width][hd] if (arch, width, hd, c) not in skip
            and not (banded and (kernel, arch, width, hd, c) in _BANDED_SKIPS)
            and not (softcap and (kernel, arch, width, hd, c, banded) in _SOFTCAP_SKIPS)]


def _cfg(c):
    return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3])


def _configs(kernel):
    if triton_interpreting():
        return [_cfg(_INTERPRETER[kernel])]
    return [_cfg(c) for c in sorted({c for arch in _TABLE[kernel].values() for width in arch.values()
                                     for cs in width.values() for c in cs})]


def _pruner(kernel):
    def prune(configs, named_args, **kwargs):
        if triton_interpreting():
            return configs
        meta = {**named_args, **kwargs}
        width = "fp32" if meta["PRECISION"] == "ieee" else "half"
        allowed = gpu_configs(kernel, arch_class(), width, meta["BLOCK_D"], meta.get("ATOMIC_DQ", False),
                              meta["BANDED"], meta["SOFTCAP"])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
    return prune


_KEY = ["HEAD_DIM", "GROUP", "BANDED", "SOFTCAP", "seqlen_bucket"]
_attn_fwd_tuned = triton.autotune(_configs("fwd"), key=_KEY + ["USE_TMA"],
                                  prune_configs_by={"early_config_prune": _pruner("fwd")})(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(_configs("dkdv"), key=_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ_ACC"],
                                       prune_configs_by={"early_config_prune": _pruner("dkdv")})(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(_configs("dq"), key=_KEY + ["USE_TMA"],
                                     prune_configs_by={"early_config_prune": _pruner("dq")})(_attn_bwd_dq)


# ----------------------------------------------------------------------------------------------------------------
# launchers


NO_WINDOW = 2 ** 30  # a band edge that masks nothing (tokens + it stays within int32)


def _common(q, k, causal, window, max_seqlen, softmax_scale, softcap):
    """(the kernels' constexprs, (qk_scale, cap_scale), (window_left, window_right), seqlen_bucket) of a launch."""
    d = q.shape[-1]
    left, right = (NO_WINDOW, NO_WINDOW) if window is None else (min(w, NO_WINDOW) for w in window)
    meta = dict(GROUP=q.shape[1] // k.shape[1], HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                BANDED=bool(causal) or window is not None, SOFTCAP=softcap is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    scales = (softmax_scale * LOG2E, 1.0) if softcap is None else (softmax_scale / softcap, softcap * LOG2E)
    return meta, scales, (left, 0 if causal else right), max(64, triton.next_power_of_2(max(max_seqlen, 1)))


def attention_forward(q, k, v, varlen, causal: bool, window, softmax_scale: float, softcap):
    """q [T, Hq, D], k/v [T, Hkv, D] (last dim contiguous), ``varlen`` their ``Varlen``, ``window`` (left, right) or
    None, ``softcap`` a float or None -> (out [T, Hq, D] in q.dtype, lse [Hq, T] fp32)."""
    T, hq, _ = q.shape
    hkv, group = k.shape[1], hq // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(hq, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    meta, scales, band, bucket = _common(q, k, causal, window, varlen.max_seqlen, softmax_scale, softcap)
    work, items = tile_work(varlen, group, q.device)
    _attn_fwd_tuned[lambda m: (items[m["BLOCK_M"]], hkv)](
        q, k, v, out, lse, work, varlen.cu_seqlens, *scales, *band, bucket, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        USE_TMA=use_tma(k, v), **meta, **LAUNCH_OPTIONS)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, varlen, causal: bool, window, softmax_scale: float, softcap):
    """Gradients (dq [T, Hq, D], dk/dv [T, Hkv, D]) from dout [T, Hq, D] and the saved out and lse [Hq, T]."""
    T, hq, d = q.shape
    hkv, group = k.shape[1], hq // k.shape[1]
    atomic = dq_mode() == "atomic"  # the dK/dV kernel adds dQ (unscaled) into fp32; else the dQ kernel writes it
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if T == 0:
        return dq.to(q.dtype), dk, dv
    delta = torch.empty_like(lse)
    meta, scales, band, bucket = _common(q, k, causal, window, varlen.max_seqlen, softmax_scale, softcap)
    block_t = delta_block(q.dtype, meta["BLOCK_D"])
    _bwd_delta[(triton.cdiv(T, block_t), hq)](out, dout, delta, T, out.stride(0), out.stride(1), dout.stride(0),
                                              dout.stride(1), delta.stride(0), HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"],
                                              BLOCK_T=block_t, **LAUNCH_OPTIONS)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
               dout.stride(1), lse.stride(0))
    key_work, key_items = tile_work(varlen, 1, q.device)
    _attn_bwd_dkdv_tuned[lambda m: (key_items[m["BLOCK_N"]], hkv)](
        q, k, v, dout, lse, delta, dk, dv, dq, key_work, varlen.cu_seqlens, *scales, softmax_scale, *band, bucket,
        *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq.stride(0), dq.stride(1),
        ATOMIC_DQ=atomic, **meta, **LAUNCH_OPTIONS)
    if atomic:
        return dq.mul_(softmax_scale).to(q.dtype), dk, dv
    row_work, row_items = tile_work(varlen, group, q.device)
    _attn_bwd_dq_tuned[lambda m: (row_items[m["BLOCK_M"]], hkv)](
        q, k, v, dout, lse, delta, dq, row_work, varlen.cu_seqlens, *scales, softmax_scale, *band, bucket, *strides,
        dq.stride(0), dq.stride(1), USE_TMA=use_tma(k, v), **meta, **LAUNCH_OPTIONS)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# autograd Function and the backend


class _Attention(torch.autograd.Function):
    """Packed attention; saves q, k, v, out and the fp32 lse, recomputes the scores in backward."""

    @staticmethod
    def forward(ctx, q, k, v, varlen, causal, window, scale, softcap):
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        out, lse = attention_forward(q, k, v, varlen, causal, window, scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (varlen, causal, window, scale, softcap)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        with launch_device(dout):
            dq, dk, dv = attention_backward(_unit_last_stride(dout), q, k, v, out, lse, *ctx.meta)
        return dq, dk, dv, None, None, None, None, None


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (the kernels take the token and head strides: the per-head
    views of a fused projection or of transformers' ``[B, H, L, D]`` layout are not copied), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _index_span(t: torch.Tensor) -> int:
    """One past the largest element offset the kernels compute into ``t`` from its strides."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0


def _packed(q, k, v, varlen, causal, window, scale, return_lse, softcap):
    out, lse = _Attention.apply(q, k, v, varlen, causal, window, scale, softcap)
    return (out, lse) if return_lse else out


def flash_attention_triton(q, k, v, varlen, key_padding_mask, causal, window, scale, return_lse, softcap=None):
    """The backend contract of ``kalm_fast.ops.flash_attention``; launches on ``q``'s device."""
    span = max(q.numel(), *(_index_span(t) for t in (q, k, v)))
    if span >= 2 ** 31:
        raise ValueError(f"q, k, v span {span} elements; the triton backend indexes with int32 (< 2**31): "
                         "split the batch")
    with launch_device(q):
        if q.dim() == 3:
            return _packed(q, k, v, varlen, causal, window, scale, return_lse, softcap)
        return padded_via_packed(_packed, q, k, v, key_padding_mask, causal, window, scale, return_lse, softcap)
