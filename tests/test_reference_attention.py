"""The attention oracle against a hand-computed case and against torch's scaled_dot_product_attention."""
import math

import pytest
import torch
import torch.nn.functional as F

from kalm_fast.ops.attention.reference import flash_attention as flash_attention_reference


def test_hand_computed_two_tokens():
    # one head, D = 1, scale 1: token 0 sees scores (1*1, 1*2) = (1, 2), token 1 sees (2*1, 2*2) = (2, 4)
    q = torch.tensor([[[1.0]], [[2.0]]])
    k = torch.tensor([[[1.0]], [[2.0]]])
    v = torch.tensor([[[10.0]], [[20.0]]])
    cu = torch.tensor([0, 2], dtype=torch.int32)
    out, lse = flash_attention_reference(q, k, v, cu, 2, None, False, softmax_scale=1.0, return_lse=True)
    p0 = math.exp(1) / (math.exp(1) + math.exp(2))
    p1 = math.exp(2) / (math.exp(2) + math.exp(4))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([10 * p0 + 20 * (1 - p0), 10 * p1 + 20 * (1 - p1)]))
    torch.testing.assert_close(lse[0], torch.tensor([math.log(math.exp(1) + math.exp(2)),
                                                     math.log(math.exp(2) + math.exp(4))]))
    causal = flash_attention_reference(q, k, v, cu, 2, None, True, softmax_scale=1.0)
    assert causal[0, 0, 0].item() == 10.0  # the first token sees only itself


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (14, 2)])
def test_padded_matches_sdpa(causal, hq, hkv):
    g = torch.Generator().manual_seed(0)
    B, L, D = 3, 9, 16
    q, k, v = (torch.randn(B, L, h, D, generator=g) for h in (hq, hkv, hkv))  # the oracle computes in fp32
    lengths = torch.tensor([9, 4, 1])
    mask = torch.arange(L)[None] < lengths[:, None]
    out = flash_attention_reference(q, k, v, None, None, mask, causal)
    allowed = mask[:, None, None, :] & mask[:, None, :, None]
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=allowed, enable_gqa=True).transpose(1, 2)
    real = mask[:, :, None, None].expand_as(out)
    torch.testing.assert_close(out[real], want[real])
    assert torch.count_nonzero(out[~real]) == 0  # padded query rows are zeros, not NaN
