"""Hugging Face integration: bidirectional attention via transformers' registries (``bidirectional``), packed
batches (``packing``), packed fast paths (``bert_packed``), safe loading (``loading``), and ``EmbeddingModel``."""
from .bidirectional import install, make_bidirectional
from .embedding import EmbeddingModel
from .packing import PackedBatch

__all__ = ["EmbeddingModel", "PackedBatch", "install", "make_bidirectional"]
