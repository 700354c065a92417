"""kalm_fast: fast kernels and a thin PyTorch API to train and serve KaLM-Embedding-V2-style text embedders.

Public surface: ``Encoder`` (text -> embeddings), ``load_embeddings`` (what ``kalm-fast encode`` wrote),
``ops`` (``mean_pool``, ``flash_attention``, ``focal_infonce``,
``pad``/``unpad``), ``FocalInfoNCELoss``, ``model_soup``. Heavy modules (transformers) load on first use.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "Encoder": ("kalm_fast.encode", "Encoder"),
    "model_soup": ("kalm_fast.train.soup", "model_soup"),
    "load_embeddings": ("kalm_fast.shards", "load_embeddings"),
    "FocalInfoNCELoss": ("kalm_fast.train.losses", "FocalInfoNCELoss"),
    "ops": ("kalm_fast.ops", None),
}

__all__ = ["Encoder", "load_embeddings", "model_soup", "FocalInfoNCELoss", "ops", "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'kalm_fast' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
