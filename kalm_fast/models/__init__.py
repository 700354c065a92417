"""Hugging Face integration: bidirectional attention via transformers' registries, packed execution, safe loading."""
from .attention import install, make_bidirectional
from .embedding import EmbeddingModel

__all__ = ["EmbeddingModel", "install", "make_bidirectional"]
