"""``mean_pool``: masked mean over the tokens of each sequence, Matryoshka truncation, fused L2 normalization."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _registry
from .._native import cuda_unavailable
from .._checks import FLOAT_DTYPES, check_cu_seqlens, check_mask, check_same_device, check_tensor
from ..reference import mean_pool as reference

OP = "mean_pool"


def mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
              cu_seqlens: Optional[torch.Tensor] = None, dim: Optional[int] = None, normalize: bool = False,
              eps: float = 1e-12, backend: str = "auto") -> torch.Tensor:
    """Mean of the real tokens of each sequence, in fp32, returned in ``hidden.dtype``.

    padded: ``hidden [B, L, H]`` with ``attention_mask [B, L]`` (bool or 0/1, any nonzero counts as 1; None: every
    token counts);
    packed: ``hidden [T, H]`` with ``cu_seqlens`` int32 ``[N+1]``. ``dim`` keeps the first ``dim`` features
    (Matryoshka), ``normalize`` divides by ``max(||e||_2, eps)`` after truncation. Returns ``[B or N, dim or H]``;
    an empty sequence gives a zero vector. Differentiable w.r.t. ``hidden``.
    """
    check_tensor("hidden", hidden, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    if attention_mask is not None and cu_seqlens is not None:
        raise ValueError("pass either attention_mask (padded [B, L, H] input) or cu_seqlens (packed [T, H] input), not both")
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be packed [T, H] when cu_seqlens is given, got shape {tuple(hidden.shape)}")
        check_cu_seqlens(cu_seqlens, hidden.shape[0])
    else:
        if hidden.dim() != 3:
            raise ValueError(f"hidden [T, H] is packed and needs cu_seqlens [N+1]; padded hidden must be [B, L, H], "
                             f"got shape {tuple(hidden.shape)}")
        if attention_mask is not None:
            check_mask("attention_mask", attention_mask, hidden.shape[:2])
            attention_mask = attention_mask != 0  # 0/1 semantics on every backend, whatever the mask's dtype
    check_same_device(hidden=hidden, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
    H = hidden.shape[-1]
    if dim is None:
        dim = H
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= H:
        raise ValueError(f"dim must be an int with 1 <= dim <= H = {H}, got {dim!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    impl = _registry.select(OP, backend, hidden.device, hidden.dtype)
    if impl.name in ("triton", "cuda") and H > 0 and hidden.stride(-1) != 1:
        raise ValueError(f"hidden must have a contiguous last dimension for backend {impl.name!r}, "
                         f"got strides {hidden.stride()}; call .contiguous()")
    return impl.fn(hidden, attention_mask, cu_seqlens, dim, bool(normalize), float(eps))


def _reference(hidden, mask, cu_seqlens, dim, normalize, eps):
    return reference.mean_pool(hidden, mask, cu_seqlens=cu_seqlens, dim=dim, normalize=normalize, eps=eps)


def _torch(hidden, mask, cu_seqlens, dim, normalize, eps):
    """Vectorized pure PyTorch: one index_add (packed) or one batched matmul (padded), fp32."""
    x = hidden[..., :dim].float()
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
        total = x.new_zeros(lengths.numel(), dim).index_add(0, seq_ids, x)
        count = lengths.float()
    else:
        m = (torch.ones(x.shape[:2], device=x.device) if mask is None else mask).to(x.dtype)
        total = torch.bmm(m.unsqueeze(1), x).squeeze(1)
        count = m.sum(dim=1)
    out = total / count.clamp(min=1.0).unsqueeze(-1)
    if normalize:
        out = F.normalize(out, p=2.0, dim=-1, eps=eps)
    return out.to(hidden.dtype)


class _TritonMeanPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, cu_seqlens, dim, normalize, eps):
        from ..kernels import mean_pool as kernels

        out, mean, count = kernels.mean_pool_forward(hidden, mask, cu_seqlens, dim, normalize, eps,
                                                     save_for_backward=hidden.requires_grad)
        if hidden.requires_grad:
            if cu_seqlens is not None:
                max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
            else:
                max_len = hidden.shape[1]
            ctx.save_for_backward(mean, count, mask, cu_seqlens)
            ctx.meta = (hidden.shape, hidden.dtype, max_len, normalize, eps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from ..kernels import mean_pool as kernels

        mean, count, mask, cu_seqlens = ctx.saved_tensors
        shape, dtype, max_len, normalize, eps = ctx.meta
        grad = kernels.mean_pool_backward(grad_out, mean, count, shape, dtype, mask, cu_seqlens, max_len, normalize, eps)
        return grad, None, None, None, None, None


def _triton(hidden, mask, cu_seqlens, dim, normalize, eps):
    return _TritonMeanPool.apply(hidden, mask, cu_seqlens, dim, normalize, eps)


_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
_registry.register(OP, "reference", _reference, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, rank=100,
                   tolerances=_TOLERANCES)
_registry.register(OP, "torch", _torch, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, rank=50, tolerances=_TOLERANCES)
_registry.register(OP, "triton", _triton, devices=("cuda",), dtypes=FLOAT_DTYPES, rank=10, tolerances=_TOLERANCES,
                   available=_registry.triton_unavailable)


def _cuda(hidden, mask, cu_seqlens, dim, normalize, eps):
    from ..cuda.mean_pool import mean_pool_cuda

    return mean_pool_cuda(hidden, mask, cu_seqlens, dim, normalize, eps)


# Ranked last but for the reference: not verified on hardware yet, so `auto` never prefers it.
_registry.register(OP, "cuda", _cuda, devices=("cuda",), dtypes=FLOAT_DTYPES, rank=60, tolerances=_TOLERANCES,
                   available=cuda_unavailable)
