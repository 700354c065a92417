"""kalm_fast.models.decoder_kernels: the Triton SiLU-multiply and RoPE of the decoders' GPU paths against the torch
ops they replace, forward and backward (odd shapes, strided per-head views, head halves that are not a power of
two), in the interpreter on CPU, compiled on a GPU (the decoders taking them: tests/test_decoder_packed.py)."""
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
    """Forward and backward against silu(gate) * up in fp32 (the kernels round once; torch's ops at each step), on
    the two halves of one gate-up projection (row stride 2I): more than one block of columns, a partial last block,
    one column, no tokens."""
    from kalm_fast.models.decoder_kernels import silu_mul

    gate_up = _randn(tokens, 2 * inter, dtype=dtype).requires_grad_()
    grad = _randn(tokens, inter, dtype=dtype, seed=1)
    got = silu_mul(*gate_up.chunk(2, dim=1))
    (got_grad,) = torch.autograd.grad(got, gate_up, grad)
    ref = gate_up.detach().float().requires_grad_()
    gate, up = ref.chunk(2, dim=1)
    want = F.silu(gate) * up
    (want_grad,) = torch.autograd.grad(want, ref, grad.float())
    assert got.shape == (tokens, inter) and got.dtype == dtype and got.is_contiguous()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_grad.float(), want_grad, atol=atol * 10, rtol=rtol)


def test_silu_mul_keeps_leading_dims_and_strided_gradients():
    """transformers' [B, L, I] projections, and an incoming gradient that is a transposed (non-contiguous) view."""
    from kalm_fast.models.decoder_kernels import silu_mul

    gate, up = (_randn(2, 3, 40, seed=s).requires_grad_() for s in (0, 1))
    grad = _randn(2, 40, 3, seed=2).transpose(1, 2)
    got = silu_mul(gate, up)
    got.backward(grad)
    ref_gate, ref_up = (x.detach().clone().requires_grad_() for x in (gate, up))
    (F.silu(ref_gate) * ref_up).backward(grad)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, F.silu(ref_gate) * ref_up, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gate.grad, ref_gate.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(up.grad, ref_up.grad, atol=1e-5, rtol=1e-5)


def test_silu_mul_checks_its_input():
    from kalm_fast.models.decoder_kernels import silu_mul

    with pytest.raises(ValueError, match="gate and up must be"):
        silu_mul(_randn(3, 5), _randn(3, 4))
    with pytest.raises(ValueError, match="one shape, dtype"):
        silu_mul(_randn(3, 4), _randn(3, 4, dtype=torch.float16))


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,head_dim", [(0, 2, 64), (1, 1, 16), (37, 14, 64), (9, 17, 80), (5, 2, 128)])
def test_rope_backward_rotates_back(tokens, heads, head_dim, dtype):
    """The differentiable ``rope``: a new tensor equal to the in-place rotation, the input left alone, and the
    gradient of the torch version (fp32) through a strided per-head view, cos/sin in fp32 beside fp16/bf16 x (what
    transformers hands over under autocast)."""
    from kalm_fast.models.decoder_kernels import rope

    qkv = _randn(tokens, (heads + 3) * head_dim, dtype=dtype).requires_grad_()
    x = qkv[:, head_dim:(heads + 1) * head_dim].view(tokens, heads, head_dim)
    angles = _randn(tokens, head_dim // 2, seed=1)
    cos, sin = angles.cos(), angles.sin()
    grad = _randn(tokens, heads, head_dim, dtype=dtype, seed=2)
    before = qkv.detach().clone()
    got = rope(x, cos, sin)
    (got_grad,) = torch.autograd.grad(got, qkv, grad)
    ref = qkv.detach().float().requires_grad_()
    ref_x = ref[:, head_dim:(heads + 1) * head_dim].view(tokens, heads, head_dim)
    half = head_dim // 2
    x1, x2 = ref_x[..., :half], ref_x[..., half:]
    want = torch.cat([x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]], -1)
    (want_grad,) = torch.autograd.grad(want, ref, grad.float())
    atol, rtol = TOL[dtype]
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_grad.float(), want_grad, atol=atol * 10, rtol=rtol)
    torch.testing.assert_close(qkv.detach(), before, atol=0, rtol=0)


def test_rope_checks_its_input():
    from kalm_fast.models.decoder_kernels import rope, rope_

    x, cos = _randn(3, 2, 8), _randn(3, 4)
    with pytest.raises(ValueError, match=r"cos/sin \[T, D/2\]"):
        rope_(x, cos[:, :3], cos[:, :3])
    with pytest.raises(ValueError, match=r"x \[T, heads, D\]"):
        rope(x[0], cos, cos)
    with pytest.raises(ValueError, match="D even"):
        rope_(_randn(3, 2, 7), cos, cos)
    with pytest.raises(ValueError, match="contiguous last dim"):
        rope_(_randn(3, 8, 2).transpose(1, 2), cos, cos)
