"""The public ops of kalm_fast; each checks its arguments and dispatches to a registered backend."""
from .mean_pool import mean_pool
from .attention import flash_attention, pad, unpad
from .focal_infonce import focal_infonce

__all__ = ["mean_pool", "flash_attention", "pad", "unpad", "focal_infonce"]
