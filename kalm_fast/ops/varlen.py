"""``Varlen``: the sequence boundaries of a packed batch, checked once.

The packed layout puts N sequences one after the other in ``[T, ...]`` tensors; ``cu_seqlens`` int32 ``[N+1]``
holds their boundaries (``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[-1] = T``; empty sequences allowed).
Checking a ``cu_seqlens`` tensor that lives on a GPU costs a device-to-host copy, a synchronization. A ``Varlen``
is checked when it is built and keeps the lengths on the host: the ops take it instead of a raw ``cu_seqlens``
and check nothing more than the token count and the device, so a model that calls attention in every layer
validates its batch once (``models.packing.PackedBatch`` builds one from the token counts it already has).
What a backend derives from the lengths (the Triton attention's work list) is built once per ``Varlen`` too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .._checks import check_tensor
from .._cuda import to_device


@dataclass(frozen=True, eq=False)
class Varlen:
    """Checked boundaries: ``cu_seqlens`` int32 ``[N+1]`` (on the batch's device) and the same lengths on the host."""

    cu_seqlens: torch.Tensor
    lengths: tuple
    _derived: dict = field(default_factory=dict, init=False, repr=False)

    def derived(self, key, build: Callable):
        """``build()``, computed once per ``key`` for the life of this batch (e.g. a kernel's work list, which every
        layer of a model then reuses)."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device=None) -> "Varlen":
        """From per-sequence token counts (ints >= 0), without any device synchronization."""
        if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__iter__"):
            raise TypeError(f"lengths must be a sequence of ints >= 0, got {type(lengths).__name__}")
        lengths = tuple(lengths)
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"lengths must be ints >= 0, item {i} is {n!r}")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=cu[1:])
        return cls(to_device(cu, "cpu" if device is None else device), lengths)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, total: int, *, name: str = "cu_seqlens") -> "Varlen":
        """Checks a raw ``cu_seqlens`` tensor for ``total`` packed tokens (one host copy of its values)."""
        check_tensor(name, cu_seqlens, ndim=1)
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"{name} must be torch.int32 (as flash-attention's varlen API), got {cu_seqlens.dtype}")
        if cu_seqlens.numel() < 1:
            raise ValueError(f"{name} must have N+1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {bounds[0]}")
        lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        if any(n < 0 for n in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {bounds[:16]}")
        if bounds[-1] != total:
            raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {bounds[-1]}")
        return cls(cu_seqlens.contiguous(), lengths)  # the kernels read entry n at offset n


def as_varlen(cu_seqlens: Union[torch.Tensor, Varlen], total: int, *, name: str = "cu_seqlens") -> Varlen:
    """A ``Varlen`` for ``total`` packed tokens from either a ``Varlen`` (only its total is checked) or a raw tensor."""
    if isinstance(cu_seqlens, Varlen):
        if cu_seqlens.total != total:
            raise ValueError(f"{name} describes {cu_seqlens.total} packed tokens, the input has {total}")
        return cu_seqlens
    return Varlen.from_cu_seqlens(cu_seqlens, total, name=name)


def sequence_layout(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> tuple:
    """``(N, L, stride per sequence, stride per token)`` of a packed ``x [T, ...]`` (``L = 0``: lengths come from
    ``cu_seqlens``) or a padded ``x [B, L, ...]``, as the pooling kernels walk them."""
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1, 0, 0, x.stride(0)
    return x.shape[0], x.shape[1], x.stride(0), x.stride(1)
