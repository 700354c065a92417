"""kalm_fast.models.decoder_kernels: the Triton SiLU-multiply, RoPE and residual-add RMSNorm of the decoders' GPU
paths against the torch ops they replace, forward and backward (odd shapes, strided per-head views, head halves
that are not a power of two), in the interpreter on CPU, compiled on a GPU (the decoders taking them:
tests/test_decoder_packed.py)."""
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


def _assert_rounded_once(got, want, dtype):
    """``got`` (``dtype``) is the fp32 ``want`` rounded once: within the tolerance, and for half precision equal to
    ``want.to(dtype)`` in all but 1% of the elements, or one (math that rounded an intermediate to half would differ
    in many; the GPU's approximate exp and rsqrt may flip a rare rounding, also in the small cases)."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    if dtype != torch.float32:
        assert int((got != want.to(dtype)).sum()) <= max(1, 0.01 * got.numel())


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
    _assert_rounded_once(got, want, dtype)
    atol, rtol = TOL[dtype]
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
    _assert_rounded_once(x, want, dtype)
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
    _assert_rounded_once(got, want, dtype)
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


def _add_rms_norm_torch(residual, delta, weight, eps):
    """transformers' residual add then RMSNorm (``weight * x / rms(x)``), the norm in fp32."""
    total = residual + delta
    x = total.float()
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)), total


# (residual, delta, weight) dtypes: one dtype throughout (a model run in it), and training's autocast: an fp32
# residual stream and weight beside a half-precision attention output (the normed output in the autocast dtype)
ADD_NORM_DTYPES = [(torch.float32,) * 3, (torch.float16,) * 3, (torch.float32, torch.float16, torch.float32)] + (
    [(torch.bfloat16,) * 3, (torch.float32, torch.bfloat16, torch.float32)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtypes", ADD_NORM_DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("tokens,hidden", [(0, 64), (1, 1), (37, 896), (40, 80), (300, 48), (3, 33), (2, 4100)])
def test_add_rms_norm_matches_torch(tokens, hidden, dtypes):
    """Forward (the normed output and the sum) and backward (residual, delta, weight; both outputs get a gradient:
    the sum is the residual stream) against the torch ops in fp32: rows not a power of two, one column, backward
    programs of several rows with a shorter last one (37 rows: 5 per program in the interpreter; 300 rows: 32, the
    most), no tokens, 4100 columns (a 8192-wide block)."""
    from kalm_fast.models.decoder_kernels import add_rms_norm

    res_dtype, delta_dtype, weight_dtype = dtypes
    half = delta_dtype if delta_dtype != torch.float32 else None
    residual = _randn(tokens, hidden, dtype=res_dtype).requires_grad_()
    delta = _randn(tokens, hidden, dtype=delta_dtype, seed=1).requires_grad_()
    weight = (1 + 0.3 * _randn(hidden, seed=2)).to(weight_dtype).requires_grad_()
    normed, total = add_rms_norm(residual, delta, weight, 1e-6, half)
    grads = (_randn(tokens, hidden, dtype=normed.dtype, seed=3), _randn(tokens, hidden, dtype=total.dtype, seed=4))
    got_grads = torch.autograd.grad((normed, total), (residual, delta, weight), grads)
    # the forward in the inputs' dtypes (the sum rounded as torch's add rounds it, the norm in fp32 over it), the
    # backward in fp32
    want, want_total = _add_rms_norm_torch(residual.detach(), delta.detach(), weight.detach(), 1e-6)
    ref = [t.detach().float().requires_grad_() for t in (residual, delta, weight)]
    want_grads = torch.autograd.grad(_add_rms_norm_torch(*ref, 1e-6), ref, [g.float() for g in grads])
    assert normed.dtype == (half or res_dtype) and total.dtype == torch.promote_types(res_dtype, delta_dtype)
    assert [g.dtype for g in got_grads] == list(dtypes)
    torch.testing.assert_close(total, want_total, atol=0, rtol=0)
    _assert_rounded_once(normed, want, normed.dtype)
    for got, expected, dtype in zip(got_grads, want_grads, dtypes):
        atol, rtol = TOL[dtype if half is None or dtype != torch.float32 else half]
        torch.testing.assert_close(got.float(), expected, atol=atol * 10 * max(1, tokens ** 0.5), rtol=rtol * 10)


def test_add_rms_norm_keeps_leading_dims_and_strided_inputs():
    """transformers' [B, L, H] hidden states, a delta that is a strided view (the first half of each row of a wider
    tensor), a weight that is one too (every other element) and a transposed incoming gradient."""
    from kalm_fast.models.decoder_kernels import add_rms_norm

    residual = _randn(2, 3, 24).requires_grad_()
    wide = _randn(2, 3, 48, seed=1).requires_grad_()
    delta = wide[..., :24]
    weight = (1 + 0.3 * _randn(48, seed=2))[::2].requires_grad_()
    grad = _randn(2, 24, 3, seed=3).transpose(1, 2)
    normed, total = add_rms_norm(residual, delta, weight, 1e-5)
    (normed + total).backward(grad)
    ref = [t.detach().clone().requires_grad_() for t in (residual, delta, weight)]
    want, want_total = _add_rms_norm_torch(*ref, 1e-5)
    (want + want_total).backward(grad)
    assert normed.shape == total.shape == (2, 3, 24)
    torch.testing.assert_close(normed, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, want_total, atol=0, rtol=0)
    for got, expected in zip((residual.grad, wide.grad[..., :24], weight.grad), (t.grad for t in ref)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not wide.grad[..., 24:].any()


def test_add_rms_norm_checks_its_input():
    from kalm_fast.models.decoder_kernels import add_rms_norm

    with pytest.raises(ValueError, match="residual and delta must be"):
        add_rms_norm(_randn(3, 4), _randn(3, 5), _randn(4), 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \[4\]"):
        add_rms_norm(_randn(3, 4), _randn(3, 4), _randn(5), 1e-6)
