"""Backend ``torch`` of ``mean_pool``: vectorized pure PyTorch in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool_torch(hidden, mask, varlen, dim, normalize, eps):
    """One ``index_add`` over the packed rows, or one batched matmul with the padded mask."""
    x = hidden[..., :dim].float()
    if varlen is not None:
        lengths = (varlen.cu_seqlens[1:] - varlen.cu_seqlens[:-1]).long()
        seq_ids = torch.repeat_interleave(torch.arange(varlen.num_seqs, device=x.device), lengths,
                                          output_size=x.shape[0])
        total = x.new_zeros(varlen.num_seqs, dim).index_add(0, seq_ids, x)
        count = lengths.float()
    else:
        m = (torch.ones(x.shape[:2], device=x.device) if mask is None else mask).to(x.dtype)
        total = torch.bmm(m.unsqueeze(1), x).squeeze(1)
        count = m.sum(dim=1)
    out = total / count.clamp(min=1.0).unsqueeze(-1)
    if normalize:
        out = F.normalize(out, p=2.0, dim=-1, eps=eps)
    return out.to(hidden.dtype)
