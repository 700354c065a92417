"""``Encoder``: sentence-transformers-style ``encode`` on kalm_fast's packed, bidirectional execution."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .models import EmbeddingModel
from .prompts import join_title, kalm_query_prompt


class Encoder:
    """Text -> embeddings, same call shape and results as ``SentenceTransformer.encode`` for the same model.

    ``Encoder()`` loads the embedded default model offline. ``prompts`` (name -> prefix) extends the model's own
    sentence-transformers prompts. ``encode`` runs ``EmbeddingModel.embed``: inputs are tokenized once, sorted by
    length, packed without padding into batches of about ``max_tokens_per_batch`` tokens and mean-pooled; order is
    restored.
    """

    def __init__(self, model_name_or_path=None, *, device=None, dtype=None, max_length: int = 512,
                 attn_backend: str = "auto", prompts: Optional[dict] = None, allow_pickle: bool = False):
        self.model = EmbeddingModel.from_pretrained(model_name_or_path, device=device, dtype=dtype,
                                                    attn_backend=attn_backend, max_length=max_length,
                                                    allow_pickle=allow_pickle)
        self.prompts = {**self.model.prompts, **(prompts or {})}
        self.tokenizer = self.model.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_length(self) -> int:
        return self.model.max_length

    def get_sentence_embedding_dimension(self) -> int:
        return self.model.hidden_size

    def _resolve_prompt(self, prompt, prompt_name, task_name, prompt_type) -> str:
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of the model's prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        kind = getattr(prompt_type, "value", prompt_type)
        if task_name is not None and kind in (None, "query"):
            for key in (f"{task_name}-{kind}" if kind else None, task_name):
                if key in self.prompts:
                    return self.prompts[key]
        if kind in self.prompts:
            return self.prompts[kind]
        if self.model.default_prompt_name and kind is None and task_name is None:
            return self.prompts.get(self.model.default_prompt_name, "")
        return ""

    @torch.no_grad()
    def encode(self, sentences, *, batch_size: Optional[int] = None, max_tokens_per_batch: Optional[int] = None,
               prompt: Optional[str] = None, prompt_name: Optional[str] = None, normalize_embeddings: bool = True,
               truncate_dim: Optional[int] = None, show_progress_bar: Optional[bool] = None,
               convert_to_numpy: bool = True, convert_to_tensor: bool = False, task_name: Optional[str] = None,
               prompt_type=None):
        """Embeddings ``[N, dim]`` (numpy float32 by default; a tensor with ``convert_to_tensor``), or ``[dim]`` for one string.

        ``batch_size`` caps the texts per batch, ``max_tokens_per_batch`` the packed tokens per batch.
        ``task_name`` / ``prompt_type`` ("query" / "document") pick a prompt MTEB-style. A model whose
        sentence-transformers modules end in ``Normalize`` always gives unit vectors, as in sentence-transformers.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"sentences must be strings, item {i} is {type(t).__name__}")
        dim = self.model.hidden_size if truncate_dim is None else truncate_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= self.model.hidden_size:
            raise ValueError(f"truncate_dim must be an int in [1, {self.model.hidden_size}], got {truncate_dim!r}")
        if (max_tokens_per_batch is not None and max_tokens_per_batch < 1) or (batch_size is not None and batch_size < 1):
            raise ValueError("batch_size and max_tokens_per_batch must be positive")
        normalize = normalize_embeddings or self.model.normalize
        prefix = self._resolve_prompt(prompt, prompt_name, task_name, prompt_type)
        if prefix:
            texts = [prefix + t for t in texts]
        show = len(texts) >= 2048 if show_progress_bar is None else show_progress_bar
        out = self.model.embed(texts, max_tokens=max_tokens_per_batch, max_sequences=batch_size, dim=dim,
                               normalize=normalize, show_progress=show)
        if single:
            out = out[0]
        if convert_to_tensor:
            return out
        if convert_to_numpy:
            return out.cpu().numpy()
        return list(out)

    def encode_queries(self, queries, *, task: Optional[str] = None, **kwargs):
        """Queries in the KaLM format ``Instruct: {task} \\n Query: {text}`` (the model's "query" prompt without a task)."""
        if task is not None:
            kwargs["prompt"] = kalm_query_prompt(task)
        else:
            kwargs.setdefault("prompt_type", "query")
        return self.encode(queries, **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        """Documents get no instruction. Items are strings or BEIR-style dicts with ``title`` / ``text``."""
        texts = [c if isinstance(c, str) else join_title(c.get("title"), c["text"]) for c in corpus]
        kwargs.setdefault("prompt_type", "document")
        return self.encode(texts, **kwargs)

    def similarity(self, a, b) -> torch.Tensor:
        """Cosine similarity matrix ``[len(a), len(b)]`` of two embedding arrays (as sentence-transformers)."""
        a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
