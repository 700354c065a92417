"""Backend ``torch`` of ``mean_pool``: vectorized pure PyTorch in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool_torch(hidden, mask, varlen, dim, normalize, eps):
    """One ``index_add`` over the packed rows, or a sum over the padded rows without the padding."""
    x = hidden[..., :dim].float()
    if varlen is not None:
        lengths = (varlen.cu_seqlens[1:] - varlen.cu_seqlens[:-1]).long()
        seq_ids = torch.repeat_interleave(torch.arange(varlen.num_seqs, device=x.device), lengths,
                                          output_size=x.shape[0])
        total = x.new_zeros(varlen.num_seqs, dim).index_add(0, seq_ids, x)
        count = lengths.float()
    else:
        if mask is None:
            total, count = x.sum(dim=1), x.new_full((x.shape[0],), x.shape[1])
        else:
            total, count = _masked_sum(x, mask), mask.sum(dim=1).to(x.dtype)
    out = total / count.clamp(min=1.0).unsqueeze(-1)
    if normalize:
        out = F.normalize(out, p=2.0, dim=-1, eps=eps)
    return out.to(hidden.dtype)


def _masked_sum(x, mask):
    """``[B, H]`` sums of the rows of ``x [B, L, H]`` where ``mask [B, L]`` is True; padding never enters, not even a
    NaN there. On CPU a matmul with the 0/1 mask (one read of ``x``), unless its result is not finite (``0 * NaN``
    may have spread a NaN of the padding); on CUDA (no host sync) and then, the rows with the padding zeroed."""
    if x.device.type == "cpu":
        total = torch.bmm(mask[:, None, :].to(x.dtype), x)[:, 0]
        if bool(torch.isfinite(total).all()):
            return total
    return x.masked_fill(~mask[..., None], 0.0).sum(dim=1)
