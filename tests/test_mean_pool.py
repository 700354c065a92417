"""mean_pool: every backend against the oracle, forward and backward, padded and packed; the oracle by hand."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRET, backend_params, cu_seqlens, tolerance

from kalm_fast import _registry
from kalm_fast.ops import Varlen, mean_pool
from kalm_fast.ops.mean_pool.reference import mean_pool as reference_mean_pool

OP = "mean_pool"
BACKENDS = backend_params(OP)


def _padded_case(dtype, device, B=4, L=13, H=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g).to(device=device, dtype=dtype)
    lengths = torch.tensor([0, 1, L, 7][:B])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return hidden, mask.to(device)


def _packed_case(dtype, device, lengths=(0, 1, 17, 5, 0, 33), H=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(lengths), H, generator=g).to(device=device, dtype=dtype)
    return hidden, cu_seqlens(lengths, device)


def _check_against_reference(backend, hidden, kwargs, dtype):
    """``mean_pool(hidden)`` and its gradient against the oracle's; ``hidden`` itself (strides and storage offset
    kept: a clone of a strided view would be dense) if it is a leaf that requires grad, else a copy."""
    atol, rtol = tolerance(OP, backend, dtype)
    x = hidden if hidden.is_leaf and hidden.requires_grad else hidden.detach().clone().requires_grad_(True)
    x_ref = hidden.detach().clone().requires_grad_(True)
    out = mean_pool(x, **kwargs, backend=backend)
    ref = reference_mean_pool(x_ref, kwargs.get("attention_mask"), cu_seqlens=kwargs.get("cu_seqlens"),
                              dim=kwargs.get("dim"), normalize=kwargs.get("normalize", False),
                              eps=kwargs.get("eps", 1e-12))
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
    hidden, mask = _padded_case(dtype, DEVICE)
    _check_against_reference(backend, hidden, dict(attention_mask=mask, dim=dim, normalize=normalize), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim,normalize", [(None, False), (None, True), (33, True)])
def test_packed_matches_reference(backend, dtype, dim, normalize):
    hidden, cu = _packed_case(dtype, DEVICE)
    _check_against_reference(backend, hidden, dict(cu_seqlens=cu, dim=dim, normalize=normalize), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_and_no_mask(backend):
    hidden, mask = _padded_case(torch.float32, DEVICE)
    _check_against_reference(backend, hidden, dict(attention_mask=mask.float()), torch.float32)
    _check_against_reference(backend, hidden, dict(normalize=True), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_mask_and_cu_seqlens(backend):
    """A mask stored transposed and a cu_seqlens that is every other entry of a tensor: read as their values."""
    hidden, mask = _padded_case(torch.float32, DEVICE)
    transposed = mask.t().contiguous().t()
    assert transposed.stride() == (1, mask.shape[0])
    _check_against_reference(backend, hidden, dict(attention_mask=transposed), torch.float32)
    _check_against_reference(backend, hidden, dict(attention_mask=transposed.float()), torch.float32)
    packed, cu = _packed_case(torch.float32, DEVICE)
    strided = torch.stack([cu, torch.full_like(cu, 99)], 1).reshape(-1)[::2]
    assert strided.stride() == (2,) and torch.equal(strided, cu)
    _check_against_reference(backend, packed, dict(cu_seqlens=strided, normalize=True), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_crosses_blocks(backend):
    """Lengths past one token block and a hidden size that is not a power of two."""
    hidden, cu = _packed_case(torch.float32, DEVICE, lengths=(129, 3, 70), H=96)
    _check_against_reference(backend, hidden, dict(cu_seqlens=cu, normalize=True), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_reaches_every_backend(backend):
    """Means shorter than ``eps`` are divided by ``eps``, not by their norm (forward and backward)."""
    hidden, cu = _packed_case(torch.float32, DEVICE, lengths=(3, 1, 6), H=24)
    hidden = hidden * torch.tensor([1e-4] * 4 + [1.0] * 6, device=DEVICE)[:, None]  # the first two means: tiny
    eps = 1e-2
    kalm = mean_pool(hidden, cu_seqlens=cu, normalize=True, eps=eps, backend=backend)
    assert kalm[:2].norm(dim=-1).max() < 0.1 and (kalm[2].norm() - 1).abs() < 1e-5
    _check_against_reference(backend, hidden, dict(cu_seqlens=cu, normalize=True, eps=eps), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_rows_span_several_feature_blocks(backend):
    """More than 128 features: the triton forward sums them in several column blocks (KaLM's width 896 on a GPU),
    packed and padded, truncated or not."""
    hidden, cu = _packed_case(torch.float32, DEVICE, lengths=(3, 0, 70), H=200)
    _check_against_reference(backend, hidden, dict(cu_seqlens=cu, dim=150, normalize=True), torch.float32)
    hidden, mask = _padded_case(torch.float32, DEVICE, H=136)
    _check_against_reference(backend, hidden, dict(attention_mask=mask), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not (INTERPRET or DEVICE == "cuda"), reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_backward_programs_stride_over_rows_past_the_grid_limit(monkeypatch):
    """The backward's row programs are capped (CUDA allows 65535 on a grid's second axis): each then loops over
    several row blocks."""
    from kalm_fast.ops.mean_pool import _triton

    monkeypatch.setattr(_triton, "MAX_GRID_Y", 2)
    hidden, cu = _packed_case(torch.float32, DEVICE, lengths=(300, 1, 0, 77), H=40)
    _check_against_reference("triton", hidden, dict(cu_seqlens=cu, normalize=True), torch.float32)
    hidden, mask = _padded_case(torch.float32, DEVICE, L=150)
    _check_against_reference("triton", hidden, dict(attention_mask=mask), torch.float32)


def test_triton_rows_per_split():
    """Few programs: sequences cut into splits (>= 64 rows, whole token blocks); many: one program per sequence.
    (Off a GPU the launcher aims at 2 SMs x 8 programs.)"""
    pytest.importorskip("triton")
    from kalm_fast.ops.mean_pool._triton import _rows_per_split

    cpu = torch.device("cpu")
    assert _rows_per_split(1, 4096, 32, cpu) == 256  # 16 splits
    assert _rows_per_split(4, 4096, 32, cpu) == 1024  # 4 x 4 programs
    assert _rows_per_split(1, 100, 32, cpu) == 64  # 2 splits of at least 64 rows, rounded to the block
    assert _rows_per_split(10_000, 512, 32, cpu) == 512  # the whole sequence
    assert _rows_per_split(3, 0, 8, cpu) == 8  # empty sequences: one split


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_few_long_sequences_split_over_programs(backend, dtype, normalize):
    """A padded batch of two long rows (mask holes, one row ending mid-split) and a packed one of a long sequence
    beside short ones: the triton forward sums them in row splits."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 300, 40, generator=g).to(DEVICE, dtype)
    mask = torch.arange(300)[None, :] < torch.tensor([[300], [151]])
    mask[0, 100:140] = False
    _check_against_reference(backend, hidden, dict(attention_mask=mask.to(DEVICE), normalize=normalize), dtype)
    packed, cu = _packed_case(dtype, DEVICE, lengths=(2, 257, 0, 64, 1))
    _check_against_reference(backend, packed, dict(cu_seqlens=cu, dim=33, normalize=normalize), dtype)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_sequences_are_zero_and_tiny_vectors_normalize_like_F_normalize(backend):
    device = DEVICE
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
    assert _registry.select(OP, "auto", torch.device("cpu"), torch.float32)[0] == "torch"


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    table = _registry._OPS[OP].backends
    monkeypatch.setitem(table, "triton", dataclasses.replace(table["triton"], devices=("cuda",)))
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
    (lambda: mean_pool(torch.randn(2, 3, 4), eps="1e-6"), ValueError, "eps must be > 0"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", backend_params(OP, ("triton", "cuda")))
def test_kernels_reject_non_contiguous_last_dim(backend):
    with pytest.raises(ValueError, match="contiguous last dimension"):
        mean_pool(torch.randn(2, 4, 3, device=DEVICE).transpose(1, 2), backend=backend)


def test_cu_seqlens_checked_again_after_in_place_change():
    hidden = torch.randn(5, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    mean_pool(hidden, cu_seqlens=cu)
    cu[1] = 7  # bumps the version counter: the cached validation must not be trusted
    with pytest.raises(ValueError, match="non-decreasing"):
        mean_pool(hidden, cu_seqlens=cu)


def test_a_varlen_is_trusted_but_its_token_count_is_checked():
    hidden = torch.randn(5, 4)
    varlen = Varlen.from_lengths([2, 3])
    torch.testing.assert_close(mean_pool(hidden, cu_seqlens=varlen), mean_pool(hidden, cu_seqlens=varlen.cu_seqlens))
    with pytest.raises(ValueError, match="describes 5 packed tokens, the input has 6"):
        mean_pool(torch.randn(6, 4), cu_seqlens=varlen)
    for bad, err, msg in ((5, TypeError, "lengths must be a sequence of ints >= 0, got int"),
                          ([2, -1], ValueError, "lengths must be ints >= 0, item 1 is -1"),
                          ([2.0], ValueError, "item 0 is 2.0")):
        with pytest.raises(err, match=msg):
            Varlen.from_lengths(bad)


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match="runs on \\['cuda'\\] tensors, got cpu"):
        mean_pool(torch.randn(2, 3, 4), backend="cuda")


def test_packed_input_made_under_inference_mode():
    with torch.inference_mode():
        hidden = torch.randn(5, 4)
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        torch.testing.assert_close(mean_pool(hidden, cu_seqlens=cu),
                                   mean_pool(hidden, cu_seqlens=cu, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_any_nonzero_mask_value_counts_as_one(backend):
    hidden = torch.randn(1, 3, 4, device=DEVICE)
    weighted = mean_pool(hidden, torch.tensor([[2.0, 1.0, 0.0]], device=DEVICE), backend=backend)
    torch.testing.assert_close(weighted, hidden[:, :2].mean(1))


def test_auto_order_prefers_triton_on_gpus_and_never_the_unverified_cuda_backends():
    for op in ("mean_pool", "flash_attention", "focal_infonce"):
        assert _registry._OPS[op].auto == {"cuda": ("triton", "torch"), "cpu": ("torch",)}


# ---------------------------------------------------------------------------------------------- GPU-only cases


@pytest.mark.parametrize("backend", backend_params(OP, ("triton", "cuda"), torch.bfloat16, gpu_only=True))
@pytest.mark.parametrize("H,dim,normalize", [(24, None, False), (7, 5, True), (896, 512, True), (136, 136, False)])
@pytest.mark.parametrize("layout", ["padded_bool", "padded_int", "padded_none", "packed"])
def test_bf16_and_wide_rows_on_gpu(backend, H, dim, normalize, layout):
    """bf16 (the interpreter's bf16 is not trusted), the KaLM width 896, odd widths; the kernels' layouts."""
    torch.manual_seed(0)
    if layout == "packed":
        hidden, cu = _packed_case(torch.bfloat16, DEVICE, lengths=(3, 0, 17, 1, 129), H=H)
        kwargs = dict(cu_seqlens=cu)
    else:
        hidden = torch.randn(4, 33, H, device=DEVICE, dtype=torch.bfloat16)
        mask = torch.rand(4, 33, device=DEVICE) > 0.3
        mask[1] = False  # an empty sequence
        kwargs = dict(attention_mask={"padded_bool": mask, "padded_int": mask.long(), "padded_none": None}[layout])
    _check_against_reference(backend, hidden, dict(kwargs, dim=dim, normalize=normalize), torch.bfloat16)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton", "cuda"), torch.float16, gpu_only=True))
def test_unaligned_view_on_gpu(backend):
    """A 6-byte offset and a row stride of 70 elements: the CUDA kernel falls back to scalar loads."""
    base = torch.randn(2, 9, 70, device=DEVICE, dtype=torch.float16)
    hidden = base[:, :, 3:67].requires_grad_()  # the view itself is pooled
    assert hidden.storage_offset() == 3 and hidden.stride() == (630, 70, 1)
    _check_against_reference(backend, hidden, dict(dim=64, normalize=True), torch.float16)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_padding_never_leaks_and_a_nan_token_spoils_only_its_sequence(backend):
    """NaN / inf at a masked-out position must not reach the row; a NaN in a real token gives a NaN row, alone."""
    hidden = torch.randn(3, 4, 8, device=DEVICE)
    hidden[0, 3], hidden[1, 2:] = float("nan"), float("inf")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], device=DEVICE)
    out = mean_pool(hidden, mask, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], hidden[1, :2].mean(0))
    hidden[2, 1, 0] = float("nan")
    out = mean_pool(hidden, mask, backend=backend)
    assert out[2].isnan().any() and torch.isfinite(out[:2]).all()
    packed, cu = hidden[2:].reshape(4, 8), cu_seqlens([1, 3], DEVICE)  # token 1 (NaN) is in the second sequence
    out = mean_pool(packed, cu_seqlens=cu, backend=backend)
    assert torch.isfinite(out[0]).all() and out[1].isnan().any()
