"""kalm_fast.models.decoder_kernels: the Triton SiLU-multiply and RoPE of the packed decoder's GPU path against the
torch ops they replace (odd shapes, strided per-head views, head halves that are not a power of two), and the
packed decoder taking them (in the interpreter on CPU, compiled on a GPU)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRET

from kalm_fast.models import EmbeddingModel, decoder_packed

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


@pytest.mark.parametrize("kind", ["qwen2-gqa14", "llama", "qwen3"])
def test_packed_decoder_takes_the_kernels(kind, tmp_path, monkeypatch):
    """The packed decoder with the Triton SiLU-multiply and RoPE (``fused=True``; on a GPU by default) equals its torch
    path in fp32: GQA 14:2, biases, Qwen3's q/k norms."""
    from transformers import AutoModel, AutoTokenizer

    from test_decoder_packed import BPE, TEXTS, _config

    torch.manual_seed(0)
    model = AutoModel.from_config(_config(kind))
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path))
    AutoTokenizer.from_pretrained(str(BPE)).save_pretrained(str(tmp_path))
    monkeypatch.setenv("KALM_PACKED_DECODER", "all")
    model = EmbeddingModel.from_pretrained(tmp_path, device=DEVICE)
    batch = model.pack(model.token_ids(TEXTS))
    from kalm_fast.models import decoder_kernels

    calls = []
    for name in ("silu_mul", "rope_"):
        real = getattr(decoder_kernels, name)
        monkeypatch.setattr(decoder_kernels, name,
                            lambda *a, _real=real, _name=name: (calls.append(_name), _real(*a))[1])
    decoder = model._packed_decoder
    decoder.onednn = False  # the kernels serve the one-GEMM gate/up projection (oneDNN fuses SiLU itself on CPU)
    with torch.no_grad():
        decoder.fused = False
        want = decoder(batch)
        assert calls == []
        decoder.fused = None if DEVICE == "cuda" else True
        got = decoder(batch)
    layers = len(model.model.layers)
    assert calls.count("silu_mul") == layers and calls.count("rope_") == 2 * layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
