"""Argument checks shared by the ops. Every message names the argument and what was expected."""
from __future__ import annotations

import weakref
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, x, *, ndim=None, dtypes=None) -> torch.Tensor:
    """``x`` is a tensor with ``ndim`` dimensions (an int or a tuple of allowed ints) and one of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    return x


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors (None skipped) are on one device; returns it."""
    named = [(k, v) for k, v in tensors.items() if v is not None]
    device = named[0][1].device
    for k, v in named[1:]:
        if v.device != device:
            raise ValueError(f"{k} is on {v.device} but {named[0][0]} is on {device}; move them to one device")
    return device


# The last cu_seqlens that passed the value checks, with its version counter and total: a model calls
# attention once per layer with the same tensor, and the value checks need a device-to-host copy.
_last_valid_cu_seqlens: list = [None, -1, -1]


def check_cu_seqlens(cu_seqlens, total: int, *, name: str = "cu_seqlens") -> torch.Tensor:
    """``cu_seqlens`` is int32 ``[N+1]``, starts at 0, is non-decreasing and ends at ``total``."""
    check_tensor(name, cu_seqlens, ndim=1)
    # Inference tensors have no version counter: they are validated every time.
    cacheable = not cu_seqlens.is_inference()
    ref, version, last_total = _last_valid_cu_seqlens
    if (cacheable and ref is not None and ref() is cu_seqlens and version == cu_seqlens._version
            and last_total == total):
        return cu_seqlens
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32 (as flash-attention's varlen API), got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must have N+1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    host = cu_seqlens.detach().cpu()
    if int(host[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(host[0])}")
    if host.numel() > 1 and bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {host.tolist()[:16]}")
    if int(host[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {int(host[-1])}")
    if cacheable:
        _last_valid_cu_seqlens[:] = [weakref.ref(cu_seqlens), cu_seqlens._version, total]
    return cu_seqlens


def check_mask(name: str, mask, shape: tuple) -> torch.Tensor:
    """A ``[B, L]`` mask, bool or 0/1 integers/floats, with the given shape."""
    check_tensor(name, mask, ndim=2)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ([B, L]), got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    return mask
