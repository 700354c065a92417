"""Argument checks shared by the ops. Every message names the argument and what was expected."""
from __future__ import annotations

import numbers
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
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(x.shape)}")
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


def check_mask(name: str, mask, shape: tuple) -> torch.Tensor:
    """A ``[B, L]`` mask, bool or 0/1 integers/floats, with the given shape."""
    check_tensor(name, mask, ndim=2)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ([B, L]), got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    return mask


def check_int(name: str, value, *, low: int = 1, allow_none: bool = True) -> Optional[int]:
    """``value`` as an int >= ``low`` (numpy ints pass, bools and floats do not), or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)
