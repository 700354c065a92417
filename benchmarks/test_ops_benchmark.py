"""pytest-benchmark entries, one per op and backend that runs here (``make bench``; ``make test`` skips them).

The shapes are the encode path's: a padded [64, 512, 1024] batch to pool, a packed long-tailed 8k-token batch of
Qwen2-0.5B heads (14:2, D = 64) to attend, and B = 1024, M = 7, D = 896 for the loss (forward + backward).
"""
import pytest
import torch

from kalm_fast import _registry
from kalm_fast.ops import Varlen, flash_attention, focal_infonce, mean_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BACKENDS = ["reference", "torch", "triton", "cuda"]


def _run(benchmark, op, backend, fn):
    if backend not in _registry.runnable(op, DEVICE, DTYPE) or (backend == "triton" and DEVICE == "cpu"):
        pytest.skip(f"backend {backend} of {op} does not run {DTYPE} on {DEVICE} here")

    def step():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_pool_64x512x1024(benchmark, backend):
    hidden = torch.randn(64, 512, 1024, device=DEVICE, dtype=DTYPE)
    mask = torch.arange(512, device=DEVICE)[None] < torch.randint(1, 513, (64, 1), device=DEVICE)
    _run(benchmark, "mean_pool", backend, lambda: mean_pool(hidden, mask, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_packed_long_tail(benchmark, backend):
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(20, 61, (140,), generator=g)] + [512] * 4
    varlen = Varlen.from_lengths(lengths, DEVICE)
    q = torch.randn(varlen.total, 14, 64, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(varlen.total, 2, 64, device=DEVICE, dtype=DTYPE) for _ in range(2))
    with torch.no_grad():
        _run(benchmark, "flash_attention", backend,
             lambda: flash_attention(q, k, v, cu_seqlens=varlen, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_infonce_fwd_bwd_1024x8x896(benchmark, backend):
    q = torch.randn(1024, 896, device=DEVICE, dtype=DTYPE, requires_grad=True)
    docs = torch.randn(1024, 8, 896, device=DEVICE, dtype=DTYPE, requires_grad=True)

    def step():
        loss = focal_infonce(q, docs, temperature=0.01, gamma=0.5, backend=backend)
        torch.autograd.grad(loss, (q, docs))

    _run(benchmark, "focal_infonce", backend, step)
