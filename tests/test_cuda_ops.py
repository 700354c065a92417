"""backend 'cuda' (csrc/) against kalm_fast/reference, forward and backward. Needs a GPU and a CUDA build
of kalm_fast._C; skipped otherwise (the CPU-side checks of the same code are in test_native.py)."""
from __future__ import annotations

import itertools

import pytest
import torch

from kalm_fast import _native, _registry
from kalm_fast.reference.attention import flash_attention_reference
from kalm_fast.reference.mean_pool import mean_pool as mean_pool_reference

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if _native.cuda_unavailable() is not None:
    pytest.skip(_native.cuda_unavailable(), allow_module_level=True)

import kalm_fast.ops  # noqa: E402,F401  (registers the backends)
from kalm_fast.cuda.attention import flash_attention_cuda  # noqa: E402
from kalm_fast.cuda.focal_infonce import focal_infonce_cuda  # noqa: E402
from kalm_fast.cuda.mean_pool import mean_pool_cuda  # noqa: E402

DEV = "cuda"


def tolerance(op, dtype):
    table = _registry.backends(op)
    name = "cuda" if "cuda" in table else "triton"
    return table[name].tolerances[dtype]


def close(actual, expected, op, dtype):
    atol, rtol = tolerance(op, dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------- mean_pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,dim,normalize", [(24, None, False), (7, 5, True), (896, 512, True), (136, 136, False)])
@pytest.mark.parametrize("layout", ["padded_bool", "padded_int", "padded_none", "packed"])
def test_mean_pool(dtype, H, dim, normalize, layout):
    torch.manual_seed(0)
    dim = dim or H
    if layout == "packed":
        lengths = [3, 0, 17, 1, 129]
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=DEV)
        hidden, mask = torch.randn(sum(lengths), H, device=DEV, dtype=dtype), None
    else:
        cu = None
        hidden = torch.randn(4, 33, H, device=DEV, dtype=dtype)
        mask = (torch.rand(4, 33, device=DEV) > 0.3)
        mask[1] = False  # an empty sequence
        mask = {"padded_bool": mask, "padded_int": mask.long(), "padded_none": None}[layout]
    x = hidden.clone().requires_grad_()
    out = mean_pool_cuda(x, mask, cu, dim, normalize, 1e-12)
    xr = hidden.clone().requires_grad_()
    ref = mean_pool_reference(xr, mask, cu_seqlens=cu, dim=dim, normalize=normalize)
    close(out, ref, "mean_pool", dtype)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    close(x.grad, xr.grad, "mean_pool", dtype)


def test_mean_pool_unaligned_view():
    base = torch.randn(2, 9, 70, device=DEV, dtype=torch.float16)
    hidden = base[:, :, 3:67]  # 6-byte offset, row stride 70: scalar loads
    out = mean_pool_cuda(hidden, None, None, 64, True, 1e-12)
    close(out, mean_pool_reference(hidden, None, dim=64, normalize=True), "mean_pool", torch.float16)


def test_mean_pool_op_backend_cuda():
    if "cuda" not in _registry.backends("mean_pool"):
        pytest.skip("backend 'cuda' of mean_pool is not registered")
    from kalm_fast.ops import mean_pool

    h = torch.randn(3, 10, 64, device=DEV, dtype=torch.bfloat16)
    m = torch.ones(3, 10, dtype=torch.bool, device=DEV)
    close(mean_pool(h, m, backend="cuda"), mean_pool_reference(h, m), "mean_pool", torch.bfloat16)


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (4, 4, 128), (2, 1, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_packed(dtype, hq, hkv, d, causal):
    torch.manual_seed(0)
    lengths = [1, 17, 0, 129, 64, 200]
    T = sum(lengths)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=DEV)
    q = torch.randn(T, hq, d, device=DEV, dtype=dtype)
    k, v = torch.randn(T, hkv, d, device=DEV, dtype=dtype), torch.randn(T, hkv, d, device=DEV, dtype=dtype)
    out, lse = flash_attention_cuda(q, k, v, cu, max(lengths), None, causal, d ** -0.5, True)
    ref_out, ref_lse = flash_attention_reference(q, k, v, cu, max(lengths), None, causal, d ** -0.5, True)
    close(out, ref_out, "flash_attention", dtype)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_padded(masked):
    torch.manual_seed(0)
    q = torch.randn(3, 40, 4, 64, device=DEV, dtype=torch.float16)
    k, v = torch.randn(3, 40, 2, 64, device=DEV, dtype=torch.float16), torch.randn(3, 40, 2, 64, device=DEV,
                                                                                   dtype=torch.float16)
    mask = None
    if masked:
        mask = torch.arange(40, device=DEV)[None, :] < torch.tensor([40, 7, 1], device=DEV)[:, None]
    out = flash_attention_cuda(q, k, v, None, None, mask, False, 0.125, False)
    ref = flash_attention_reference(q, k, v, None, None, mask, False, 0.125, False)
    close(out, ref, "flash_attention", torch.float16)


def test_attention_strided_heads():
    """q, k, v as views of one fused qkv projection (strided tokens)."""
    qkv = torch.randn(50, 8, 64, device=DEV, dtype=torch.bfloat16)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    cu = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEV)
    out = flash_attention_cuda(q, k, v, cu, 30, None, False, 0.125, False)
    close(out, flash_attention_reference(q, k, v, cu, 30, None, False, 0.125), "flash_attention", torch.bfloat16)


def test_attention_rejects_training():
    q = torch.randn(4, 2, 64, device=DEV, dtype=torch.float16, requires_grad=True)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="forward-only"):
        flash_attention_cuda(q, q, q, cu, 4, None, False, 0.125, False)


# ---------------------------------------------------------------------------------------------- focal_infonce


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,M,D", [(5, 0, 64), (70, 3, 136), (130, 7, 896)])
@pytest.mark.parametrize("similarity,in_batch,margin,S", [("cos", True, None, 0), ("cos", True, 0.1, 2),
                                                          ("dot", False, None, 0), ("cos", False, 0.05, 3)])
def test_focal_infonce(dtype, B, M, D, similarity, in_batch, margin, S):
    from kalm_fast.ops.focal_infonce import _torch_backend

    torch.manual_seed(0)
    q = torch.randn(B, D, device=DEV, dtype=dtype)
    docs = torch.randn(B, 1 + M, D, device=DEV, dtype=dtype)
    if similarity == "dot":
        q, docs = q * 0.1, docs * 0.1
    synthetic = torch.nn.functional.normalize(torch.randn(B, S, D, device=DEV), dim=-1) if S else None
    temperature = 0.05
    results = []
    for fn in (focal_infonce_cuda, _torch_backend):
        qq, dd = q.clone().requires_grad_(), docs.clone().requires_grad_()
        log_p, pos, neg = fn(qq, dd, synthetic, temperature, similarity, in_batch, margin)
        (log_p * torch.linspace(-1, 1, B, device=DEV)).sum().backward()
        results.append((log_p, pos, neg, qq.grad, dd.grad))
    got, ref = results
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    for a, b in zip(got[3:], ref[3:]):
        close(a, b, "focal_infonce", dtype)


def test_focal_infonce_op_backend_cuda():
    if "cuda" not in _registry.backends("focal_infonce"):
        pytest.skip("backend 'cuda' of focal_infonce is not registered")
    from kalm_fast.ops import focal_infonce

    q = torch.randn(8, 64, device=DEV, dtype=torch.bfloat16)
    docs = torch.randn(8, 4, 64, device=DEV, dtype=torch.bfloat16)
    a = focal_infonce(q, docs, backend="cuda")
    b = focal_infonce(q, docs, backend="torch")
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
