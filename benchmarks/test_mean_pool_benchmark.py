"""pytest-benchmark entry for mean pooling (run by `make bench`, not by `make test`)."""
import pytest
import torch

from kalm_fast import _registry
from kalm_fast.ops import mean_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "cuda"])
def test_mean_pool_64x512x1024(benchmark, backend):
    impl = _registry.backends("mean_pool").get(backend)
    if impl is None or impl.why_not(torch.device(DEVICE), DTYPE) is not None:
        pytest.skip(f"backend {backend} cannot run on {DEVICE}")
    hidden = torch.randn(64, 512, 1024, device=DEVICE, dtype=DTYPE)
    mask = torch.arange(512, device=DEVICE)[None] < torch.randint(1, 513, (64, 1), device=DEVICE)

    def step():
        out = mean_pool(hidden, mask, backend=backend)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(step)
