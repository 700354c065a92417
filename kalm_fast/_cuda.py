"""Helpers shared by the launchers of GPU kernels (Triton and csrc/): the launch device, argument packing for
kalm_fast._C, dtype codes, device facts."""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

from . import _native

# The dtype codes of csrc/common.cuh.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Compile options of every Triton launch: fused multiply-adds, Triton's default up to 3.9, which warns that its default
# turns them off from 3.10 on. The kernels are checked ahead of time with them (tests/tools/compile_triton_kernels.py).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def launch_device(t: torch.Tensor):
    """A context that makes ``t``'s CUDA device current: Triton and the native launches use the current device
    and its stream, which need not be the tensors' (``Encoder(device="cuda:1")``). A no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor copied to ``device``; to a GPU from pinned memory, so that the copy neither waits for the work
    already queued there nor synchronizes the host with it."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def dtype_code(dtype: torch.dtype, allowed=tuple(DTYPE_CODES)) -> int:
    if dtype not in allowed:
        raise TypeError(f"backend 'cuda' supports dtypes {[str(d) for d in allowed]}, got {dtype}")
    return DTYPE_CODES[dtype]


def pack(struct_name: str, **fields):
    """Fills one launch-argument struct of kalm_fast._C (see csrc/kalm_native.h); unknown fields are an error.

    Works on any build of the module, so argument packing is testable without a GPU."""
    module = _native._load()[0]
    if module is None:
        raise RuntimeError(_native._NOT_BUILT.format(error=_native._load()[1]))
    args = getattr(module, struct_name)()
    for key, value in fields.items():
        if not hasattr(args, key):
            raise AttributeError(f"{struct_name} has no field {key!r}")
        setattr(args, key, value)
    return args


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows start on 16-byte boundaries with a contiguous last dim, else a contiguous copy
    (the kernels move rows as 16-byte vectors; a fresh allocation is aligned)."""
    size = t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def address(t) -> int:
    """Device address of a tensor, 0 for None."""
    return 0 if t is None else t.data_ptr()


def stream_of(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


INTERPRETER_SMS = 2  # off a GPU (Triton's interpreter): small, so that the tests' small shapes split their work too


def sms_to_fill(device: torch.device) -> int:
    """Streaming multiprocessors a Triton launcher sizes its grid for: the GPU's, or INTERPRETER_SMS off a GPU."""
    return sm_count(device.index) if device.type == "cuda" else INTERPRETER_SMS


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def free_memory(device) -> "int | None":
    """Bytes that ``device`` can still allocate: a GPU's free memory plus what torch's caching allocator holds unused;
    the host's ``MemAvailable`` (Linux) for the CPU; None where that is unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
