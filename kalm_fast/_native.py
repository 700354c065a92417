"""Loads the native module ``kalm_fast._C`` and says how it was built.

``build_info()`` works on any machine (CPU-only included). ``cuda_lib()`` returns the module for
launching kernels, or raises a RuntimeError that says why it cannot (package not built, built
without CUDA, no GPU driver).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

_NOT_BUILT = ("kalm_fast._C is missing: the native module was not built ({error}). "
              "Install the package with `pip install -e .` (or `make test`) so setup.py compiles csrc/.")


@lru_cache(maxsize=1)
def _load():
    """(module, None) or (None, the import error's text)."""
    try:
        return importlib.import_module("kalm_fast._C"), None
    except ImportError as exc:
        return None, str(exc)


def build_info() -> dict:
    """How kalm_fast._C was built: ``cuda`` (bool), ``archs`` (list of ints, e.g. [80, 90]), ``nvcc``
    (version string or None) and, when ``cuda`` is False, ``reason``. Raises RuntimeError when the
    module is not built at all."""
    module, error = _load()
    if module is None:
        raise RuntimeError(_NOT_BUILT.format(error=error))
    return dict(module.build_info())


def cuda_unavailable() -> str | None:
    """None when the CUDA kernels of kalm_fast._C can be launched, else the reason (for the registry)."""
    module, error = _load()
    if module is None:
        return _NOT_BUILT.format(error=error)
    info = module.build_info()
    if not info["cuda"]:
        return (f"kalm_fast._C was built without CUDA ({info.get('reason', 'unknown reason')}); "
                "reinstall with nvcc on PATH (or CUDA_HOME set) to get backend='cuda'")
    return None


def cuda_lib():
    """The native module, checked to have its CUDA kernels; raises RuntimeError otherwise."""
    reason = cuda_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    return _load()[0]
