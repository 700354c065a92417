"""Texts to packed batches: ``PackedBatch``, ``pack`` and the token-budget batching of an encode.

A packed batch puts the tokens of N texts one after the other, without padding: ``input_ids [T]``,
``position_ids [T]`` (restarting at every text) and the texts' boundaries as a ``kalm_fast.ops.Varlen``, built from
the token counts that packing already has on the host. It is checked once, here, and every layer's attention and
the pooling trust it: no validation and no host synchronization inside the model's forward.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from .._cuda import to_device
from ..ops import Varlen

# Tokens per packed batch when the caller gives no budget (CPU: fits the caches; GPU: fills the device). Decoder LLMs
# on CPU: 1024 (`python -m benchmarks.encode --token-budgets 1024,4096`, Qwen2-0.5B-shaped, one thread: equal on short
# texts, 11-17% faster on the long-tailed mix; MiniLM is 4-35% faster at 4096).
DEFAULT_TOKENS = {"cpu": 4096, "cuda": 32768, "cpu-decoder": 1024}


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """``input_ids [T]`` and ``position_ids [T]`` (int64) of N texts packed back to back, and their ``varlen``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    varlen: Varlen

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self.varlen.cu_seqlens

    @property
    def max_seqlen(self) -> int:
        return self.varlen.max_seqlen

    @property
    def num_seqs(self) -> int:
        return self.varlen.num_seqs


def pack(ids: Sequence[Sequence[int]], *, device=None, position_offset: int = 0,
         pad_id: Optional[int] = None) -> PackedBatch:
    """A ``PackedBatch`` on ``device`` from token id lists; positions count from ``position_offset`` in every text.
    ``pad_id`` (RoBERTa's rule): tokens of that id take position ``pad_id`` and are not counted."""
    lengths = [len(x) for x in ids]
    counts = torch.tensor(lengths, dtype=torch.long)
    input_ids = torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts, output_size=input_ids.numel())
    if pad_id is None:
        position_ids = torch.arange(input_ids.numel()) - starts + position_offset
    else:
        counted = (input_ids != pad_id).long()
        before = counted.cumsum(0) - counted  # counted tokens before each token, from the batch's start
        in_text = counted.cumsum(0) - before[starts]  # counted tokens of its text up to and with each token
        position_ids = torch.where(counted.bool(), in_text - 1 + position_offset, pad_id)
    device = "cpu" if device is None else device
    return PackedBatch(to_device(input_ids, device), to_device(position_ids, device),
                       Varlen.from_lengths(lengths, device))


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, position_offset: int = 0,
                pad_id: Optional[int] = None) -> PackedBatch:
    """The real tokens of a padded batch (``input_ids [B, L]``, ``attention_mask [B, L]``, left or right padding) as
    a ``PackedBatch`` (one host copy of the mask)."""
    mask = attention_mask.bool().cpu()
    ids = input_ids.cpu()
    return pack([row[m].tolist() for row, m in zip(ids, mask)], device=input_ids.device,
                position_offset=position_offset, pad_id=pad_id)


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_sequences: Optional[int] = None, *,
                         padded: bool = False) -> Iterator[list]:
    """Indices grouped into batches of at most ``max_tokens`` tokens (``max_sequences`` texts), longest first.

    ``padded``: the batches run right-padded to their longest text (a model that keeps its own attention), so a
    batch counts as its number of texts times its first (longest) one's length. A text longer than ``max_tokens``
    gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch, tokens = [], 0
    for i in order:
        n = max(int(lengths[i]), 1)
        grown = (len(batch) + 1) * max(int(lengths[batch[0]]), 1) if padded and batch else tokens + n
        if batch and (grown > max_tokens or (max_sequences and len(batch) >= max_sequences)):
            yield batch
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        yield batch
