"""Backend registry: which implementations of an op exist, what they can run, how exact they are.

Every op (``mean_pool``, ``flash_attention``, ``focal_infonce``) registers its backends here with the
devices and dtypes they accept, a preference rank for ``backend="auto"`` (lower wins) and the tolerances
tests hold them to against ``reference``. ``select`` turns a requested backend name into a ``Backend``
or raises an error that says why it cannot run the inputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BACKEND_NAMES = ("auto", "reference", "torch", "triton", "cuda")

# (atol, rtol) a backend must meet against the reference, per input dtype.
DEFAULT_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``fn`` takes the op's already-checked arguments. ``available()`` returns None when the backend can be
    used in this process at all, else the reason (e.g. "triton is not installed"). ``devices`` are
    ``torch.device.type`` strings; ``rank`` orders backends for ``auto`` (lower is preferred).
    """

    op: str
    name: str
    fn: Callable
    devices: tuple
    dtypes: tuple
    rank: int
    tolerances: dict = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    available: Callable[[], Optional[str]] = lambda: None

    def why_not(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run inputs on ``device`` with ``dtype``, else the reason."""
        reason = self.available()
        if reason is not None:
            return reason
        devices = self.devices
        if self.name == "triton" and triton_interpreting():
            devices = tuple(devices) + ("cpu",)
        if device.type not in devices:
            extra = ""
            if self.name == "triton" and device.type == "cpu":
                extra = " (on CPU tensors Triton runs only under TRITON_INTERPRET=1; use backend='torch' or move the tensors to a CUDA device)"
            return f"backend {self.name!r} of {self.op} runs on {list(devices)} tensors, got {device.type}{extra}"
        if dtype not in self.dtypes:
            return f"backend {self.name!r} of {self.op} supports dtypes {[str(d) for d in self.dtypes]}, got {dtype}"
        return None


_REGISTRY: dict[str, dict[str, Backend]] = {}


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton cannot be imported ({exc}); pip install triton"
    return None


def register(op: str, name: str, fn: Callable, *, devices, dtypes, rank: int, tolerances=None,
             available: Callable[[], Optional[str]] = lambda: None) -> Backend:
    if name not in BACKEND_NAMES or name == "auto":
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {name!r}")
    backend = Backend(op=op, name=name, fn=fn, devices=tuple(devices), dtypes=tuple(dtypes), rank=rank,
                      tolerances=dict(tolerances or DEFAULT_TOLERANCES), available=available)
    _REGISTRY.setdefault(op, {})[name] = backend
    return backend


def backends(op: str) -> dict[str, Backend]:
    """All registered backends of ``op`` by name."""
    return dict(_REGISTRY.get(op, {}))


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend to run ``op`` on inputs of ``device``/``dtype``; raises with the reason if none can."""
    table = _REGISTRY.get(op, {})
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend != "auto":
        if backend not in table:
            raise RuntimeError(f"{op} has no {backend!r} backend; registered: {sorted(table)}")
        reason = table[backend].why_not(device, dtype)
        if reason is not None:
            raise RuntimeError(reason)
        return table[backend]
    candidates = sorted((b for b in table.values() if b.name != "reference"), key=lambda b: b.rank)
    reasons = []
    for b in candidates:
        if b.name == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests, never an automatic choice
        reason = b.why_not(device, dtype)
        if reason is None:
            return b
        reasons.append(reason)
    if "reference" in table and table["reference"].why_not(device, dtype) is None:
        return table["reference"]
    raise RuntimeError(f"no backend of {op} can run {dtype} tensors on {device.type}: " + "; ".join(reasons))
