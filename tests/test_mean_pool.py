import pytest
import torch
import torch.nn.functional as F

from kalm_fast import _registry
from kalm_fast.ops import mean_pool
from kalm_fast.reference.mean_pool import mean_pool as reference_mean_pool

from conftest import INTERPRET, skip_unless_triton_runs, triton_device

BACKENDS = ["torch", "triton"]


def _device(backend):
    if backend == "triton":
        skip_unless_triton_runs()
        return triton_device()
    return "cpu"


def _padded_case(dtype, device, B=4, L=13, H=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g).to(device=device, dtype=dtype)
    lengths = torch.tensor([0, 1, L, 7][:B])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return hidden, mask.to(device)


def _packed_case(dtype, device, lengths=(0, 1, 17, 5, 0, 33), H=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(lengths), H, generator=g).to(device=device, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return hidden, cu


def _check_against_reference(backend, hidden, kwargs, dtype):
    atol, rtol = _registry.backends("mean_pool")[backend].tolerances[dtype]
    x = hidden.detach().clone().requires_grad_(True)
    x_ref = hidden.detach().clone().requires_grad_(True)
    out = mean_pool(x, **kwargs, backend=backend)
    ref = reference_mean_pool(x_ref, kwargs.get("attention_mask"), cu_seqlens=kwargs.get("cu_seqlens"),
                              dim=kwargs.get("dim"), normalize=kwargs.get("normalize", False))
    assert out.dtype == hidden.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    (gr,) = torch.autograd.grad(ref, x_ref, grad)
    torch.testing.assert_close(gx.float(), gr.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim,normalize", [(None, False), (None, True), (24, False), (7, True)])
def test_padded_matches_reference(backend, dtype, dim, normalize):
    hidden, mask = _padded_case(dtype, _device(backend))
    _check_against_reference(backend, hidden, dict(attention_mask=mask, dim=dim, normalize=normalize), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim,normalize", [(None, False), (None, True), (33, True)])
def test_packed_matches_reference(backend, dtype, dim, normalize):
    hidden, cu = _packed_case(dtype, _device(backend))
    _check_against_reference(backend, hidden, dict(cu_seqlens=cu, dim=dim, normalize=normalize), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_and_no_mask(backend):
    device = _device(backend)
    hidden, mask = _padded_case(torch.float32, device)
    _check_against_reference(backend, hidden, dict(attention_mask=mask.float()), torch.float32)
    _check_against_reference(backend, hidden, dict(normalize=True), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_crosses_blocks(backend):
    """Lengths past one token block and a hidden size that is not a power of two."""
    hidden, cu = _packed_case(torch.float32, _device(backend), lengths=(129, 3, 70), H=96)
    _check_against_reference(backend, hidden, dict(cu_seqlens=cu, normalize=True), torch.float32)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_sequences_are_zero_and_tiny_vectors_normalize_like_F_normalize(backend):
    device = _device(backend)
    hidden = torch.zeros(3, 4, 8, device=device)
    hidden[1, 0] = 1e-14
    mask = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], device=device)
    out = mean_pool(hidden, mask, normalize=True, backend=backend)
    assert torch.equal(out[0], torch.zeros(8, device=device))
    torch.testing.assert_close(out[1], F.normalize(hidden[1, :1].mean(0), dim=0, eps=1e-12))
    assert not out.isnan().any()


def test_reference_hand_computed():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert reference_mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]
    assert reference_mean_pool(hidden, mask, dim=1).tolist() == [[2.0]]
    torch.testing.assert_close(reference_mean_pool(hidden, mask, normalize=True),
                               torch.tensor([[2.0, 3.0]]) / 13 ** 0.5)
    packed = torch.tensor([[1.0, 1.0], [3.0, 5.0], [7.0, 9.0]])
    cu = torch.tensor([0, 1, 1, 3], dtype=torch.int32)
    assert reference_mean_pool(packed, cu_seqlens=cu).tolist() == [[1.0, 1.0], [0.0, 0.0], [5.0, 7.0]]


def test_packed_equals_padded():
    hidden, mask = _padded_case(torch.float32, "cpu")
    lengths = mask.sum(1)
    packed = hidden[mask]
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    torch.testing.assert_close(mean_pool(packed, cu_seqlens=cu), mean_pool(hidden, mask))


def test_auto_picks_torch_on_cpu():
    assert _registry.select("mean_pool", "auto", torch.device("cpu"), torch.float32).name == "torch"


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mean_pool(torch.randn(2, 3, 4), backend="triton")


@pytest.mark.parametrize("call,error,match", [
    (lambda: mean_pool([1.0]), TypeError, "hidden must be a torch.Tensor"),
    (lambda: mean_pool(torch.randn(4)), ValueError, "hidden must have 2 or 3 dimensions"),
    (lambda: mean_pool(torch.randn(4, 3)), ValueError, "needs cu_seqlens"),
    (lambda: mean_pool(torch.randn(2, 3, 4), torch.ones(2, 4)), ValueError, r"attention_mask must have shape \(2, 3\)"),
    (lambda: mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32)),
     ValueError, "not both"),
    (lambda: mean_pool(torch.randn(5, 4), cu_seqlens=torch.tensor([0, 5])), TypeError, "int32"),
    (lambda: mean_pool(torch.randn(5, 4), cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), ValueError,
     "non-decreasing"),
    (lambda: mean_pool(torch.randn(5, 4), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)), ValueError, r"\[-1\]"),
    (lambda: mean_pool(torch.randn(5, 4), cu_seqlens=torch.tensor([1, 5], dtype=torch.int32)), ValueError, r"\[0\]"),
    (lambda: mean_pool(torch.randn(2, 3, 4), dim=5), ValueError, "dim must be"),
    (lambda: mean_pool(torch.randn(2, 3, 4), dim=0), ValueError, "dim must be"),
    (lambda: mean_pool(torch.randn(2, 3, 4, dtype=torch.float64)), TypeError, "hidden must have dtype"),
    (lambda: mean_pool(torch.randn(2, 3, 4), backend="fast"), ValueError, "backend must be one of"),
    (lambda: mean_pool(torch.randn(2, 3, 4), eps=0.0), ValueError, "eps must be > 0"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_triton_rejects_non_contiguous_last_dim():
    with pytest.raises(ValueError, match="contiguous last dimension"):
        mean_pool(torch.randn(2, 4, 3).transpose(1, 2), backend="triton")


def test_cu_seqlens_checked_again_after_in_place_change():
    hidden = torch.randn(5, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    mean_pool(hidden, cu_seqlens=cu)
    cu[1] = 7  # bumps the version counter: the cached validation must not be trusted
    with pytest.raises(ValueError, match="non-decreasing"):
        mean_pool(hidden, cu_seqlens=cu)


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match="runs on \\['cuda'\\] tensors, got cpu"):
        mean_pool(torch.randn(2, 3, 4), backend="cuda")


def test_packed_input_made_under_inference_mode():
    with torch.inference_mode():
        hidden = torch.randn(5, 4)
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        torch.testing.assert_close(mean_pool(hidden, cu_seqlens=cu), mean_pool(hidden, cu_seqlens=cu, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_any_nonzero_mask_value_counts_as_one(backend):
    device = _device(backend)
    hidden = torch.randn(1, 3, 4, device=device)
    weighted = mean_pool(hidden, torch.tensor([[2.0, 1.0, 0.0]], device=device), backend=backend)
    torch.testing.assert_close(weighted, hidden[:, :2].mean(1))


def test_auto_never_prefers_the_unverified_cuda_backends():
    for op in ("mean_pool", "flash_attention", "focal_infonce"):
        table = _registry.backends(op)
        assert table["cuda"].rank > table["torch"].rank > table["triton"].rank
