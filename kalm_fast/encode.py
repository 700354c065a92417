"""``Encoder``: sentence-transformers-style ``encode`` on kalm_fast's packed, bidirectional execution."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .models import EmbeddingModel
from .ops import mean_pool

# Tokens per packed batch when the caller gives no budget (CPU: fits the caches; GPU: fills the device). Decoder
# LLMs on CPU: 1024 (`python -m benchmarks.encode --token-budgets 1024,4096`, Qwen2-0.5B-shaped, one thread: equal on
# short texts, 11-17% faster on the long-tailed mix; MiniLM is 4-35% faster at 4096).
DEFAULT_TOKENS = {"cpu": 4096, "cuda": 32768, "cpu-decoder": 1024}


def kalm_query_prompt(task: str) -> str:
    """The KaLM-Embedding-V2 query prefix for an instruction, e.g. ``"Instruct: {task} \\n Query: "``."""
    return f"Instruct: {task} \n Query: "


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_sequences: Optional[int] = None) -> Iterator[list]:
    """Indices grouped into batches of at most ``max_tokens`` tokens (``max_sequences`` texts), longest first.

    A text longer than ``max_tokens`` gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch, tokens = [], 0
    for i in order:
        n = max(int(lengths[i]), 1)
        if batch and (tokens + n > max_tokens or (max_sequences and len(batch) >= max_sequences)):
            yield batch
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        yield batch


class Encoder:
    """Text -> embeddings, same call shape and results as ``SentenceTransformer.encode`` for the same model.

    ``Encoder()`` loads the embedded default model offline. ``prompts`` (name -> prefix) extends the model's own
    sentence-transformers prompts. Inputs are tokenized once, sorted by length, packed without padding into
    batches of about ``max_tokens_per_batch`` tokens, and pooled with ``ops.mean_pool``; order is restored.
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
        key = self.device.type
        if self.model._packed_decoder is not None and f"{key}-decoder" in DEFAULT_TOKENS:
            key = f"{key}-decoder"
        budget = max_tokens_per_batch or DEFAULT_TOKENS.get(key, 16384)
        if budget < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError("batch_size and max_tokens_per_batch must be positive")
        normalize = normalize_embeddings or self.model.normalize
        prefix = self._resolve_prompt(prompt, prompt_name, task_name, prompt_type)
        if prefix:
            texts = [prefix + t for t in texts]
        out = torch.empty(len(texts), dim, dtype=torch.float32, device=self.device)
        if texts:
            ids = self.model.token_ids(texts)
            batches = list(token_budget_batches([len(x) for x in ids], budget, batch_size))
            show = len(texts) >= 2048 if show_progress_bar is None else show_progress_bar
            from tqdm.auto import tqdm

            for index in tqdm(batches, desc="Batches", disable=not show):
                batch = self.model.pack([ids[i] for i in index])
                hidden = self.model.token_embeddings(batch)
                emb = mean_pool(hidden, cu_seqlens=batch["cu_seqlens"], dim=dim, normalize=normalize)
                out[torch.tensor(index, device=self.device)] = emb.float()
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
        texts = [c if isinstance(c, str) else (f"{c.get('title', '')} {c['text']}".strip()) for c in corpus]
        kwargs.setdefault("prompt_type", "document")
        return self.encode(texts, **kwargs)

    def similarity(self, a, b) -> torch.Tensor:
        """Cosine similarity matrix ``[len(a), len(b)]`` of two embedding arrays (as sentence-transformers)."""
        a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
