import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def triton_device() -> str:
    """Where Triton tests run: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if HAS_CUDA and not INTERPRET else "cpu"


def skip_unless_triton_runs():
    if triton_device() == "cpu" and not INTERPRET:
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (make test sets it)")
