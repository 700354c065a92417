"""Backend ``cuda`` of ``flash_attention`` (csrc/attention.cu, forward): launch plan, argument packing, the backend.

``flash_attention_cuda(q, k, v, varlen, key_padding_mask, causal, window, softmax_scale, return_lse, softcap)``
takes the already-checked arguments of ``kalm_fast.ops.flash_attention``. Forward only (the encode path): fp16/bf16,
head dims 64 and 128, GQA, bidirectional or causal, no window and no softcap (the op refuses them). Packed input
runs the kernel directly; padded input is packed first (``unpad``) and padded back (zeros, lse +inf at the padding).
"""
from __future__ import annotations

import torch

from ... import _native
from ..._constants import LOG2E
from ..._cuda import address, aligned, cdiv, dtype_code, launch_device, pack, stream_of
from .padding import padded_via_packed

BLOCK_M = 64    # query rows per block (4 warps x 16)
BLOCK_N = 64    # keys per tile
THREADS = 128
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)


def smem_bytes(head_dim: int) -> int:
    """Shared memory of one block: Q, K and V tiles with rows padded by 8 elements."""
    return (BLOCK_M + 2 * BLOCK_N) * (head_dim + 8) * 2


def plan(*, num_seqs: int, max_seqlen: int, num_heads_q: int, head_dim: int) -> dict:
    """Grid of the forward kernel: (sequences x query tiles, query heads); blocks past a sequence's end exit."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"backend 'cuda' of flash_attention supports head dims {HEAD_DIMS}, got D={head_dim}; "
                         "use backend='triton'")
    m_blocks = cdiv(max_seqlen, BLOCK_M)
    if num_seqs * m_blocks >= 2 ** 31 or num_heads_q > 65535:
        raise ValueError(f"too many sequences x query tiles ({num_seqs} x {m_blocks}) or heads ({num_heads_q}) "
                         "for one launch")
    return dict(m_blocks=m_blocks, grid=(num_seqs * m_blocks, num_heads_q), threads=THREADS,
                smem=smem_bytes(head_dim))


def forward_args(q, k, v, out, lse, cu_seqlens, max_seqlen: int, causal: bool, softmax_scale: float, *, stream: int):
    """The AttentionFwdArgs of one launch (packed q [T, Hq, D], k/v [T, Hkv, D], lse [Hq, T] or None)."""
    T, hq, d = q.shape
    p = plan(num_seqs=cu_seqlens.numel() - 1, max_seqlen=max_seqlen, num_heads_q=hq, head_dim=d)
    return pack("AttentionFwdArgs", dtype=dtype_code(q.dtype, DTYPES), q=q.data_ptr(), k=k.data_ptr(),
                v=v.data_ptr(), out=out.data_ptr(), lse=address(lse), cu_seqlens=cu_seqlens.data_ptr(),
                num_seqs=cu_seqlens.numel() - 1, total_tokens=T, num_heads_q=hq, num_heads_kv=k.shape[1],
                head_dim=d, q_stride_t=q.stride(0), q_stride_h=q.stride(1), k_stride_t=k.stride(0),
                k_stride_h=k.stride(1), v_stride_t=v.stride(0), v_stride_h=v.stride(1), o_stride_t=out.stride(0),
                o_stride_h=out.stride(1), lse_stride_h=0 if lse is None else lse.stride(0), causal=int(causal),
                scale_log2=softmax_scale * LOG2E, m_blocks=p["m_blocks"], device=q.device.index or 0,
                stream=stream)


def _packed(q, k, v, varlen, causal, window, scale, return_lse, softcap):
    q, k, v = aligned(q), aligned(k), aligned(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if return_lse else None
    if q.shape[0] > 0:
        _native.cuda_lib().attention_fwd(forward_args(q, k, v, out, lse, varlen.cu_seqlens, varlen.max_seqlen, causal,
                                                      scale, stream=stream_of(q.device)))
    return (out, lse) if return_lse else out


def flash_attention_cuda(q, k, v, varlen, key_padding_mask, causal, window, softmax_scale, return_lse, softcap=None):
    """Attention forward on csrc/attention.cu (dtype and device were checked by the op). Not differentiable:
    raises if an input requires grad."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("backend 'cuda' of flash_attention is forward-only (inference); q/k/v require grad: "
                           "use backend='triton' or 'torch' for training, or run under torch.no_grad()")
    with launch_device(q):
        if q.dim() == 3:
            return _packed(q, k, v, varlen, causal, None, softmax_scale, return_lse, None)
        return padded_via_packed(_packed, q, k, v, key_padding_mask, causal, None, softmax_scale, return_lse, None)
