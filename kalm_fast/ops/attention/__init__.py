"""``flash_attention``: bidirectional (or causal) attention over packed or padded sequences with GQA; ``pad``/``unpad``.

Backends (one contract, ``fn(q, k, v, varlen, key_padding_mask, causal, window, softmax_scale, return_lse,
softcap)`` with checked arguments: packed q/k/v with a ``Varlen``, or padded q/k/v with a bool ``key_padding_mask``
or None; ``window`` a pair of ints ``(left, right)`` or None; ``softcap`` a positive float or None):

- ``reference`` (``reference.py``): materializes every score matrix, the oracle;
- ``torch`` (``_torch.py``): ``scaled_dot_product_attention`` per length bucket; the CPU path of the encoder;
- ``triton`` (``_triton.py``): fused forward and backward kernels over the packed layout (CUDA; CPU only under
  ``TRITON_INTERPRET=1``);
- ``cuda`` (``_cuda.py``): csrc/attention.cu, forward only (inference), fp16/bf16, head dims 64 and 128, no
  ``window`` and no ``softcap``.

Head dims: up to 512 on ``torch`` and ``reference``, up to 256 (multiples of 8) on ``triton``; ``auto`` takes
``torch`` for the others.

Padded input reaches packed-only backends through ``padding.padded_via_packed``. The log-sum-exp
(``return_lse=True``) is returned for inspection and is not differentiable; it is ``+inf`` on rows that attend to no
key (padded query rows).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ... import _registry
from ..._checks import FLOAT_DTYPES, check_mask, check_same_device, check_tensor
from ..._native import cuda_unavailable
from ..varlen import Varlen, as_varlen
from .padding import pad, unpad

__all__ = ["flash_attention", "pad", "unpad", "window_masks_nothing"]

OP = "flash_attention"
MAX_HEAD_DIM = 512  # backends torch and reference (EmbeddingGemma 2's global layers); triton takes up to 256
TRITON_MAX_HEAD_DIM = 256
MAX_SOFTCAP = 1e30  # softcap * log2(e) stays far from fp32's largest value
_registry.register(OP, [
    _registry.Backend("reference", f"{__name__}.reference:flash_attention_reference", ("cpu", "cuda"), FLOAT_DTYPES),
    _registry.Backend("torch", f"{__name__}._torch:flash_attention_torch", ("cpu", "cuda"), FLOAT_DTYPES),
    _registry.Backend("triton", f"{__name__}._triton:flash_attention_triton", _registry.TRITON_DEVICES, FLOAT_DTYPES,
                      available=_registry.triton_unavailable, hint=_registry.TRITON_HINT),
    # forward only, no window, and not verified on hardware yet: `auto` does not pick it
    _registry.Backend("cuda", f"{__name__}._cuda:flash_attention_cuda", ("cuda",), (torch.float16, torch.bfloat16),
                      available=cuda_unavailable),
], auto={"cuda": ("triton", "torch"), "cpu": ("torch",)})


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    cu_seqlens: Union[torch.Tensor, Varlen, None] = None, max_seqlen: Optional[int] = None,
                    key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                    window: Optional[Tuple[int, int]] = None, softmax_scale: Optional[float] = None,
                    softcap: Optional[float] = None, return_lse: bool = False, backend: str = "auto"):
    """``softmax(scale * Q K^T + mask) V`` per sequence and head, fp32 accumulation, result in ``q.dtype``.

    packed: ``q [T, Hq, D]``, ``k, v [T, Hkv, D]``, ``cu_seqlens`` int32 ``[N+1]`` (checked on every call: one
    device-to-host copy) or a ``Varlen`` (checked when it was built: no synchronization); ``max_seqlen``, when
    given, must be at least the longest sequence -> ``[T, Hq, D]`` (lse ``[Hq, T]``).
    padded: ``q [B, L, Hq, D]``, ``k, v [B, L, Hkv, D]``, ``key_padding_mask [B, L]`` or None -> ``[B, L, Hq, D]``
    (lse ``[B, Hq, L]``); padded query rows give 0.
    Query head ``h`` reads key/value head ``h // (Hq // Hkv)``. Bidirectional unless ``causal``.
    ``window=(left, right)`` (local attention, e.g. Gemma 3's sliding layers: ``(w - 1, w - 1)`` for ``|i - j| < w``):
    query ``i`` of a sequence sees only its keys ``i - left <= j <= i + right`` (and ``j <= i`` if ``causal``); a
    window that reaches every key of the longest sequence is no window (and runs as none, on every backend).
    ``softcap`` (Gemma 2's ``attn_logit_softcapping``): the scores become ``softcap * tanh(scale * q.k / softcap)``
    before the softmax. Differentiable w.r.t. q, k, v.
    """
    check_tensor("q", q, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    layout = "packed [T, H, D]" if q.dim() == 3 else "padded [B, L, H, D]"
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=q.dim(), dtypes=FLOAT_DTYPES)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must be {layout} with the token dims and head dim of q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"the query heads Hq={hq} must be a positive multiple of the key/value heads Hkv={hkv}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got D={d}")
    if d % 8 and backend in ("triton", "cuda"):
        raise ValueError(f"head dim D={d}: backend {backend!r} needs a multiple of 8 (16-byte rows); backends "
                         "'torch' and 'reference' take any, and 'auto' picks 'torch' for it")
    if d > TRITON_MAX_HEAD_DIM and backend in ("triton", "cuda"):
        raise ValueError(f"head dim D={d}: backend {backend!r} takes at most {TRITON_MAX_HEAD_DIM}; backends 'torch' "
                         f"and 'reference' take up to {MAX_HEAD_DIM}, and 'auto' picks 'torch' for it")
    window = _check_window(window)
    varlen = None
    if q.dim() == 3:
        if cu_seqlens is None:
            raise ValueError("packed q [T, Hq, D] needs cu_seqlens int32 [N+1]; padded input is q [B, L, Hq, D]")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask [B, L] is for padded q [B, L, Hq, D]; packed input uses cu_seqlens only")
        varlen = as_varlen(cu_seqlens, q.shape[0])
        window = _effective_window(window, causal, varlen.max_seqlen, backend)
        if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                       or max_seqlen < varlen.max_seqlen):
            raise ValueError(f"max_seqlen must be an int >= the longest sequence in cu_seqlens ({varlen.max_seqlen}), "
                             f"got {max_seqlen!r}")
    else:
        if cu_seqlens is not None or max_seqlen is not None:
            raise ValueError("cu_seqlens/max_seqlen are for packed q [T, Hq, D]; padded q [B, L, Hq, D] takes "
                             "key_padding_mask [B, L]")
        if key_padding_mask is not None:
            check_mask("key_padding_mask", key_padding_mask, q.shape[:2])
            key_padding_mask = key_padding_mask.bool()
        window = _effective_window(window, causal, q.shape[1], backend)
        if key_padding_mask is not None and window is not None:
            _check_one_run(key_padding_mask)
    check_same_device(q=q, k=k, v=v, cu_seqlens=None if varlen is None else varlen.cu_seqlens,
                      key_padding_mask=key_padding_mask)
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
    softcap = _check_softcap(softcap, backend)
    off_triton = d % 8 or d > TRITON_MAX_HEAD_DIM
    _, fn = _registry.select(OP, "torch" if backend == "auto" and off_triton else backend, q.device, q.dtype)
    return fn(q, k, v, varlen, key_padding_mask, bool(causal), window, float(softmax_scale), bool(return_lse),
              softcap)


def _check_one_run(key_padding_mask: torch.Tensor) -> None:
    """With a window the distance between tokens is their distance in the row, which packing keeps only when every
    row's real tokens are one run (right or left padding): a ValueError otherwise (one device-to-host copy)."""
    starts = key_padding_mask[:, :1].int() + (key_padding_mask[:, 1:] & ~key_padding_mask[:, :-1]).sum(1, keepdim=True)
    if bool((starts > 1).any()):
        raise ValueError("key_padding_mask must mark one run of real tokens per row (right or left padding) when a "
                         "window is given: token distances inside a window are counted in that run")


def _check_softcap(softcap, backend: str):
    """``softcap`` as a float in (0, MAX_SOFTCAP), or None; a ValueError naming it otherwise."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < MAX_SOFTCAP:
        raise ValueError(f"softcap must be a positive float below {MAX_SOFTCAP:g} (the attention logits' cap, "
                         f"scaled in fp32), or None, got {softcap!r}")
    if backend == "cuda":
        raise ValueError("backend 'cuda' of flash_attention has no softcap (soft-capped logits): use 'triton', "
                         "'torch' or 'auto'")
    return float(softcap)


def _check_window(window):
    """``window`` as a tuple of two ints >= 0, or None; a ValueError naming it otherwise."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2 or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in window):
        raise ValueError(f"window must be a pair of ints (left, right) >= 0, or None, got {window!r}")
    return int(window[0]), int(window[1])


def window_masks_nothing(window, causal: bool, longest: int) -> bool:
    """Whether ``window=(left, right)`` (or None) reaches every key of a ``longest``-token sequence (a model's
    4096-token sliding window over 512-token texts): then it is no window."""
    return window is None or (window[0] >= longest - 1 and (causal or window[1] >= longest - 1))


def _effective_window(window, causal: bool, longest: int, backend: str):
    """``window``, or None where it masks nothing (``window_masks_nothing``). A ValueError for backend 'cuda', which
    has no window, otherwise."""
    if window_masks_nothing(window, causal, longest):
        return None
    if backend == "cuda":
        raise ValueError(f"backend 'cuda' of flash_attention has no window (local attention), and window={window} "
                         f"is narrower than the longest sequence ({longest} tokens): use 'triton', 'torch' or 'auto'")
    return window
