"""flash_attention backends against the reference: packed and padded, GQA, causal, local windows, forward, lse and
dq/dk/dv.

On CPU the triton backend runs under TRITON_INTERPRET=1 (set by the test suite) with fp32/fp16 inputs; bf16 and the
forward-only ``cuda`` backend are checked on a GPU (``make gpu-check``).
"""
import math
import os

import pytest
import torch
from conftest import DEVICE, backend_params, cu_seqlens, gpu_when_there, tolerance

from kalm_fast import _registry
from kalm_fast.ops import Varlen
from kalm_fast.ops.attention import flash_attention, pad, unpad
from kalm_fast.ops.attention.reference import flash_attention as flash_attention_reference

OP = "flash_attention"
BACKENDS = backend_params(OP, ("torch", "triton"))
_cu = cu_seqlens


def _inputs(shape_q, hkv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_kv = (*shape_q[:-2], hkv, shape_q[-1])
    make = lambda shape: torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return make(shape_q), make(shape_kv), make(shape_kv)


def _tma_runs_here() -> bool:
    """Whether KALM_ATTENTION_TMA=1 takes the tensor descriptors here: in the interpreter, or compiled on a GPU of
    compute capability 9+."""
    return _registry.triton_interpreting() or (DEVICE == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] >= 9)


def _run(backend, q, k, v, **kw):
    """Forward with lse, then backward of a random-weighted sum -> (out, lse, dq, dk, dv)."""
    out, lse = flash_attention(q, k, v, return_lse=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True, materialize_grads=True)
    return (out, lse) + grads


def _assert_close(actual, expected, backend, dtype):
    atol, rtol = tolerance(OP, backend, dtype)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert a.dtype == e.dtype, (name, a.dtype, e.dtype)
        if name == "lse":  # fp32 whatever the input dtype; +inf on rows attending to nothing
            assert torch.equal(torch.isinf(a), torch.isinf(e)), name
            a, e = a.masked_fill(torch.isinf(a), 0), e.masked_fill(torch.isinf(e), 0)
        # gradients grow with the sequence length; atol is meant for values of order 1
        scale = max(1.0, float(e.detach().float().abs().max()))
        torch.testing.assert_close(a.float(), e.float(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


PACKED_CASES = [
    # lengths, Hq, Hkv, D, causal, dtype
    ([0, 1, 17, 64, 129], 14, 2, 64, False, torch.float32),
    ([0, 1, 17, 64, 129], 14, 2, 64, True, torch.float16),
    ([17, 0, 64, 1], 4, 1, 32, False, torch.float16),
    ([129, 17], 4, 1, 80, True, torch.float32),
    ([64, 1, 17], 2, 2, 128, False, torch.float32),
    ([5, 33, 0], 2, 1, 128, True, torch.float16),
    ([1, 17, 64, 129, 0], 2, 2, 80, False, torch.float16),
    # unequal lengths in one bucket of the torch backend, causal: its key mask and the causal mask together
    ([60, 0, 64, 55], 14, 2, 64, True, torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,hq,hkv,d,causal,dtype", PACKED_CASES)
def test_packed_matches_reference(backend, lengths, hq, hkv, d, causal, dtype):
    cu = _cu(lengths)
    q, k, v = _inputs((int(cu[-1]), hq, d), hkv, dtype)
    kw = dict(cu_seqlens=cu, max_seqlen=max(lengths), causal=causal)
    expected = _run("reference", q, k, v, **kw)
    actual = _run(backend, q, k, v, **kw)
    _assert_close(actual, expected, backend, dtype)
    with torch.no_grad():  # without the lse (the torch backend's other SDPA path)
        out = flash_attention(q, k, v, backend=backend, **kw)
    _assert_close((out,), expected[:1], backend, dtype)


WINDOW_CASES = [
    # lengths, Hq, Hkv, D, causal, window, dtype: bands narrower than a tile, wider than some sequences, one-sided,
    # with the causal mask, empty (each token sees itself), and wider than every sequence (no mask at all)
    ([0, 1, 17, 64, 129], 14, 2, 64, False, (3, 3), torch.float32),
    ([129, 5, 70], 4, 1, 32, False, (40, 7), torch.float16),
    ([70, 1, 129], 2, 2, 64, True, (20, 5), torch.float32),
    ([33, 129], 4, 2, 32, False, (0, 0), torch.float16),
    ([129, 17, 0], 2, 1, 80, False, (0, 60), torch.float32),
    ([17, 64, 1], 4, 2, 32, False, (500, 500), torch.float32),
    # one-sided edges of one key, GQA 3:1 and 7:1 (folded rows of a token straddle the tiles): the first visible key
    # falls on the last column of a key tile, or a key's first query on the last rows of a query tile
    ([0, 1, 17, 64, 129], 3, 1, 32, False, (1, 0), torch.float32),
    ([129, 33], 7, 1, 64, False, (0, 1), torch.float16),
    ([70, 129, 2], 6, 2, 32, True, (31, 33), torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,hq,hkv,d,causal,window,dtype", WINDOW_CASES)
def test_window_matches_reference(backend, lengths, hq, hkv, d, causal, window, dtype):
    """Local attention (``window=(left, right)``): forward, lse and gradients, packed, against the oracle's band."""
    cu = _cu(lengths)
    q, k, v = _inputs((int(cu[-1]), hq, d), hkv, dtype)
    kw = dict(cu_seqlens=cu, causal=causal, window=window)
    expected = _run("reference", q, k, v, **kw)
    _assert_close(_run(backend, q, k, v, **kw), expected, backend, dtype)
    if max(lengths) > window[0] + window[1] + 1:  # the window is not a no-op here
        unbanded = _run("reference", q, k, v, cu_seqlens=cu, causal=causal)
        assert (expected[0] - unbanded[0]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_window_padded_matches_reference(backend, causal):
    """Padded input with a window: padding query rows still give zeros (none attends to nothing by accident) and no
    NaN reaches the gradients."""
    q, k, v = _inputs((3, 45, 4, 32), 2, torch.float32)
    for mask in (_mask([45, 20, 0], 45), _mask([5, 45, 1], 45, left=True), None):
        kw = dict(key_padding_mask=mask, causal=causal, window=(6, 2))
        actual = _run(backend, q, k, v, **kw)
        _assert_close(actual, _run("reference", q, k, v, **kw), backend, torch.float32)
        assert not any(torch.isnan(t).any() for t in actual[2:])
        if mask is not None:
            assert actual[0][~mask.bool()].abs().max() == 0


def test_window_reference_is_the_band():
    """The oracle's band by hand: one head, D = 1, keys 0..4 with value = position, all scores equal (q = 0):
    query i averages the values of keys max(0, i - 1) .. min(4, i + 2)."""
    q = torch.zeros(5, 1, 1)
    k = torch.ones(5, 1, 1)
    v = torch.arange(5.0).view(5, 1, 1)
    out = flash_attention_reference(q, k, v, _cu([5]).cpu(), None, None, False, (1, 2))
    want = [sum(range(max(0, i - 1), min(4, i + 2) + 1)) / (min(4, i + 2) - max(0, i - 1) + 1) for i in range(5)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(want))
    causal = flash_attention_reference(q, k, v, _cu([5]).cpu(), None, None, True, (1, 2))
    torch.testing.assert_close(causal[:, 0, 0], torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5]))


@pytest.mark.parametrize("window,text", [((1,), "pair of ints"), ((-1, 2), "pair of ints"), ((1.5, 2), "pair of ints"),
                                         ((True, 2), "pair of ints"), (3, "pair of ints")])
def test_window_is_checked(window, text):
    q, k, v = _inputs((5, 2, 32), 1, torch.float32)
    with pytest.raises(ValueError, match=f"window must be a {text}"):
        flash_attention(q, k, v, cu_seqlens=_cu([5]), window=window)


def test_window_needs_one_run_of_real_tokens_per_padded_row():
    """A padding mask with holes is refused with a window (distances would differ between the padded and the packed
    layout); left and right padding are one run."""
    q, k, v = _inputs((2, 6, 2, 16), 1, torch.float32)
    holes = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], device=DEVICE)
    with pytest.raises(ValueError, match="key_padding_mask must mark one run of real tokens per row"):
        flash_attention(q, k, v, key_padding_mask=holes, window=(1, 1))
    flash_attention(q, k, v, key_padding_mask=holes)  # without a window the holes are fine
    runs = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], device=DEVICE)  # left and right padding
    kw = dict(key_padding_mask=runs, window=(1, 1))
    _assert_close(_run("torch", q, k, v, **kw), _run("reference", q, k, v, **kw), "torch", torch.float32)


SOFTCAP_CASES = [
    # lengths, Hq, Hkv, D, causal, window, dtype, softcap: GQA 14:2 with a cap that flattens most scores, Gemma 2's
    # head dims 128 and 256 (causal, and a band as its local layers run bidirectionally), a mild cap
    ([0, 1, 17, 64, 129], 14, 2, 64, False, None, torch.float32, 0.5),
    ([129, 17, 1], 4, 2, 128, True, None, torch.float16, 1.0),
    ([70, 0, 129, 2], 2, 1, 256, False, (17, 17), torch.float16, 1.0),
    ([33, 70], 6, 2, 32, True, (20, 0), torch.float32, 3.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,hq,hkv,d,causal,window,dtype,softcap", SOFTCAP_CASES)
def test_softcap_matches_reference(backend, lengths, hq, hkv, d, causal, window, dtype, softcap):
    """Soft-capped scores (``softcap * tanh(scale q.k / softcap)``, Gemma 2): forward, lse and gradients, packed,
    against the oracle; the cap changes the result."""
    cu = _cu(lengths)
    q, k, v = _inputs((int(cu[-1]), hq, d), hkv, dtype)
    kw = dict(cu_seqlens=cu, causal=causal, window=window)
    expected = _run("reference", q, k, v, softcap=softcap, **kw)
    _assert_close(_run(backend, q, k, v, softcap=softcap, **kw), expected, backend, dtype)
    uncapped = _run("reference", q, k, v, **kw)
    assert (expected[0] - uncapped[0]).abs().max() > 1e-2 and (expected[2] - uncapped[2]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_padded_matches_reference(backend):
    """Padded input with soft-capped scores and a window: padding query rows give zeros, no NaN in the gradients."""
    q, k, v = _inputs((3, 45, 4, 32), 2, torch.float32)
    for mask in (_mask([45, 20, 0], 45), None):
        kw = dict(key_padding_mask=mask, window=(6, 6), softcap=0.5)
        actual = _run(backend, q, k, v, **kw)
        _assert_close(actual, _run("reference", q, k, v, **kw), backend, torch.float32)
        assert not any(torch.isnan(t).any() for t in actual[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_huge_softcap_is_no_cap(backend, dtype):
    """With a cap far above every score (1e6), tanh stays in its linear part: the result is the uncapped one (the
    Triton tanh keeps its digits near 0, where the cap multiplies them back)."""
    cu = _cu([1, 17, 40])
    q, k, v = (2 * t for t in _inputs((int(cu[-1]), 4, 64), 2, dtype))
    capped = _run(backend, q, k, v, cu_seqlens=cu, softcap=1e6)
    _assert_close(capped, _run("reference", q, k, v, cu_seqlens=cu), backend, dtype)


def test_torch_softcap_in_blocks_of_sequences_and_of_rows(monkeypatch):
    """The torch backend's capped scores a few at a time (blocks of sequences, of one sequence's query rows, of one
    row): the same as in one block, packed (buckets with key masks), padded, causal and windowed."""
    from kalm_fast.ops.attention import _torch

    q, k, v = _inputs((3, 45, 4, 32), 2, torch.float32)
    mask = _mask([45, 20, 7], 45)
    cases = [dict(key_padding_mask=mask, softcap=1.0), dict(key_padding_mask=mask, causal=True, softcap=1.0),
             dict(causal=True, window=(6, 0), softcap=1.0)]
    for budget in (45 * 45 * 4 * 2, 45 * 4 * 5, 1):
        monkeypatch.setattr(_torch, "CAPPED_SCORES_PER_CHUNK", budget)
        for kw in cases:
            _assert_close(_run("torch", q, k, v, **kw), _run("reference", q, k, v, **kw), "torch", torch.float32)


def test_reference_softcap_is_the_formula():
    """The oracle's capped scores written out for one sequence: softmax(c * tanh(scale * QK^T / c)) V."""
    q, k, v = _inputs((9, 2, 16), 1, torch.float64)
    out, lse = flash_attention_reference(q, k, v, _cu([9]), 9, None, False, softmax_scale=0.5, return_lse=True,
                                         softcap=2.0)
    for h in range(2):
        s = 2.0 * torch.tanh(q[:, h] @ k[:, 0].T * 0.5 / 2.0)
        torch.testing.assert_close(out[:, h].float(), (torch.softmax(s, -1) @ v[:, 0]).float())
        torch.testing.assert_close(lse[h], torch.logsumexp(s, -1).float())


def test_cuda_backend_refuses_a_window():
    """A window that masks something is refused by 'cuda'; one that reaches every key of the longest sequence is no
    window (a 4096-token sliding window over 512-token texts), so 'cuda' takes it like any call."""
    q, k, v = _inputs((5, 2, 32), 1, torch.float16)
    with pytest.raises(ValueError, match=r"no window \(local attention\), and window=\(2, 4\) is narrower than the "
                                         r"longest sequence \(5 tokens\)"):
        flash_attention(q, k, v, cu_seqlens=_cu([5]), window=(2, 4), backend="cuda")
    with pytest.raises(ValueError, match="no window"):
        flash_attention(q, k, v, cu_seqlens=_cu([2, 3]), window=(4, 1), backend="cuda")
    with pytest.raises(ValueError, match="no window"):
        flash_attention(q, k, v, cu_seqlens=_cu([5]), window=(3, 4), causal=True, backend="cuda")
    for window, causal in (((4, 4), False), ((2, 2), False), ((4, 0), True), ((9, 9), False)):
        lengths = [2, 3] if window == (2, 2) else [5]
        try:
            flash_attention(q, k, v, cu_seqlens=_cu(lengths), window=window, causal=causal, backend="cuda")
        except (RuntimeError, ValueError) as e:  # no CUDA build or device here: refused for that, not the window
            assert "window" not in str(e), e


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_reaching_every_key_is_no_window(backend):
    """The window of a model's local layers is often longer than its texts: it masks nothing, so it runs as no
    window (the padded layout's one-run check, which syncs with the host, is skipped too)."""
    q, k, v = _inputs((2, 6, 2, 16), 1, torch.float32)
    holes = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], device=DEVICE)
    for window, causal in (((5, 5), False), ((9, 5), False), ((5, 0), True)):
        kw = dict(key_padding_mask=holes, causal=causal)
        _assert_close(_run(backend, q, k, v, window=window, **kw), _run("reference", q, k, v, **kw), backend,
                      torch.float32)
    with pytest.raises(ValueError, match="key_padding_mask must mark one run"):
        flash_attention(q, k, v, key_padding_mask=holes, window=(5, 4), backend=backend)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
@pytest.mark.parametrize("lengths,hq,hkv,d,causal,dtype", PACKED_CASES[:4])
def test_triton_atomic_dq_matches_reference(backend, lengths, hq, hkv, d, causal, dtype, monkeypatch):
    """KALM_ATTENTION_DQ=atomic: the dK/dV kernel adds dQ with atomics instead of a separate dQ kernel."""
    monkeypatch.setenv("KALM_ATTENTION_DQ", "atomic")
    cu = _cu(lengths)
    q, k, v = _inputs((int(cu[-1]), hq, d), hkv, dtype)
    kw = dict(cu_seqlens=cu, causal=causal)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, dtype)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
def test_triton_atomic_dq_under_autotuning(backend, monkeypatch):
    """KALM_ATTENTION_DQ=atomic with several dK/dV configs: the autotuner runs the kernel once per config into the
    same fp32 dQ buffer, which must be zeroed before each run (reset_to_zero) or dQ comes out a multiple of itself.
    (The interpreter has one config and never tunes: two are forced here, with a one-run timer.)"""
    import triton

    from kalm_fast.ops.attention import _triton as tri

    monkeypatch.setenv("KALM_ATTENTION_DQ", "atomic")
    tuned = tri._attn_bwd_dkdv_tuned
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1) for m, n in ((32, 64), (16, 32))]
    monkeypatch.setattr(tuned, "configs", configs)
    monkeypatch.setattr(tuned, "early_config_prune", None)
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setitem(vars(tuned), "do_bench", lambda fn, quantiles: (fn(), [1.0, 1.0, 1.0])[1])
    cu = _cu([5, 40])
    q, k, v = _inputs((45, 4, 32), 2, torch.float32)
    kw = dict(cu_seqlens=cu, causal=True)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, torch.float32)
    assert tuned.best_config in configs


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
@pytest.mark.parametrize("lengths,hq,hkv,d,causal,dtype", [c for c in PACKED_CASES if c[-1] != torch.float32])
def test_triton_tma_matches_reference(backend, lengths, hq, hkv, d, causal, dtype, monkeypatch):
    """KALM_ATTENTION_TMA=1: the forward and dQ kernels load K/V tiles through tensor descriptors bounded by each
    sequence (zeros past its end and past the head dim); the interpreter runs them on the CPU."""
    from kalm_fast.ops.attention._triton import use_tma

    monkeypatch.setenv("KALM_ATTENTION_TMA", "1")
    cu = _cu(lengths)
    q, k, v = _inputs((int(cu[-1]), hq, d), hkv, dtype)
    assert use_tma(k, v)
    kw = dict(cu_seqlens=cu, causal=causal)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, dtype)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
def test_triton_tma_setting_is_checked(backend, monkeypatch):
    monkeypatch.setenv("KALM_ATTENTION_TMA", "yes")
    q, k, v = _inputs((5, 2, 32), 1, torch.float16)
    with pytest.raises(ValueError, match="KALM_ATTENTION_TMA must be 0 or 1, got 'yes'"):
        flash_attention(q, k, v, cu_seqlens=_cu([5]), backend=backend)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",), torch.float16))
def test_triton_tma_only_for_16_byte_aligned_k_v(backend, monkeypatch):
    """Tensor descriptors need a 16-byte aligned base and row stride: other K/V views take the pointer loads."""
    from kalm_fast.ops.attention._triton import use_tma

    monkeypatch.setenv("KALM_ATTENTION_TMA", "1")
    flat = torch.randn(20 * 68 + 8, device=DEVICE, dtype=torch.float16)
    aligned = flat[:20 * 64].view(20, 1, 64)
    shifted = flat[1:1 + 20 * 64].view(20, 1, 64)           # base 2 bytes past an aligned one
    odd_rows = flat[:20 * 68].view(20, 68)[:, None, :64]     # rows 136 bytes apart
    odd_heads = flat[:10 * 136].view(10, 2, 68)[..., :64]      # rows 272 bytes apart, heads 136
    assert aligned.data_ptr() % 16 == 0
    assert not use_tma(shifted, aligned) and not use_tma(aligned, shifted) and not use_tma(odd_rows, odd_rows)
    assert not use_tma(odd_heads, odd_heads)
    assert use_tma(aligned, aligned) == _tma_runs_here()


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
def test_triton_dq_mode_is_checked(backend, monkeypatch):
    monkeypatch.setenv("KALM_ATTENTION_DQ", "fast")
    q, k, v = _inputs((5, 2, 32), 1, torch.float32)
    out = flash_attention(q, k, v, cu_seqlens=_cu([5]), backend=backend)
    with pytest.raises(ValueError, match="KALM_ATTENTION_DQ must be one of \\('separate', 'atomic'\\), got 'fast'"):
        out.sum().backward()


def _mask(lengths, L, left=False):
    pos = torch.arange(L)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = pos >= L - n if left else pos < n
    return mask.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_matches_reference(backend, causal, dtype):
    q, k, v = _inputs((3, 37, 4, 64), 2, dtype)
    for mask in (_mask([37, 20, 0], 37), _mask([5, 37, 1], 37, left=True).int(), None):
        kw = dict(key_padding_mask=mask, causal=causal)
        expected = _run("reference", q, k, v, **kw)
        actual = _run(backend, q, k, v, **kw)
        _assert_close(actual, expected, backend, dtype)
        if mask is not None:
            assert not torch.isnan(actual[0]).any()
            assert actual[0][~mask.bool()].abs().max() == 0  # padded query rows give zeros


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_packed_and_padded_agree(backend):
    """The same tokens as padded [B, L] + mask and as packed [T]: same out, lse and gradients on real tokens,
    zero gradient on padding."""
    lengths, L = [9, 0, 23, 1], 23
    mask = _mask(lengths, L)
    qp, kp, vp = _inputs((4, L, 6, 32), 3, torch.float32, seed=3)
    packed = [t.detach()[mask].requires_grad_() for t in (qp, kp, vp)]
    out_p, lse_p = flash_attention(qp, kp, vp, key_padding_mask=mask, causal=True, return_lse=True, backend=backend)
    out_k, lse_k = flash_attention(*packed, cu_seqlens=_cu(lengths), causal=True, return_lse=True, backend=backend)
    dout = torch.randn(out_k.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads_p = torch.autograd.grad(out_p, (qp, kp, vp), pad(dout, torch.nonzero(mask.flatten()).flatten(), 4, L))
    grads_k = torch.autograd.grad(out_k, packed, dout)
    atol, rtol = tolerance(OP, backend, torch.float32)
    torch.testing.assert_close(out_p[mask], out_k, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse_p.transpose(1, 2)[mask], lse_k.T, atol=atol, rtol=rtol)
    assert torch.isinf(lse_p.transpose(1, 2)[~mask]).all()
    for gp, gk in zip(grads_p, grads_k):
        torch.testing.assert_close(gp[mask], gk, atol=atol, rtol=rtol)
        assert gp[~mask].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_sequences_and_scale(backend):
    """Many short sequences of scattered lengths (several length buckets), a custom softmax_scale, GQA 4:1."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 24, (40,), generator=g).tolist()
    cu = _cu(lengths)
    q, k, v = _inputs((int(cu[-1]), 4, 32), 1, torch.float32, seed=4)
    kw = dict(cu_seqlens=cu, softmax_scale=0.3)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_similar_lengths_padded_together_never_read_past_a_sequence(backend):
    """Sequences of similar, unequal lengths (one bucket of the torch backend, padded to its longest): the padding
    never reads the next sequence (an inf value there stays out of the shorter one before it) nor past the batch (a
    shorter sequence last)."""
    cu = _cu([18, 20, 17])
    q, k, v = _inputs((55, 2, 32), 1, torch.float32)
    _assert_close(_run(backend, q, k, v, cu_seqlens=cu), _run("reference", q, k, v, cu_seqlens=cu), backend,
                  torch.float32)
    q, k, v = (t.detach() for t in _inputs((58, 2, 32), 1, torch.float32))
    v[18, 0, 3] = float("inf")  # the first token of sequence 1, right after the 18 of sequence 0
    with torch.no_grad():
        out = flash_attention(q, k, v, cu_seqlens=_cu([18, 20, 20]), backend=backend)
    assert torch.isfinite(out[:18]).all()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_no_tokens(backend, lengths):
    q, k, v = _inputs((0, 4, 32), 2, torch.float32)
    out, lse, dq, dk, dv = _run(backend, q, k, v, cu_seqlens=_cu(lengths))
    assert out.shape == (0, 4, 32) and lse.shape == (4, 0) and dq.shape == (0, 4, 32) and dk.shape == (0, 2, 32)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_a_padded_batch_of_no_rows(backend, shape, softcap):
    """B = 0 or L = 0, no mask, with lse: empty results on every backend (the torch backend's CPU kernel faulted on
    L = 0, the triton lse reshape failed), in the autograd graph as the oracle's are (the soft-capped torch path's
    zeros were not)."""
    q, k, v = _inputs((*shape, 4, 32), 2, torch.float32)
    out, lse = flash_attention(q, k, v, return_lse=True, backend=backend, softcap=softcap)
    assert out.shape == (*shape, 4, 32) and lse.shape == (shape[0], 4, shape[1]) and out.requires_grad
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """q, k, v as strided views of one fused qkv projection [T, 3, H, D]."""
    cu = _cu([3, 20])
    qkv = torch.randn(23, 3, 2, 32, device=DEVICE).requires_grad_()
    q, k, v = qkv.unbind(1)
    expected = _run("reference", q, k, v, cu_seqlens=cu)
    _assert_close(_run(backend, q, k, v, cu_seqlens=cu), expected, backend, torch.float32)
    # transformers' layout: [H, T, D] tensors seen as [T, H, D] (head stride T * D)
    q, k, v = (torch.randn(h, 23, 32, device=DEVICE).transpose(0, 1).requires_grad_() for h in (4, 2, 2))
    _assert_close(_run(backend, q, k, v, cu_seqlens=cu), _run("reference", q, k, v, cu_seqlens=cu), backend,
                  torch.float32)


@gpu_when_there
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("causal,window,softcap", [(False, None, None), (False, (5, 5), 2.0)])
def test_head_dim_512_runs_on_torch(backend, causal, window, softcap):
    """EmbeddingGemma 2's global layers (head dim 512, past the Triton kernels' 256): ``torch`` (what ``auto`` picks
    for them on every device) against the oracle, forward and gradients."""
    cu = _cu([0, 1, 17, 40])
    q, k, v = _inputs((int(cu[-1]), 4, 512), 1, torch.float32)
    kw = dict(cu_seqlens=cu, causal=causal, window=window, softcap=softcap)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), "torch", torch.float32)


@gpu_when_there
@pytest.mark.parametrize("d", [26, 36])
def test_head_dims_off_the_multiples_of_8_run_on_torch(d):
    """TinyBERT-312's D = 26: the torch backend (what ``auto`` picks for it) against the oracle, packed and padded."""
    q, k, v = _inputs((23, 4, d), 2, torch.float32)
    cu = _cu([3, 20])
    expected = _run("reference", q, k, v, cu_seqlens=cu)
    _assert_close(_run("torch", q, k, v, cu_seqlens=cu), expected, "torch", torch.float32)
    _assert_close(_run("auto", q, k, v, cu_seqlens=cu), expected, "torch", torch.float32)
    qp, kp, vp = (t.detach().view(1, 23, *t.shape[1:]).requires_grad_() for t in (q, k, v))
    mask = torch.arange(23, device=DEVICE)[None] < 19
    _assert_close(_run("auto", qp, kp, vp, key_padding_mask=mask), _run("reference", qp, kp, vp, key_padding_mask=mask),
                  "torch", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cu_seqlens(backend):
    """A cu_seqlens that is every other entry of a tensor is read as its values."""
    cu = _cu([3, 20, 1])
    strided = torch.stack([cu, torch.full_like(cu, 7)], 1).reshape(-1)[::2]
    assert strided.stride() == (2,) and torch.equal(strided, cu)
    q, k, v = _inputs((24, 4, 32), 2, torch.float32)
    _assert_close(_run(backend, q, k, v, cu_seqlens=strided), _run("reference", q, k, v, cu_seqlens=cu), backend,
                  torch.float32)


@pytest.mark.parametrize("rows_per_token", [1, 7])
def test_triton_work_list_covers_every_tile_once_longest_first(rows_per_token):
    """The triton backend launches one program per (sequence, tile) item of a host-built list: for every tile height,
    each tile of each non-empty sequence exactly once, the longest sequences first; built once per Varlen."""
    pytest.importorskip("triton")
    from kalm_fast.ops.attention._triton import TILE_HEIGHTS, tile_work

    lengths = [5, 0, 17, 3, 130, 9, 17]
    varlen = Varlen.from_lengths(lengths)
    work, items = tile_work(varlen, rows_per_token, "cpu")
    assert tile_work(varlen, rows_per_token, "cpu")[0] is work
    assert work.dtype == torch.int32 and sorted(items) == sorted(TILE_HEIGHTS)
    work = work.tolist()
    for slot, height in enumerate(TILE_HEIGHTS):
        begin = work[slot]
        pairs = [tuple(work[4 + 2 * j: 6 + 2 * j]) for j in range(begin, begin + items[height])]
        expected = {(s, t) for s, n in enumerate(lengths) for t in range(math.ceil(n * rows_per_token / height))}
        assert sorted(pairs) == sorted(expected) and len(pairs) == len(expected)
        seq_lengths = [lengths[s] for s, _ in pairs]
        assert seq_lengths == sorted(seq_lengths, reverse=True)
    assert len(work) == 4 + 2 * sum(items.values())


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
def test_triton_shared_varlen_keeps_a_work_list_per_group(backend):
    """One Varlen serves every call on a batch: its work lists are kept per rows per token (the GQA group), so an MHA
    call and then a GQA 4:1 call on the same Varlen each launch their own tiles."""
    varlen = Varlen.from_lengths([40, 3], DEVICE)
    for hq, hkv in ((2, 2), (8, 2)):
        q, k, v = _inputs((43, hq, 32), hkv, torch.float32)
        _assert_close(_run(backend, q, k, v, cu_seqlens=varlen),
                      _run("reference", q, k, v, cu_seqlens=varlen.cu_seqlens), backend, torch.float32)


def test_triton_fp32_dots_are_ieee():
    """fp32 inputs take ieee dots, fp16/bf16 tf32 (ignored for them): the interpreter computes every dot in fp32, so
    only a GPU would see tf32 on fp32 inputs (errors ~1e-3 against a 1e-5 tolerance)."""
    pytest.importorskip("triton")
    from kalm_fast.ops.attention._triton import _common

    for dtype, precision in ((torch.float32, "ieee"), (torch.float16, "tf32"), (torch.bfloat16, "tf32")):
        q = torch.empty(4, 2, 64, dtype=dtype)
        assert _common(q, q, False, None, 4, 1.0, None)[0]["PRECISION"] == precision


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
def test_triton_unsorted_lengths_with_empty_sequences(backend):
    """The work list reorders the sequences (longest first); outputs land at their own tokens (causal, GQA 4:2)."""
    cu = _cu([5, 0, 17, 3, 0, 9])
    q, k, v = _inputs((34, 4, 32), 2, torch.float32)
    kw = dict(cu_seqlens=cu, causal=True)
    _assert_close(_run("triton", q, k, v, **kw), _run("reference", q, k, v, **kw), "triton", torch.float32)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
def test_triton_causal_gqa_group_as_tall_as_the_tile(backend, monkeypatch):
    """Causal GQA 16:1 on 16-row tiles (fp32 configs of a GPU): a query tile then ends on the first token of a key
    tile (its diagonal key), which the forward and dQ kernels must not skip."""
    import triton

    from kalm_fast.ops.attention import _triton as tri

    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    for tuned in (tri._attn_fwd_tuned, tri._attn_bwd_dq_tuned):
        monkeypatch.setattr(tuned, "configs", [config])
    cu = _cu([40, 17])
    q, k, v = _inputs((57, 16, 32), 1, torch.float32)
    kw = dict(cu_seqlens=cu, causal=True)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, torch.float32)


def test_reference_matches_naive_formula():
    """The oracle itself against softmax(QK^T)V written out for one sequence (GQA 4:2, causal)."""
    q, k, v = _inputs((7, 4, 16), 2, torch.float64)
    cu = _cu([7])
    out, lse = flash_attention_reference(q, k, v, cu, 7, None, True, softmax_scale=0.25, return_lse=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for h in range(4):
        s = q[:, h] @ kk[:, h].T / 4.0 + torch.full((7, 7), -math.inf, dtype=torch.float64, device=DEVICE).triu(1)
        torch.testing.assert_close(out[:, h].float(), (torch.softmax(s, -1) @ vv[:, h]).float())
        torch.testing.assert_close(lse[h], torch.logsumexp(s, -1).float())


def test_unpad_pad_roundtrip_and_grad():
    mask = _mask([3, 0, 5], 5, left=True)
    x = torch.randn(3, 5, 2, 4, device=DEVICE, requires_grad=True)
    packed, indices, cu, max_seqlen = unpad(x, mask.int())
    assert packed.shape == (8, 2, 4) and indices.dtype == torch.int64
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8] and max_seqlen == 5
    torch.testing.assert_close(packed, x[mask])
    back = pad(packed, indices, 3, 5)
    torch.testing.assert_close(back, x * mask[..., None, None])
    back.sum().backward()
    torch.testing.assert_close(x.grad, mask[..., None, None].float().expand_as(x))
    w = torch.randn(8, 2, 4, device=DEVICE, requires_grad=True)
    pad(w, indices, 3, 5).pow(2).sum().backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())


def test_pad_checks_batch_and_seqlen():
    x_packed, indices = torch.randn(3, 4), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="batch must be an int >= 0, got 2.5"):
        pad(x_packed, indices, 2.5, 3)
    with pytest.raises(ValueError, match="seqlen must be an int >= 0, got -1"):
        pad(x_packed, indices, 2, -1)
    with pytest.raises(ValueError, match=r"batch \* seqlen = 1 \* 2 rows cannot hold the 3 packed rows"):
        pad(x_packed, indices, 1, 2)


def test_auto_picks_torch_on_cpu():
    assert _registry.select(OP, "auto", torch.device("cpu"), torch.float32)[0] == "torch"


def test_a_triton_older_than_tested_is_unavailable(monkeypatch):
    """Triton before 3.6 (older than the kernels are tested with) counts as unavailable: asking for the backend says
    why, and ``auto`` (on a GPU) takes the next backend."""
    triton = pytest.importorskip("triton")
    assert _registry._triton_too_old("3.6.0") is None and _registry._triton_too_old("3.10.1+git1234") is None
    assert "triton 3.2.0 is older than 3.6" in _registry._triton_too_old("3.2.0")
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    _registry.triton_unavailable.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"triton 3\.5\.1 is older than 3\.6, the oldest kalm_fast's kernels "
                                               r"are tested with; pip install 'triton>=3\.6'"):
            _registry.select(OP, "triton", torch.device("cuda"), torch.float16)
        assert _registry.select(OP, "auto", torch.device("cuda"), torch.float16)[0] == "torch"
    finally:
        monkeypatch.undo()
        _registry.triton_unavailable.cache_clear()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_varlen_is_trusted_and_max_seqlen_checked(backend):
    """A ``Varlen`` stands for a checked cu_seqlens; a raw tensor and a Varlen give the same result."""
    lengths = [3, 0, 20]
    q, k, v = _inputs((23, 4, 32), 2, torch.float32)
    varlen = Varlen.from_lengths(lengths, DEVICE)
    a = flash_attention(q, k, v, cu_seqlens=varlen, backend=backend)
    b = flash_attention(q, k, v, cu_seqlens=_cu(lengths), max_seqlen=20, backend=backend)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_seqlen must be an int >= the longest sequence in cu_seqlens \\(20\\)"):
        flash_attention(q, k, v, cu_seqlens=varlen, max_seqlen=19, backend=backend)
    with pytest.raises(ValueError, match="describes 23 packed tokens, the input has 22"):
        flash_attention(q[:22], k[:22], v[:22], cu_seqlens=varlen, backend=backend)


def _bad_calls():
    T, L = 10, 5
    q3, k3 = torch.randn(T, 4, 32), torch.randn(T, 2, 32)
    q4, k4 = torch.randn(2, L, 4, 32), torch.randn(2, L, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    return [
        (dict(q=torch.randn(T, 32), k=k3, v=k3, cu_seqlens=cu), ValueError, "q must have 3 or 4 dimensions"),
        (dict(q=q3, k=torch.randn(T, 3, 32), v=torch.randn(T, 3, 32), cu_seqlens=cu), ValueError, "multiple"),
        (dict(q=q3, k=k3, v=torch.randn(T, 2, 16), cu_seqlens=cu), ValueError, "v must have the shape of k"),
        (dict(q=q3, k=torch.randn(T + 1, 2, 32), v=torch.randn(T + 1, 2, 32), cu_seqlens=cu), ValueError, "k must be"),
        (dict(q=torch.randn(T, 4, 36), k=torch.randn(T, 2, 36), v=torch.randn(T, 2, 36), cu_seqlens=cu,
              backend="triton"), ValueError, "head dim D=36: backend 'triton' needs a multiple of 8"),
        (dict(q=torch.randn(T, 4, 520), k=torch.randn(T, 2, 520), v=torch.randn(T, 2, 520), cu_seqlens=cu),
         ValueError, "head dim D must be in [1, 512], got D=520"),
        (dict(q=torch.randn(T, 4, 264), k=torch.randn(T, 2, 264), v=torch.randn(T, 2, 264), cu_seqlens=cu,
              backend="triton"), ValueError, "head dim D=264: backend 'triton' takes at most 256"),
        (dict(q=q3, k=k3.half(), v=k3.half(), cu_seqlens=cu), TypeError, "dtype of q"),
        (dict(q=q3.int(), k=k3, v=k3, cu_seqlens=cu), TypeError, "q must have dtype"),
        (dict(q=q3, k=k3, v=k3), ValueError, "needs cu_seqlens"),
        (dict(q=q3, k=k3, v=k3, cu_seqlens=cu.long()), TypeError, "int32"),
        (dict(q=q3, k=k3, v=k3, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
         "non-decreasing"),
        (dict(q=q3, k=k3, v=k3, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "cu_seqlens[-1]"),
        (dict(q=q3, k=k3, v=k3, cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "cu_seqlens[0]"),
        (dict(q=q3, k=k3, v=k3, cu_seqlens=cu, max_seqlen=5), ValueError, "max_seqlen"),
        (dict(q=q3, k=k3, v=k3, cu_seqlens=cu, key_padding_mask=torch.ones(2, 5)), ValueError, "key_padding_mask"),
        (dict(q=q4, k=k4, v=k4, key_padding_mask=torch.ones(2, 4)), ValueError, "key_padding_mask must have shape"),
        (dict(q=q4, k=k4, v=k4, cu_seqlens=cu), ValueError, "padded q"),
        (dict(q=q4, k=k4, v=k4, softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(q=q4, k=k4, v=k4, softcap=0.0), ValueError, "softcap must be a positive float below 1e"),
        (dict(q=q4, k=k4, v=k4, softcap=math.inf), ValueError, "softcap must be a positive float below"),
        (dict(q=q4, k=k4, v=k4, softcap=1e39), ValueError, "softcap must be a positive float below"),
        (dict(q=q4, k=k4, v=k4, softcap=math.nan), ValueError, "softcap must be a positive float below"),
        (dict(q=q4, k=k4, v=k4, softcap=True), ValueError, "softcap must be a positive float below"),
        (dict(q=q4, k=k4, v=k4, softcap=50.0, backend="cuda"), ValueError, "backend 'cuda' of flash_attention has no "
                                                                          "softcap"),
        (dict(q=q4, k=k4, v=k4, backend="cuda"), RuntimeError, "cuda"),
        (dict(q=q4, k=k4, v=k4, backend="fast"), ValueError, "backend must be one of"),
        (dict(q=q4, k="k", v=k4), TypeError, "k must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises(i):
    kwargs, exc, text = _bad_calls()[i]
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
        flash_attention(q, k, v, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_cuda_tensors_on_different_devices():
    q = torch.randn(1, 4, 2, 32, device="cuda")
    with pytest.raises(ValueError, match="device"):
        flash_attention(q, q.cpu(), q.cpu())


# Autotuning checks only the config that wins on a test's shapes; each config a GPU could pick elsewhere (longer
# sequences, other head dims) must be correct on its own: the autotuned kernel is forced to one config at a time.
TMA, ATOMIC_DQ = "KALM_ATTENTION_TMA=1", "KALM_ATTENTION_DQ=atomic"
CONFIG_CASES = [("fwd", None), ("fwd", TMA), ("dkdv", None), ("dkdv", ATOMIC_DQ), ("dq", None), ("dq", TMA)]


# (causal, window): none, causal, a local window whose edges fall on a tile's last key / a row tile's last token
BANDS = ((False, None), (True, None), (False, (17, 33)))


def _config_runs(kernel, d, setting):
    """``[(dtype, [((causal, window), [(BLOCK_M, BLOCK_N, warps, stages)])])]``: on a GPU its arch's configs, bf16
    (every band) and fp32 (none, head dims <= 128; fp32 never loads through TMA descriptors); in the interpreter,
    which ignores warps and stages, every tile shape of any arch and width, on fp32 (fp16 for TMA)."""
    import triton

    from kalm_fast.ops.attention import _triton as tri

    block_d, atomic = max(16, triton.next_power_of_2(d)), setting == ATOMIC_DQ
    if DEVICE == "cuda":
        arch = tri.arch_class(DEVICE)
        runs = [(torch.bfloat16, [(band, tri.gpu_configs(kernel, arch, "half", block_d, atomic, band != BANDS[0]))
                                  for band in BANDS])]
        if setting != TMA and d <= 128:
            runs.append((torch.float32, [(BANDS[0], tri.gpu_configs(kernel, arch, "fp32", block_d, atomic))]))
        return runs
    shapes = sorted({c[:2] for arch in ("sm80", "sm90") for width in ("half", "fp32")
                     for c in tri.gpu_configs(kernel, arch, width, block_d, atomic)})
    return [(torch.float16 if setting == TMA else torch.float32, [(band, [(m, n, 4, 1) for m, n in shapes])
                                                                  for band in BANDS])]


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
@pytest.mark.parametrize("kernel,setting", CONFIG_CASES)
@pytest.mark.parametrize("d", [64, 128, 256] if DEVICE == "cuda" else [64, 96, 256])
def test_triton_every_config_matches_reference(backend, kernel, setting, d, monkeypatch):
    """Sequences over several tiles of every height and a partial last tile; on a GPU the head counts of the GPU
    tests below (GQA 14:2, whose compiles they share), in the interpreter 2:1 (fewer rows to interpret)."""
    import triton

    from kalm_fast.ops.attention import _triton as tri

    if setting:
        monkeypatch.setenv(*setting.split("="))
    tuned = {"fwd": tri._attn_fwd_tuned, "dkdv": tri._attn_bwd_dkdv_tuned, "dq": tri._attn_bwd_dq_tuned}[kernel]
    run = _forward if kernel == "fwd" else _run  # the forward kernel: out and lse only
    hq, hkv = (14, 2) if DEVICE == "cuda" else (2, 1)
    cu = _cu([0, 1, 37, 150])
    checked = 0
    for dtype, bands in _config_runs(kernel, d, setting):
        q, k, v = _inputs((int(cu[-1]), hq, d), hkv, dtype)
        assert tri.use_tma(k, v) == (setting == TMA and _tma_runs_here())
        for (causal, window), configs in bands:
            kw = dict(cu_seqlens=cu, causal=causal, window=window)
            expected = run("reference", q, k, v, **kw)
            for bm, bn, warps, stages in configs:
                config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
                monkeypatch.setattr(tuned, "configs", [config])
                try:
                    _assert_close(run(backend, q, k, v, **kw), expected, backend, dtype)
                except AssertionError as e:
                    raise AssertionError(f"{kernel} config {config}, {dtype}, causal={causal}, window={window}: "
                                         f"{e}") from None
                assert tuned.best_config is config
                checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------- GPU-only cases


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",), torch.bfloat16, gpu_only=True))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal,window", BANDS)
def test_triton_bf16_gpu(backend, d, causal, window):
    lengths = [0, 1, 17, 300, 129, 1024]
    cu = _cu(lengths)
    q, k, v = _inputs((int(cu[-1]), 14, d), 2, torch.bfloat16)
    kw = dict(cu_seqlens=cu, causal=causal, window=window)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, torch.bfloat16)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",), torch.bfloat16, gpu_only=True))
@pytest.mark.parametrize("d,causal,window", [(128, False, None), (128, True, (16, 0)), (256, False, None),
                                             (256, False, (17, 17))])
def test_triton_bf16_gpu_softcap(backend, d, causal, window):
    """Gemma 2's soft-capped scores compiled, at its head dims, with and without a band: global layers, causal and
    bidirectional local ones."""
    cu = _cu([0, 1, 17, 300, 129, 1024])
    q, k, v = _inputs((int(cu[-1]), 8, d), 4, torch.bfloat16)
    kw = dict(cu_seqlens=cu, causal=causal, window=window, softcap=1.0)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, torch.bfloat16)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",), torch.bfloat16, gpu_only=True))
@pytest.mark.parametrize("setting", ["KALM_ATTENTION_DQ=atomic", "KALM_ATTENTION_TMA=1"])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_bf16_gpu_variants(backend, setting, d, causal, monkeypatch):
    """The triton variants compiled: atomic dQ (several key tiles of a sequence add into the same dQ rows) and the
    TMA loads of the forward and dQ kernels (on sm_90+; elsewhere the pointer loads run and this repeats the bf16
    test)."""
    from kalm_fast.ops.attention._triton import use_tma

    monkeypatch.setenv(*setting.split("="))
    cu = _cu([0, 1, 17, 300, 129, 1024])
    q, k, v = _inputs((int(cu[-1]), 14, d), 2, torch.bfloat16)
    assert use_tma(k, v) == (setting == TMA and _tma_runs_here())
    kw = dict(cu_seqlens=cu, causal=causal)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, torch.bfloat16)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",), torch.float32, gpu_only=True))
@pytest.mark.parametrize("d", [64, 128])
def test_triton_fp32_gpu_long_sequences(backend, d):
    """fp32 runs its own (smaller) tiles on a GPU: sequences over several tiles, GQA 14:2."""
    cu = _cu([1, 300, 0, 1024])
    q, k, v = _inputs((int(cu[-1]), 14, d), 2, torch.float32)
    kw = dict(cu_seqlens=cu, causal=False)
    _assert_close(_run(backend, q, k, v, **kw), _run("reference", q, k, v, **kw), backend, torch.float32)


def _forward(backend, q, k, v, **kw):
    with torch.no_grad():
        return flash_attention(q, k, v, return_lse=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", backend_params(OP, ("cuda",), torch.float16))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (4, 4, 128), (2, 1, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_packed(backend, dtype, hq, hkv, d, causal):
    lengths = [1, 17, 0, 129, 64, 200]
    q, k, v = _inputs((sum(lengths), hq, d), hkv, dtype)
    kw = dict(cu_seqlens=_cu(lengths), causal=causal)
    (out, lse), (ref, ref_lse) = _forward(backend, q, k, v, **kw), _forward("reference", q, k, v, **kw)
    atol, rtol = tolerance(OP, backend, dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.masked_fill(lse.isinf(), 0), ref_lse.masked_fill(ref_lse.isinf(), 0),
                               atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", backend_params(OP, ("cuda",), torch.float16))
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_forward_padded(backend, masked):
    q, k, v = _inputs((3, 40, 4, 64), 2, torch.float16)
    mask = _mask([40, 7, 1], 40) if masked else None
    out, ref = _forward(backend, q, k, v, key_padding_mask=mask), _forward("reference", q, k, v, key_padding_mask=mask)
    atol, rtol = tolerance(OP, backend, torch.float16)
    torch.testing.assert_close(out[0].float(), ref[0].float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", backend_params(OP, ("cuda",), torch.bfloat16))
def test_cuda_forward_strided_heads(backend):
    """q, k, v as views of one fused qkv projection (strided tokens)."""
    qkv = torch.randn(50, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    out, ref = _forward(backend, q, k, v, cu_seqlens=_cu([20, 30])), _forward("reference", q, k, v,
                                                                              cu_seqlens=_cu([20, 30]))
    atol, rtol = tolerance(OP, backend, torch.bfloat16)
    torch.testing.assert_close(out[0].float(), ref[0].float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", backend_params(OP, ("cuda",), torch.float16))
def test_cuda_is_forward_only(backend):
    q = torch.randn(4, 2, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        flash_attention(q, q, q, cu_seqlens=_cu([4]), backend=backend)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS, *backend_params(OP, ("cuda",), torch.float16)])
def test_nan_semantics_agree_and_padding_never_leaks(backend, softcap):
    """NaN in masked-out keys/values never reaches a real row; a query row holding a NaN or an infinity gives NaN
    there (soft-capped too: tanh would make an infinite score finite), also where the infinity makes every score of
    the row -inf (softmax's 0/0), and a padded query row gives zeros whatever it holds, on every backend alike."""
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = (t.detach() for t in _inputs((2, 5, 2, 64), 2, dtype))
    mask = _mask([3, 5], 5)
    if backend == "cuda" and softcap:  # refused, not skipped: under make gpu-check a skipped GPU test fails
        with pytest.raises(ValueError, match="backend 'cuda' of flash_attention has no softcap"):
            flash_attention(q, k, v, key_padding_mask=mask, softcap=softcap, backend=backend)
        return
    k[0, 4], v[0, 4], v[0, 3] = float("nan"), float("nan"), float("inf")
    q[1, 2, 0, 0], q[0, 4, 0, 0], q[1, 1, 1, 5] = float("nan"), float("nan"), float("-inf")
    k[1, :, 0, 7] = k[1, :, 0, 7].abs() + 0.5
    q[1, 3, 0, 7] = float("-inf")  # every score of head 0 of token 3 is -inf
    with torch.no_grad():
        out = flash_attention(q, k, v, key_padding_mask=mask, softcap=softcap, backend=backend)
    assert torch.isfinite(out[0, :3]).all()            # the padding of sequence 0 did not leak
    assert (out[0, 3:] == 0).all()                      # padded query rows are zeros, even a NaN one
    assert out[1, 2, 0].isnan().all() and torch.isfinite(out[1, 2, 1]).all()  # query head 0 of token 2 is NaN
    assert out[1, 1, 1].isnan().all() and torch.isfinite(out[1, 1, 0]).all()  # head 1 of token 1: -inf in q
    assert out[1, 3, 0].isnan().all() and torch.isfinite(out[1, 3, 1]).all()  # head 0 of token 3: all scores -inf
    assert torch.isfinite(out[1, [0, 4]]).all()
    with torch.no_grad():
        packed, lse = flash_attention(q[1], k[1], v[1], cu_seqlens=_cu([5]), softcap=softcap, backend=backend,
                                      return_lse=True)
    assert packed[2, 0].isnan().all() and torch.isfinite(packed[2, 1]).all()
    assert lse[0, 2].isnan() and torch.isfinite(lse[1, 2]) and torch.isfinite(lse[:, [0, 4]]).all()
    assert packed[1, 1].isnan().all() and torch.isfinite(packed[1, 0]).all()
    assert packed[3, 0].isnan().all() and torch.isfinite(packed[3, 1]).all()
    assert lse[0, 3].isnan() and torch.isfinite(lse[1, 3])
    assert lse[1, 1].isnan() and torch.isfinite(lse[0, 1])  # a NaN row's lse is NaN too (the oracle's was +inf)
    assert torch.isfinite(packed[[0, 4]]).all()


def test_benchmark_times_the_triton_variants_under_their_settings(monkeypatch):
    """benchmarks.attention's variant rows run the triton backend with their environment (restored afterwards)."""
    pytest.importorskip("triton")
    from benchmarks import attention as bench
    from kalm_fast.ops.attention import _triton

    if not _registry.triton_interpreting():
        pytest.skip("runs the triton backend on the CPU: needs TRITON_INTERPRET=1")
    seen = []
    for name, env in (("dq_mode", "KALM_ATTENTION_DQ"), ("use_tma", "KALM_ATTENTION_TMA")):
        real = getattr(_triton, name)
        monkeypatch.setattr(_triton, name, lambda *a, _real=real, _env=env: seen.append((_env, os.environ.get(_env)))
                            or _real(*a))
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(bench, "time_fn", lambda fn, repeats: (fn(), {"median_ms": 1.0})[1])  # one run each
    rows = bench.kernel_sweep("cpu", torch.float16, [32], [32], False, 64, 1, with_reference=False, variants=True)
    assert {r["impl"] for r in rows} >= {"triton", "triton tma", "triton atomic-dQ"}
    assert {("KALM_ATTENTION_DQ", "atomic"), ("KALM_ATTENTION_DQ", None), ("KALM_ATTENTION_TMA", "1"),
            ("KALM_ATTENTION_TMA", None)} <= set(seen)
    assert "KALM_ATTENTION_DQ" not in os.environ and "KALM_ATTENTION_TMA" not in os.environ


def test_benchmark_reports_a_failing_kernel_as_a_row(monkeypatch):
    """A kernel that fails at a shape (a compile error, out of memory) is a row with its error in the report, so a
    GPU run's table shows it, while the other kernels are still timed."""
    from benchmarks import attention as bench

    def broken(*args):
        raise RuntimeError("PassManager::run failed")

    real = bench._impls
    monkeypatch.setattr(bench, "_impls", lambda *args: {"broken": broken, "torch": real(*args)["torch"]})
    monkeypatch.setattr(bench, "time_fn", lambda fn, repeats: (fn(), {"median_ms": 1.0})[1])  # one run each
    rows = bench.kernel_sweep("cpu", torch.float32, [8], [32], False, 16, 1, with_reference=False)
    failed = [r for r in rows if r["impl"] == "broken"]
    assert len(failed) == 1 and failed[0]["note"] == "failed: RuntimeError: PassManager::run failed"
    assert (failed[0]["seqlen"], failed[0]["head_dim"], failed[0]["dtype"]) == (8, 32, "float32")
    assert {r["mode"] for r in rows if r["impl"] == "torch"} == {"fwd", "bwd", "fwd+bwd"}


def test_benchmark_torch_varlen_peer_takes_gqa_or_repeats_kv(monkeypatch):
    """benchmarks.attention's torch ``varlen_attn`` peer: GQA through ``enable_gqa`` where torch has it, else K/V
    heads repeated once before the timing."""
    from benchmarks import attention as bench

    calls = []

    def with_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, enable_gqa=False):
        calls.append((k.shape[1], enable_gqa))
        return q

    def without_gqa(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append((k.shape[1], None))
        return q

    q, k = torch.zeros(5, 14, 8), torch.zeros(5, 2, 8)
    for fake, name, call in ((with_gqa, "packed torch varlen_attn", (2, True)),
                             (without_gqa, "packed torch varlen_attn (K/V repeated)", (14, None))):
        monkeypatch.setattr(bench, "varlen_attn", fake)
        ((got_name, fn),) = bench._torch_varlen_case(q, k, k, None, 5).items()
        fn()
        assert got_name == name and calls[-1] == call
