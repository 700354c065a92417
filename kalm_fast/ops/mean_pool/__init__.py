"""``mean_pool``: masked mean over the tokens of each sequence, Matryoshka truncation, fused L2 normalization.

Backends (one contract, ``fn(hidden, mask, varlen, dim, normalize, eps)`` with checked arguments: padded
``hidden [B, L, H]`` with a bool ``mask [B, L]`` or None, or packed ``hidden [T, H]`` with a ``Varlen``):

- ``reference`` (``reference.py``): a Python loop over sequences, the oracle;
- ``torch`` (``_torch.py``): one ``index_add`` (packed) or one batched matmul (padded);
- ``triton`` (``_triton.py``): one fused kernel each way;
- ``cuda`` (``_cuda.py``): csrc/mean_pool.cu, vectorized, sequences split over blocks.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from ... import _registry
from ..._checks import FLOAT_DTYPES, check_mask, check_same_device, check_tensor
from ..._native import cuda_unavailable
from ..varlen import Varlen, as_varlen

OP = "mean_pool"
_registry.register(OP, [
    _registry.Backend("reference", f"{__name__}.reference:mean_pool_reference", ("cpu", "cuda"), FLOAT_DTYPES),
    _registry.Backend("torch", f"{__name__}._torch:mean_pool_torch", ("cpu", "cuda"), FLOAT_DTYPES),
    _registry.Backend("triton", f"{__name__}._triton:mean_pool_triton", _registry.TRITON_DEVICES, FLOAT_DTYPES,
                      available=_registry.triton_unavailable, hint=_registry.TRITON_HINT),
    # not verified on hardware yet: `auto` does not pick it
    _registry.Backend("cuda", f"{__name__}._cuda:mean_pool_cuda", ("cuda",), FLOAT_DTYPES, available=cuda_unavailable),
], auto={"cuda": ("triton", "torch"), "cpu": ("torch",)})


def mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
              cu_seqlens: Union[torch.Tensor, Varlen, None] = None, dim: Optional[int] = None,
              normalize: bool = False, eps: float = 1e-12, backend: str = "auto") -> torch.Tensor:
    """Mean of the real tokens of each sequence, in fp32, returned in ``hidden.dtype``.

    padded: ``hidden [B, L, H]`` with ``attention_mask [B, L]`` (bool or 0/1, any nonzero counts as 1; None: every
    token counts);
    packed: ``hidden [T, H]`` with ``cu_seqlens`` int32 ``[N+1]`` or a ``Varlen``. ``dim`` keeps the first ``dim``
    features (Matryoshka), ``normalize`` divides by ``max(||e||_2, eps)`` after truncation. Returns
    ``[B or N, dim or H]``; an empty sequence gives a zero vector. Differentiable w.r.t. ``hidden``.
    """
    check_tensor("hidden", hidden, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    if attention_mask is not None and cu_seqlens is not None:
        raise ValueError("pass either attention_mask (padded [B, L, H] input) or cu_seqlens (packed [T, H] input), "
                         "not both")
    varlen = None
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be packed [T, H] when cu_seqlens is given, got shape {tuple(hidden.shape)}")
        varlen = as_varlen(cu_seqlens, hidden.shape[0])
    else:
        if hidden.dim() != 3:
            raise ValueError(f"hidden [T, H] is packed and needs cu_seqlens [N+1]; padded hidden must be [B, L, H], "
                             f"got shape {tuple(hidden.shape)}")
        if attention_mask is not None:
            check_mask("attention_mask", attention_mask, hidden.shape[:2])
            attention_mask = attention_mask != 0  # 0/1 semantics on every backend, whatever the mask's dtype
    check_same_device(hidden=hidden, attention_mask=attention_mask,
                      cu_seqlens=None if varlen is None else varlen.cu_seqlens)
    H = hidden.shape[-1]
    if dim is None:
        dim = H
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= H:
        raise ValueError(f"dim must be an int with 1 <= dim <= H = {H}, got {dim!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be > 0 (a float), got {eps!r}")
    name, fn = _registry.select(OP, backend, hidden.device, hidden.dtype)
    if name in ("triton", "cuda") and H > 0 and hidden.stride(-1) != 1:
        raise ValueError(f"hidden must have a contiguous last dimension for backend {name!r}, "
                         f"got strides {hidden.stride()}; call .contiguous()")
    return fn(hidden, attention_mask, varlen, dim, bool(normalize), float(eps))
