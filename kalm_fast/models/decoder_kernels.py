"""Triton kernels of the packed decoder's GPU path (``decoder_packed``): the gated MLP's ``silu(gate) * up`` and the
rotary embedding, each in one pass over its tensor (torch's ops make two and five, each writing a rounded
intermediate). The math is fp32 with one rounding to the input dtype at the store."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cuda import launch_device

SILU_MUL_BLOCK = 1024  # columns per program


@triton.jit
def _silu_mul_kernel(GATE_UP, OUT, I, stride_in, stride_out, BLOCK: tl.constexpr):
    """``OUT[t, c] = silu(GATE_UP[t, c]) * GATE_UP[t, I + c]``; grid ``(T, cdiv(I, BLOCK))``."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = tl.load(GATE_UP + t * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GATE_UP + t * stride_in + I + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + t * stride_out + cols, (gate * tl.sigmoid(gate) * up).to(OUT.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up [T, 2I]`` (the gate projection's columns, then the up projection's, with a
    contiguous last dim) -> a new ``[T, I]`` tensor of the same dtype."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [T, 2I] with a contiguous last dim, got shape {tuple(gate_up.shape)} "
                         f"and strides {gate_up.stride()}")
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(tokens, inter)
    if out.numel():
        with launch_device(gate_up):
            _silu_mul_kernel[(tokens, triton.cdiv(inter, SILU_MUL_BLOCK))](
                gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=SILU_MUL_BLOCK)
    return out


@triton.jit
def _rope_kernel(X, COS, SIN, H, stride_xt, stride_xh, stride_ct, stride_st, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates ``X[t, h]`` in place: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` with ``x1, x2`` its halves;
    grid ``(T, cdiv(H, BLOCK_H))``."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    cos = tl.load(COS + t * stride_ct + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + t * stride_st + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    first = X + t * stride_xt + heads[:, None] * stride_xh + j[None, :]
    ok = (heads < H)[:, None] & j_ok[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=ok)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=ok)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``x [T, heads, D]`` in place (any token and head strides, a contiguous last dim, as the per-head views
    of a fused QKV projection) by ``cos``, ``sin`` ``[T, D/2]`` (contiguous last dim), as transformers'
    ``apply_rotary_pos_emb`` with the rotary angles' first half."""
    tokens, heads, head_dim = x.shape
    if head_dim % 2 or x.stride(-1) != 1 or any(c.shape != (tokens, head_dim // 2) or c.stride(-1) != 1
                                                for c in (cos, sin)):
        raise ValueError(f"rope_ needs x [T, heads, D] (D even) and cos/sin [T, D/2], each with a contiguous last "
                         f"dim; got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if not x.numel():
        return
    block_h = min(16, triton.next_power_of_2(heads))
    with launch_device(x):
        _rope_kernel[(tokens, triton.cdiv(heads, block_h))](
            x, cos, sin, heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), HALF=head_dim // 2,
            BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(head_dim // 2))
