"""Backend registry: which implementations of an op exist, where they run, which one ``auto`` picks.

Each op registers one table of ``Backend`` entries (plain data) and its ``auto`` order per device type, e.g.
``{"cuda": ("triton", "torch"), "cpu": ("torch",)}``. A backend's function is named as ``"module:function"`` and
imported on first use, so an op can be used without its optional dependencies (Triton, the native module).
``select`` turns a requested backend name into a callable, or raises an error that says why it cannot run.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Optional

import torch

BACKEND_NAMES = ("auto", "reference", "torch", "triton", "cuda")


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, read once by Triton at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The oldest Triton the kernels are tested with (the interpreter and ahead-of-time compiles: 3.6 to 3.9); older
# ones differ in the APIs the kernels use (3.2's autotuner, for one, needs a GPU driver at import).
MIN_TRITON = (3, 6)


@functools.lru_cache(maxsize=None)
def triton_unavailable() -> Optional[str]:
    """None where Triton's kernels can run in this process, else why not (not importable, or older than
    ``MIN_TRITON``)."""
    try:
        import triton
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton cannot be imported ({exc}); pip install 'triton>={MIN_TRITON[0]}.{MIN_TRITON[1]}'"
    return _triton_too_old(triton.__version__)


def _triton_too_old(version: str) -> Optional[str]:
    release = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if release < MIN_TRITON:
        return (f"triton {version} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest kalm_fast's kernels are "
                f"tested with; pip install 'triton>={MIN_TRITON[0]}.{MIN_TRITON[1]}'")
    return None


# The environment settings that pick kernel variants or paths, read at each call (README's settings table)
KERNEL_SETTINGS = ("KALM_ATTENTION_TMA", "KALM_ATTENTION_DQ", "KALM_FOCAL_INFONCE_BWD", "KALM_PACKED_DECODER",
                   "KALM_FUSED_DECODER")


def kernel_settings() -> dict:
    """``{name: value}`` of the ``KERNEL_SETTINGS`` set in the environment (what benchmark reports and a training
    run's ``run.json`` record beside their numbers)."""
    return {name: os.environ[name] for name in KERNEL_SETTINGS if name in os.environ}


# Where Triton kernels run: CUDA devices, and the CPU only under the interpreter (tests).
TRITON_DEVICES = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
TRITON_HINT = ("on CPU tensors Triton runs only under TRITON_INTERPRET=1; use backend='torch' or move the tensors "
               "to a CUDA device")


@dataclass(frozen=True)
class Backend:
    """One implementation of one op: ``fn`` (``"module:function"``, the op's backend contract), the device types
    and dtypes it takes, ``available()`` (None, or why it cannot run in this process at all) and a ``hint``
    added to the error for a device it does not run on."""

    name: str
    fn: str
    devices: tuple
    dtypes: tuple
    available: Callable[[], Optional[str]] = lambda: None
    hint: str = ""

    def why_not(self, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run inputs on ``device`` with ``dtype``, else the reason."""
        reason = self.available()
        if reason is not None:
            return reason
        if device.type not in self.devices:
            hint = f" ({self.hint})" if self.hint else ""
            return f"backend {self.name!r} of {op} runs on {list(self.devices)} tensors, got {device.type}{hint}"
        if dtype not in self.dtypes:
            return f"backend {self.name!r} of {op} supports dtypes {[str(d) for d in self.dtypes]}, got {dtype}"
        return None

    def load(self) -> Callable:
        module, function = self.fn.split(":")
        return getattr(import_module(module), function)


@dataclass(frozen=True)
class _Op:
    backends: dict
    auto: dict


_OPS: dict[str, _Op] = {}


def register(op: str, backends: list, *, auto: dict) -> None:
    """Register the backend table of ``op`` and its ``auto`` order per device type (``reference`` is the last
    resort of ``auto`` on every device)."""
    for b in backends:
        if b.name not in BACKEND_NAMES[1:]:
            raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {b.name!r}")
    _OPS[op] = _Op({b.name: b for b in backends}, dict(auto))


def backends(op: str) -> dict[str, Backend]:
    """All registered backends of ``op`` by name."""
    return dict(_OPS[op].backends)


def runnable(op: str, device, dtype: torch.dtype) -> list[str]:
    """Names of the backends of ``op`` that can run ``dtype`` tensors on ``device`` in this process."""
    device = torch.device(device)
    return [name for name, b in _OPS[op].backends.items() if b.why_not(op, device, dtype) is None]


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
    """``(name, fn)`` of the backend to run ``op`` on inputs of ``device``/``dtype``; raises with the reason if none
    can."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    table = _OPS[op]
    if backend != "auto":
        if backend not in table.backends:
            raise RuntimeError(f"{op} has no {backend!r} backend; registered: {sorted(table.backends)}")
        reason = table.backends[backend].why_not(op, device, dtype)
        if reason is not None:
            raise RuntimeError(reason)
        return backend, table.backends[backend].load()
    reasons = []
    for name in table.auto.get(device.type, ()) + ("reference",):
        reason = table.backends[name].why_not(op, device, dtype)
        if reason is None:
            return name, table.backends[name].load()
        reasons.append(reason)
    raise RuntimeError(f"no backend of {op} can run {dtype} tensors on {device.type}: " + "; ".join(reasons))
