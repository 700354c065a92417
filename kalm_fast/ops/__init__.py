"""The public ops of kalm_fast, one folder each: the function (argument checks, backend choice) in its
``__init__.py``, the oracle in ``reference.py`` and one module per backend (``_torch``, ``_triton``, ``_cuda``).
``Varlen`` is a packed batch's checked sequence boundaries, which every op takes in place of ``cu_seqlens``."""
from .attention import flash_attention, pad, unpad
from .focal_infonce import focal_infonce
from .mean_pool import mean_pool
from .varlen import Varlen

__all__ = ["mean_pool", "flash_attention", "pad", "unpad", "focal_infonce", "Varlen"]
