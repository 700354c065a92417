"""kalm_fast.models.decoder_kernels: the Triton SiLU-multiply and RoPE of the packed decoder's GPU path against the
torch ops they replace (odd shapes, strided per-head views, head halves that are not a power of two), in the
interpreter on CPU, compiled on a GPU (the decoder taking them: tests/test_decoder_packed.py)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRET

from kalm_fast.models import decoder_packed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET,
                                                  reason="needs a CUDA device or TRITON_INTERPRET=1")]
# bf16 elementwise math is checked on a GPU only (the interpreter's bf16 is not the GPU's)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(0, 8), (1, 1), (7, 5), (3, 1300), (5, 2048)])
def test_silu_mul_matches_torch(tokens, inter, dtype):
    """Against silu(gate) * up in fp32 (the kernel rounds once; torch's two ops twice): more than one block of
    columns, a partial last block, one column, no tokens."""
    from kalm_fast.models.decoder_kernels import silu_mul

    gate_up = _randn(tokens, 2 * inter, dtype=dtype)
    got = silu_mul(gate_up)
    gate, up = gate_up.float().chunk(2, dim=1)
    assert got.shape == (tokens, inter) and got.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), F.silu(gate) * up, atol=atol, rtol=rtol)


def test_silu_mul_checks_its_input():
    from kalm_fast.models.decoder_kernels import silu_mul

    with pytest.raises(ValueError, match=r"gate_up must be \[T, 2I\]"):
        silu_mul(_randn(3, 5))
    with pytest.raises(ValueError, match="contiguous last dim"):
        silu_mul(_randn(4, 3).t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,head_dim", [(0, 2, 64), (1, 1, 16), (37, 14, 64), (9, 17, 80), (5, 2, 128)])
def test_rope_matches_torch(tokens, heads, head_dim, dtype):
    """The per-head view of a fused QKV projection (row stride past its heads), rotated in place, against the torch
    version in fp32; 17 heads take two programs per token, head dim 80 a half of 40 columns; the rest of the row
    is left as it was."""
    from kalm_fast.models.decoder_kernels import rope_

    qkv = _randn(tokens, (heads + 3) * head_dim, dtype=dtype)
    x = qkv[:, head_dim:(heads + 1) * head_dim].view(tokens, heads, head_dim)
    angles = _randn(tokens, head_dim // 2, seed=1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want = x.float().clone()
    decoder_packed._rope_(want, cos.float(), sin.float())
    before = qkv.clone()
    rope_(x, cos, sin)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(x.float(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(qkv[:, :head_dim], before[:, :head_dim], atol=0, rtol=0)
    torch.testing.assert_close(qkv[:, (heads + 1) * head_dim:], before[:, (heads + 1) * head_dim:], atol=0, rtol=0)


def test_rope_checks_its_input():
    from kalm_fast.models.decoder_kernels import rope_

    x, cos = _randn(3, 2, 8), _randn(3, 4)
    with pytest.raises(ValueError, match=r"cos/sin \[T, D/2\]"):
        rope_(x, cos[:, :3], cos[:, :3])
    with pytest.raises(ValueError, match="D even"):
        rope_(_randn(3, 2, 7), cos, cos)
    with pytest.raises(ValueError, match="contiguous last dim"):
        rope_(_randn(3, 8, 2).transpose(1, 2), cos, cos)
