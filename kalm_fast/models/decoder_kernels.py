"""Triton kernels of the decoder LLMs' elementwise ops on a GPU: the gated MLP's ``silu(gate) * up`` and the rotary
embedding, each one pass over its tensors (torch's ops make two and five, each writing a rounded intermediate), with
their backward. Used by the packed decoder (``decoder_packed``: inference, RoPE in place) and by transformers' own
modules under ``KALM_FUSED_DECODER=1`` (``fused_decoder``: training too). The math is fp32 with one rounding to the
output dtype at the store."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cuda import launch_device

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
                *tensors, inter, *(t.stride(0) for t in tensors), BLOCK=SILU_MUL_BLOCK)


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
            INVERSE=inverse)


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
