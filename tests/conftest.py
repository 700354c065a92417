"""Shared test scaffolding: where the op tests run, each op's backend matrix with its tolerances, the GPU marker.

On a CPU machine (``make test`` sets ``TRITON_INTERPRET=1``) the Triton backends run in the interpreter on CPU
tensors and the ``cuda`` backends skip; on a GPU machine (``make gpu-check``, ``TRITON_INTERPRET=0``) every op test
runs on the GPU, compiled. Tests marked ``gpu`` exercise a GPU code path; under ``make gpu-check``
(``KALM_GPU_CHECK=1``) a skipped ``gpu`` test counts as a failure.
"""
import os
import re
from pathlib import Path

import pytest
import torch

from kalm_fast import _registry

INTERPRET = _registry.triton_interpreting()
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"  # where the op tests put their tensors
GPU_CHECK = os.environ.get("KALM_GPU_CHECK", "0") == "1"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BPE_TOKENIZER = FIXTURES / "bpe-8k"  # a byte-level BPE for decoder models; the MiniLM package is not everywhere

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# an op test on DEVICE's tensors that make gpu-check runs too (on a GPU machine; a no-op mark elsewhere)
gpu_when_there = pytest.mark.gpu if DEVICE == "cuda" else pytest.mark.usefixtures()

_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
_POOL = {_F32: (1e-5, 1e-5), _F16: (1e-3, 1e-3), _BF16: (8e-3, 8e-3)}
_LOSS = {_F32: (1e-4, 1e-4), _F16: (2e-3, 2e-3), _BF16: (2e-2, 2e-2)}
# (atol, rtol) each backend must meet against the reference, per op and input dtype (attention's atol is scaled by
# the largest expected value in the tests: gradients grow with the sequence length).
TOLERANCES = {
    "mean_pool": {"reference": _POOL, "torch": _POOL, "triton": _POOL, "cuda": _POOL},
    "flash_attention": {
        "reference": {_F32: (1e-6, 1e-6), _F16: (1e-3, 1e-3), _BF16: (1e-2, 1e-2)},
        "torch": {_F32: (1e-5, 1e-5), _F16: (4e-3, 4e-3), _BF16: (3e-2, 3e-2)},
        "triton": {_F32: (1e-5, 1e-5), _F16: (5e-3, 5e-3), _BF16: (3e-2, 3e-2)},
        "cuda": {_F16: (1e-2, 1e-2), _BF16: (5e-2, 5e-2)},
    },
    "focal_infonce": {"reference": {_F32: (1e-5, 1e-5), _F16: (2e-3, 2e-3), _BF16: (2e-2, 2e-2)},
                      "torch": _LOSS, "triton": _LOSS, "cuda": _LOSS},
}


def tolerance(op: str, backend: str, dtype: torch.dtype) -> tuple:
    return TOLERANCES[op][backend][dtype]


def backend_params(op: str, names=("torch", "triton", "cuda"), dtype: torch.dtype = torch.float32, *,
                   gpu_only: bool = False) -> list:
    """``pytest.param(name)`` for each backend of ``op``: Triton and CUDA ones marked ``gpu`` (and ``torch`` on a GPU
    machine, where it runs on the GPU: ``auto``'s fallback there), CUDA ones also ``native``, each skipped with the
    registry's reason when it cannot run ``dtype`` tensors on ``DEVICE`` here (and, with ``gpu_only``, off a GPU:
    cases the interpreter cannot check, such as bf16 dots)."""
    params = []
    for name in names:
        reason = _registry.backends(op)[name].why_not(op, torch.device(DEVICE), dtype)
        if gpu_only and DEVICE != "cuda":
            reason = "checked on a GPU only (make gpu-check)"
        marks = [pytest.mark.skipif(reason is not None, reason=str(reason))]
        if name in ("triton", "cuda") or (name == "torch" and DEVICE == "cuda"):
            marks.append(pytest.mark.gpu)
        if name == "cuda":
            marks.append(pytest.mark.native)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def skip_unless_transformers_runs(model_type: str) -> None:
    """Skip where the installed transformers is older than kalm_fast needs for ``model_type`` (which it then refuses
    by name, tested in test_models): the lower end of the transformers range runs the model tests too."""
    import transformers
    from packaging.version import Version

    from kalm_fast.models.bidirectional import MIN_TRANSFORMERS

    oldest = MIN_TRANSFORMERS.get(model_type, ("0",))[0]
    if Version(transformers.__version__) < Version(oldest):
        pytest.skip(f"{model_type} needs transformers >= {oldest}")


def skip_unless_transformers_reads_is_causal() -> None:
    """Skip where transformers' masks ignore a decoder config's ``is_causal: false`` (before 5.2): a bidirectional
    oracle built from it would run causally there."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.2"):
        pytest.skip("transformers < 5.2 ignores is_causal: false (the bidirectional oracle)")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BPE_TOKENIZER))


# CUDA errors after which a process's CUDA context is lost: every later launch in it fails the same way
CUDA_CONTEXT_LOST = re.compile(r"illegal memory access|illegal address|misaligned address|unspecified launch failure|"
                               r"device-side assert|illegal instruction|CUDA_ERROR_(?:ILLEGAL|MISALIGNED|LAUNCH_FAILED|"
                               r"HARDWARE)", re.IGNORECASE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if GPU_CHECK and report.skipped and item.get_closest_marker("gpu") is not None:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"a GPU test was skipped under make gpu-check: {reason}"
    if (GPU_CHECK and call.excinfo is not None and os.environ.get("PYTEST_XDIST_WORKER")
            and CUDA_CONTEXT_LOST.search(str(call.excinfo.value))):
        # the worker's CUDA context is gone: it ends here, so that pytest-xdist reports this test as the one that
        # crashed it and runs the rest in a fresh worker (make gpu-check lists these in its summary)
        with open(os.environ.get("KALM_GPU_CHECK_FAULTS", os.devnull), "a") as faults:
            faults.write(f"{item.nodeid}: {str(call.excinfo.value).splitlines()[0][:300]}\n")
        os._exit(3)
