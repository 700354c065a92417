"""Triton kernels of the decoder LLMs' elementwise ops on a GPU: the gated MLP's ``silu(gate) * up``, the rotary
embedding and a residual add followed by RMSNorm, each one pass over its tensors (torch's ops make two, five and
seven, each writing a rounded intermediate), with their backward. Used by the packed decoder (``decoder_packed``:
inference, RoPE in place) and by transformers' own modules under ``KALM_FUSED_DECODER=1``
(``fused_decoder``: training too). The math is fp32 with one rounding to the output dtype at the store."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._cuda import LAUNCH_OPTIONS, launch_device, sms_to_fill

SILU_MUL_BLOCK = 1024  # columns per program


@triton.jit
def _silu_mul_kernel(GATE, UP, OUT, I, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    """``OUT[t, c] = silu(GATE[t, c]) * UP[t, c]``; grid ``(T, cdiv(I, BLOCK))``."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = tl.load(GATE + t * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(UP + t * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + t * stride_o + cols, (gate * tl.sigmoid(gate) * up).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, I, stride_d, stride_g, stride_u, stride_dg, stride_du,
                         BLOCK: tl.constexpr):
    """``DUP = DOUT * silu(GATE)``, ``DGATE = DOUT * UP * s (1 + GATE (1 - s))`` with ``s = sigmoid(GATE)``;
    grid ``(T, cdiv(I, BLOCK))``."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    dout = tl.load(DOUT + t * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(GATE + t * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(UP + t * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    tl.store(DUP + t * stride_du + cols, (dout * gate * s).to(DUP.dtype.element_ty), mask=ok)
    tl.store(DGATE + t * stride_dg + cols, (dout * up * s * (1.0 + gate * (1.0 - s))).to(DGATE.dtype.element_ty),
             mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last dim]`` with a contiguous last dim (a view where the strides allow)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _launch_silu_mul(kernel, grid_rows, inter, *tensors):
    if grid_rows and inter:
        with launch_device(tensors[0]):
            kernel[(grid_rows, triton.cdiv(inter, SILU_MUL_BLOCK))](
                *tensors, inter, *(t.stride(0) for t in tensors), BLOCK=SILU_MUL_BLOCK, **LAUNCH_OPTIONS)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = _rows(gate), _rows(up)
        out = g.new_empty(g.shape)
        _launch_silu_mul(_silu_mul_kernel, g.shape[0], g.shape[1], g, u, out)
        ctx.save_for_backward(g, u)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g, u = ctx.saved_tensors
        dgate, dup = torch.empty_like(g), torch.empty_like(u)
        _launch_silu_mul(_silu_mul_bwd_kernel, g.shape[0], g.shape[1], _rows(dout), g, u, dgate, dup)
        return dgate.view(dout.shape), dup.view(dout.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of two ``[..., I]`` tensors of one shape and dtype (any row strides, e.g. the two halves
    of one gate-up projection) -> a new contiguous tensor of that shape and dtype; differentiable in both."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device or gate.dim() == 0:
        raise ValueError(f"gate and up must be [..., I] tensors of one shape, dtype and device, got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    return _SiluMul.apply(gate, up)


@triton.jit
def _rope_kernel(X, OUT, COS, SIN, H, stride_xt, stride_xh, stride_ot, stride_oh, stride_ct, stride_st,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    """``OUT[t, h]`` = ``X[t, h]`` rotated: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` with ``x1, x2`` its
    halves (INVERSE: by the opposite angle, the backward); OUT may be X. Grid ``(T, cdiv(H, BLOCK_H))``."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    cos = tl.load(COS + t * stride_ct + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + t * stride_st + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        sin = -sin
    ok = (heads < H)[:, None] & j_ok[None, :]
    first = X + t * stride_xt + heads[:, None] * stride_xh + j[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    out = OUT + t * stride_ot + heads[:, None] * stride_oh + j[None, :]
    tl.store(out, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=ok)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=ok)


def _check_rope(x, cos, sin):
    if x.dim() != 3 or x.shape[-1] % 2 or x.stride(-1) != 1 or any(
            c.shape != (x.shape[0], x.shape[-1] // 2) or c.stride(-1) != 1 for c in (cos, sin)):
        raise ValueError(f"rope needs x [T, heads, D] (D even) and cos/sin [T, D/2], each with a contiguous last "
                         f"dim; got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")


def _launch_rope(x, out, cos, sin, inverse: bool):
    tokens, heads, head_dim = x.shape
    if not x.numel():
        return
    block_h = min(16, triton.next_power_of_2(heads))
    with launch_device(x):
        _rope_kernel[(tokens, triton.cdiv(heads, block_h))](
            x, out, cos, sin, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            sin.stride(0), HALF=head_dim // 2, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            INVERSE=inverse, **LAUNCH_OPTIONS)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``x [T, heads, D]`` in place (any token and head strides, a contiguous last dim, as the per-head views
    of a fused QKV projection) by ``cos``, ``sin`` ``[T, D/2]`` (contiguous last dim), as transformers'
    ``apply_rotary_pos_emb`` with the rotary angles' first half. Not differentiable (inference)."""
    _check_rope(x, cos, sin)
    _launch_rope(x, x, cos, sin, inverse=False)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        out = x.new_empty(x.shape)
        _launch_rope(x, out, cos, sin, inverse=False)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dx = dout.new_empty(dout.shape)
        _launch_rope(dout, dx, cos, sin, inverse=True)
        return dx, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, D]`` rotated as ``rope_`` does, into a new contiguous tensor of x's dtype; differentiable in
    ``x`` (the backward rotates the gradient back; ``cos``/``sin``, functions of the positions, get none)."""
    _check_rope(x, cos, sin)
    return _Rope.apply(x, cos, sin)


@triton.jit
def _add_rms_norm_kernel(RES, DELTA, W, SUM, OUT, RSTD, H, eps, stride_r, stride_d, stride_s, stride_o,
                         BLOCK: tl.constexpr):
    """``SUM[t] = RES[t] + DELTA[t]`` (rounded to SUM's dtype, as the residual stream holds it), ``RSTD[t] =
    1 / sqrt(mean(SUM[t]^2) + eps)`` (fp32), ``OUT[t] = SUM[t] * RSTD[t] * W``; grid ``(T,)``."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    total = (tl.load(RES + t * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
             + tl.load(DELTA + t * stride_d + cols, mask=ok, other=0.0).to(tl.float32)).to(SUM.dtype.element_ty)
    tl.store(SUM + t * stride_s + cols, total, mask=ok)
    total = total.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(total * total, axis=0) / H + eps)
    tl.store(RSTD + t, rstd)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + t * stride_o + cols, (total * rstd * w).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _add_rms_norm_bwd_kernel(DOUT, DSUM, SUM, W, RSTD, DRES, DDELTA, DW_PART, T, H, stride_do, stride_ds, stride_s,
                             stride_dr, stride_dd, ROWS, BLOCK: tl.constexpr):
    """Rows ``[pid * ROWS, min((pid + 1) * ROWS, T))`` (ROWS a runtime int: one compile for all batches): with ``xhat =
    SUM * RSTD`` and ``g = DOUT * W``, the gradient of the sum ``RSTD (g - xhat mean(g xhat)) + DSUM`` (the sum's own
    gradient: it is also the residual stream) into DRES and DDELTA (one per input dtype), and ``sum over the rows of
    DOUT * xhat`` into ``DW_PART[pid]`` (fp32; the launcher adds the programs' partial sums); grid
    ``(cdiv(T, ROWS),)``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * ROWS
    for i in range(tl.minimum(ROWS, T - first)):  # the last program may have fewer rows
        t = first.to(tl.int64) + i
        rstd = tl.load(RSTD + t)
        xhat = tl.load(SUM + t * stride_s + cols, mask=ok, other=0.0).to(tl.float32) * rstd
        dout = tl.load(DOUT + t * stride_do + cols, mask=ok, other=0.0).to(tl.float32)
        g = dout * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / H))
        dx += tl.load(DSUM + t * stride_ds + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(DRES + t * stride_dr + cols, dx.to(DRES.dtype.element_ty), mask=ok)
        tl.store(DDELTA + t * stride_dd + cols, dx.to(DDELTA.dtype.element_ty), mask=ok)
        dw += dout * xhat
    tl.store(DW_PART + pid * H + cols, dw, mask=ok)


ADD_RMS_NORM_ROWS = 32  # the most rows per backward program (each writes one partial dW row)


def _add_rms_norm_rows(tokens: int, device: torch.device) -> int:
    """Rows per backward program: enough programs for about four per SM (a memory-bound kernel needs several in
    flight), at most ADD_RMS_NORM_ROWS rows each (fewer partial dW rows for torch to add on large batches)."""
    return max(1, min(ADD_RMS_NORM_ROWS, triton.cdiv(tokens, 4 * sms_to_fill(device))))


def _norm_warps(block: int, backward: bool = False) -> int:
    """Warps per row-wide program: twice as many for the backward, which holds more fp32 row vectors at once (at a
    1024-wide block four warps spill on sm_80)."""
    return min(16, (4 if block <= 1024 else 8 if block <= 4096 else 16) * (2 if backward else 1))


class _AddRmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, delta, weight, eps, out_dtype):
        r, d, weight = _rows(residual), _rows(delta), weight.contiguous()
        tokens, hidden = r.shape
        total = torch.empty(r.shape, dtype=torch.promote_types(r.dtype, d.dtype), device=r.device)
        out = torch.empty(r.shape, dtype=out_dtype, device=r.device)
        rstd = torch.empty(tokens, dtype=torch.float32, device=r.device)
        block = triton.next_power_of_2(hidden)
        if tokens:
            with launch_device(r):
                _add_rms_norm_kernel[(tokens,)](r, d, weight, total, out, rstd, hidden, eps, r.stride(0), d.stride(0),
                                                total.stride(0), out.stride(0), BLOCK=block,
                                                num_warps=_norm_warps(block), **LAUNCH_OPTIONS)
        ctx.save_for_backward(total, weight, rstd)
        ctx.dtypes, ctx.shape = (r.dtype, d.dtype), residual.shape
        return out.view(residual.shape), total.view(residual.shape)

    @staticmethod
    def backward(ctx, dout, dsum):
        total, weight, rstd = ctx.saved_tensors
        tokens, hidden = total.shape
        dout, dsum = _rows(dout), _rows(dsum)
        # one gradient for both inputs where they share a dtype (as torch's add returns it): the second store of each
        # value goes to the same address
        dres = torch.empty(total.shape, dtype=ctx.dtypes[0], device=total.device)
        ddelta = dres if ctx.dtypes[1] == ctx.dtypes[0] else torch.empty_like(dres, dtype=ctx.dtypes[1])
        rows = _add_rms_norm_rows(tokens, total.device)
        programs = triton.cdiv(tokens, rows)
        dw_part = torch.zeros(max(programs, 1), hidden, dtype=torch.float32, device=total.device)
        block = triton.next_power_of_2(hidden)
        if tokens:
            with launch_device(total):
                _add_rms_norm_bwd_kernel[(programs,)](
                    dout, dsum, total, weight, rstd, dres, ddelta, dw_part, tokens, hidden, dout.stride(0),
                    dsum.stride(0), total.stride(0), dres.stride(0), ddelta.stride(0), rows,
                    BLOCK=block, num_warps=_norm_warps(block, backward=True), **LAUNCH_OPTIONS)
        return dres.view(ctx.shape), ddelta.view(ctx.shape), dw_part.sum(0).to(weight.dtype), None, None


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: Optional[torch.dtype] = None) -> tuple:
    """``(rms_norm(residual + delta) * weight, residual + delta)``, as transformers' decoder layers compute a residual
    add and the RMSNorm after it, in one pass: ``residual``, ``delta`` ``[..., H]`` of one shape (any row strides),
    ``weight [H]``. The sum has the promoted dtype of the two (what ``residual + delta`` gives); the normed output
    ``out_dtype`` (default: the sum's and weight's promoted dtype, as transformers' RMSNorm returns). The norm reads
    the sum as stored, in fp32. Differentiable in ``residual``, ``delta`` and ``weight``."""
    if residual.shape != delta.shape or residual.device != delta.device or residual.dim() == 0:
        raise ValueError(f"residual and delta must be [..., H] tensors of one shape and device, got "
                         f"{tuple(residual.shape)} on {residual.device} and {tuple(delta.shape)} on {delta.device}")
    if weight.shape != residual.shape[-1:] or weight.device != residual.device:
        raise ValueError(f"weight must be [{residual.shape[-1]}] on {residual.device}, got {tuple(weight.shape)} on "
                         f"{weight.device}")
    if out_dtype is None:
        out_dtype = torch.promote_types(torch.promote_types(residual.dtype, delta.dtype), weight.dtype)
    return _AddRmsNorm.apply(residual, delta, weight, float(eps), out_dtype)
