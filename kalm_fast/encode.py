"""``Encoder``: ``SentenceTransformer``'s API and results on kalm_fast's packed, bidirectional execution."""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_int
from .distributed import check_device
from .models import EmbeddingModel
from .models.embedding import check_texts
from .models.loading import SIMILARITY_FN_NAMES
from .prompts import join_title, kalm_query_prompt

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")


def quantize_embeddings(embeddings: np.ndarray, precision: str, ranges: Optional[np.ndarray] = None) -> np.ndarray:
    """``[N, D]`` float32 embeddings in ``precision``, byte for byte as sentence-transformers' ``quantize_embeddings``.

    int8 / uint8: 256 buckets per dimension between ``ranges [2, D]`` (min and max; default: those of the
    embeddings themselves, which needs at least 2 rows). binary / ubinary: the signs packed 8 per byte
    (``[N, ceil(D / 8)]``; binary is ubinary - 128 as int8).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision in ("int8", "uint8"):
        if ranges is None:
            if embeddings.ndim == 1 or embeddings.shape[0] < 2:
                raise ValueError(f"precision {precision!r} takes its buckets from the embeddings' ranges, which needs "
                                 "at least 2 of them; encode a batch of texts")
            ranges = np.vstack((embeddings.min(axis=0), embeddings.max(axis=0)))
        ranges = ranges.astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    bits = np.packbits(embeddings > 0, axis=-1)
    return (bits - 128).astype(np.int8) if precision == "binary" else bits


def _as_tensor(x, *, batch: bool, name: str) -> torch.Tensor:
    """Embeddings (tensor, numpy array or list of vectors) as a tensor; half precision and integers (quantized
    embeddings) as float32."""
    try:
        if isinstance(x, (list, tuple)):
            x = torch.stack([torch.as_tensor(v) for v in x]) if x else torch.zeros(0, 0)
        x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be embeddings ([N, D] or [D]: a tensor, a numpy array or a list of vectors), "
                        f"got {type(x).__name__} ({exc})") from None
    if x.dim() not in (1, 2):
        raise ValueError(f"{name} must be embeddings [N, D] or [D], got shape {tuple(x.shape)}")
    if not x.is_floating_point() or torch.finfo(x.dtype).bits < 32:
        x = x.float()
    return x[None] if batch and x.dim() == 1 else x


def _embedding_pair(embeddings1, embeddings2, *, batch: bool) -> tuple:
    a, b = _as_tensor(embeddings1, batch=batch, name="embeddings1"), _as_tensor(embeddings2, batch=batch,
                                                                                 name="embeddings2")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embeddings1 and embeddings2 must have the same dimension D, got {a.shape[-1]} and "
                         f"{b.shape[-1]}")
    return a, b


# name -> (matrix ``[N, M]``, pairwise ``[N]``), as sentence-transformers' similarity functions of the same names.
SIMILARITIES = {
    "cosine": (lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T,
               lambda a, b: (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)),
    "dot": (lambda a, b: a @ b.T, lambda a, b: (a * b).sum(-1)),
    "euclidean": (lambda a, b: -torch.cdist(a, b, p=2.0), lambda a, b: -torch.linalg.vector_norm(a - b, dim=-1)),
    "manhattan": (lambda a, b: -torch.cdist(a, b, p=1.0), lambda a, b: -(a - b).abs().sum(-1)),
}


class EvaluationLog:
    """Where sentence-transformers' evaluators record their metrics on the model they evaluate
    (``model.model_card_data.set_evaluation_metrics``)."""

    def __init__(self):
        self.eval_results = []

    def set_evaluation_metrics(self, evaluator, metrics: dict, epoch: int = 0, step: int = 0) -> None:
        self.eval_results.append(dict(evaluator=type(evaluator).__name__, metrics=dict(metrics), epoch=epoch,
                                      step=step))


class Encoder:
    """Text -> embeddings with ``SentenceTransformer``'s API and results for the same model directory.

    ``Encoder()`` loads the embedded default model offline. ``dtype`` None: the checkpoint's own dtype on a GPU (as
    sentence-transformers loads it), float32 on CPU (half precision is emulated on most CPUs); ``"auto"``: the
    checkpoint's own everywhere. As in sentence-transformers, ``prompts`` (name -> prefix)
    and ``default_prompt_name``, ``truncate_dim`` and ``similarity_fn_name`` override what the model saved, and a
    model always has a "query" and a "document" prompt ("" unless saved or given). ``max_length`` caps the model's own
    max length. ``encode`` runs ``EmbeddingModel.embed``: inputs are tokenized once, sorted by length, packed without
    padding into batches of about ``max_tokens_per_batch`` tokens (padded tokens counted for the models that run
    padded) and pooled as the model says; order is restored.
    """

    def __init__(self, model_name_or_path=None, *, device=None, dtype=None, max_length: Optional[int] = None,
                 attn_backend: str = "auto", prompts: Optional[dict] = None, default_prompt_name: Optional[str] = None,
                 truncate_dim: Optional[int] = None, similarity_fn_name: Optional[str] = None,
                 allow_pickle: bool = False):
        if prompts is not None and (not isinstance(prompts, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())):
            raise TypeError(f"prompts must be a dict of prompt name -> prefix string, got {prompts!r:.200}")
        if dtype is None and check_device(device).type == "cuda":
            dtype = "auto"  # on a GPU the checkpoint's own dtype, as sentence-transformers loads it; float32 on CPU
        self.model = EmbeddingModel.from_pretrained(model_name_or_path, device=device, dtype=dtype,
                                                    attn_backend=attn_backend, max_length=max_length,
                                                    allow_pickle=allow_pickle)
        self.tokenizer = self.model.tokenizer
        self._longest = self.model.max_length  # what the attention was set up for (a "cuda" backend checked for it)
        self.model.prompts = {"query": "", "document": "", **self.model.prompts, **(prompts or {})}
        if default_prompt_name is not None:
            self.model.default_prompt_name = default_prompt_name
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}")
        if truncate_dim is not None:
            self.truncate_dim = truncate_dim
        if similarity_fn_name is not None:
            self.similarity_fn_name = similarity_fn_name
        self.model_card_data = EvaluationLog()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def max_seq_length(self) -> int:
        """sentence-transformers' name of ``max_length``; settable, up to the ``max_length`` the Encoder was made
        with."""
        return self.model.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self._longest:
            raise ValueError(f"max_seq_length must be an int from 1 to {self._longest} (the max_length this Encoder "
                             f"was made with; the model's own is {self.model.model_max_length}), got {value!r}")
        self.model.max_length = value

    @property
    def prompts(self) -> dict:
        return self.model.prompts

    @property
    def default_prompt_name(self) -> Optional[str]:
        return self.model.default_prompt_name

    @property
    def truncate_dim(self) -> Optional[int]:
        return self.model.truncate_dim

    @truncate_dim.setter
    def truncate_dim(self, value: Optional[int]) -> None:
        self.model.truncate_dim = None if value is None else self._check_dim(value, "truncate_dim")

    @property
    def similarity_fn_name(self) -> str:
        """The name of ``similarity``'s function: "cosine" (default), "dot", "euclidean" or "manhattan"."""
        return self.model.similarity_fn_name or "cosine"

    @similarity_fn_name.setter
    def similarity_fn_name(self, value) -> None:
        value = getattr(value, "value", value)  # sentence-transformers' SimilarityFunction enum
        if value not in SIMILARITY_FN_NAMES:
            raise ValueError(f"similarity_fn_name must be one of {list(SIMILARITY_FN_NAMES)}, got {value!r}")
        self.model.similarity_fn_name = value

    def get_embedding_dimension(self) -> int:
        """The dimension of ``encode``'s results: ``truncate_dim`` if set, else the model's."""
        return self.truncate_dim or self.model.embedding_size

    get_sentence_embedding_dimension = get_embedding_dimension

    def get_max_seq_length(self) -> int:
        return self.max_seq_length

    def to(self, *args, **kwargs) -> "Encoder":
        """Moves or casts the model as ``nn.Module.to`` (``enc.to("cuda")``, ``enc.to(torch.bfloat16)``); returns
        the encoder."""
        self.model.to(*args, **kwargs)
        return self

    def _check_dim(self, dim, name: str) -> int:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= self.model.embedding_size:
            raise ValueError(f"{name} must be an int in [1, {self.model.embedding_size}], got {dim!r}")
        return dim

    def resolve_prompt(self, prompt: Optional[str] = None, prompt_name: Optional[str] = None) -> str:
        """The prefix ``encode`` gives each text: ``prompt``, else the prompt named ``prompt_name``, else the default
        prompt, else none ("")."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string (a prefix), got {type(prompt).__name__}")
            if prompt_name is not None:  # as sentence-transformers: a warning, and prompt wins
                warnings.warn(f"pass prompt or prompt_name, not both: prompt_name {prompt_name!r} is ignored in "
                              "favor of prompt", stacklevel=4)
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of the model's prompts "
                                 f"{sorted(self.prompts)}")
            return self.prompts[prompt_name]
        return self.model.default_prompt

    @torch.no_grad()
    def encode(self, inputs=None, prompt_name: Optional[str] = None, prompt: Optional[str] = None,
               batch_size: Optional[int] = None, show_progress_bar: Optional[bool] = None,
               output_value: str = "sentence_embedding", precision: str = "float32", convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, device=None, normalize_embeddings: bool = False,
               truncate_dim: Optional[int] = None, *, max_tokens_per_batch: Optional[int] = None, sentences=None):
        """Embeddings of ``inputs`` (a string or a list of strings), as ``SentenceTransformer.encode``.

        Returns ``[N, dim]`` (numpy float32 by default; a tensor with ``convert_to_tensor``; a list of ``[dim]``
        tensors with neither), or ``[dim]`` for one string. In sentence-transformers' order: mean pooling (without
        the prompt's tokens when the model's pooling has ``include_prompt: false``), the model's Dense and Normalize
        modules if it has them, truncation to ``truncate_dim`` (the argument, else the model's),
        ``normalize_embeddings``, then ``precision`` ("int8" / "uint8" / "binary" / "ubinary" as
        ``quantize_embeddings``).
        ``output_value="token_embeddings"`` gives each text's ``[tokens, H]`` float32 hidden states instead.
        ``batch_size`` caps the texts per batch and ``max_tokens_per_batch`` the packed tokens (results do not
        depend on either); ``device`` moves the model there first. ``sentences`` is the former name of ``inputs``.
        """
        if sentences is not None:
            if inputs is not None:
                raise TypeError("pass inputs or sentences (its former name), not both")
            inputs = sentences
        if inputs is None:
            raise TypeError("encode() needs inputs: a string or a list of strings")
        single = isinstance(inputs, str)
        if not single and (isinstance(inputs, (bytes, dict)) or not isinstance(inputs, Iterable)):
            raise TypeError(f"inputs must be a string or a list of strings, got {type(inputs).__name__}")
        texts = [inputs] if single else check_texts(inputs, "inputs")
        batch_size = check_int("batch_size", batch_size)
        max_tokens_per_batch = check_int("max_tokens_per_batch", max_tokens_per_batch)
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {list(OUTPUT_VALUES)}, got {output_value!r}")
        precision = precision or "float32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if device is not None:
            self.model.to(check_device(device))
        if self.model.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # cast by Encoder.to
            raise TypeError(f"the model's weights are {self.model.dtype}; encode runs float32, float16 or bfloat16 "
                            "weights (Encoder.to(torch.float32))")
        prefix = self.resolve_prompt(prompt, prompt_name)
        batching = dict(max_tokens=max_tokens_per_batch, max_sequences=batch_size,
                        show_progress=len(texts) >= 2048 if show_progress_bar is None else show_progress_bar)
        if output_value == "token_embeddings":
            if precision != "float32":
                raise ValueError("precision applies to sentence embeddings; token_embeddings come in float32")
            tokens = self.model.embed_tokens([prefix + t for t in texts] if prefix else texts, **batching)
            return tokens[0] if single else tokens
        dim = None if truncate_dim is None and self.truncate_dim is None else self._check_dim(
            truncate_dim if truncate_dim is not None else self.truncate_dim, "truncate_dim")
        out = self.model.sentence_embeddings(texts, prompt=prefix, dim=dim, normalize=normalize_embeddings,
                                             **batching)
        if precision != "float32":
            out = torch.from_numpy(quantize_embeddings(out.cpu().numpy(), precision))
        if single:
            out = out[0]
        if convert_to_tensor or (single and not convert_to_numpy):
            return out
        if convert_to_numpy:
            return out.cpu().numpy()
        return list(out)

    def encode_query(self, inputs=None, prompt_name: Optional[str] = None, prompt: Optional[str] = None, **kwargs):
        """``encode`` with the model's "query" prompt unless ``prompt`` / ``prompt_name`` say otherwise (never the
        default prompt), as ``SentenceTransformer.encode_query``."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(inputs, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, inputs=None, prompt_name: Optional[str] = None, prompt: Optional[str] = None, **kwargs):
        """``encode`` with the first of the model's "document", "passage", "corpus" prompts unless ``prompt`` /
        ``prompt_name`` say otherwise, as ``SentenceTransformer.encode_document``."""
        if prompt_name is None and prompt is None:
            prompt_name = next((name for name in ("document", "passage", "corpus") if name in self.prompts), None)
        return self.encode(inputs, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_queries(self, queries, *, task: Optional[str] = None, **kwargs):
        """Queries; with ``task``, in the KaLM format ``Instruct: {task} \\n Query: {text}`` (else ``encode_query``)."""
        if task is not None:
            if not isinstance(task, str) or not task.strip():
                raise ValueError(f"task must be a non-empty string (the instruction), got {task!r}")
            if kwargs.get("prompt") is not None or kwargs.get("prompt_name") is not None:
                raise ValueError("pass task, prompt or prompt_name, not several: task is the KaLM query prompt")
            kwargs["prompt"] = kalm_query_prompt(task)
        return self.encode_query(queries, **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        """Documents (``encode_document``): strings or BEIR-style dicts with ``title`` / ``text``; one string or
        dict gives one vector."""
        single = isinstance(corpus, (str, dict))
        if not single and not isinstance(corpus, Iterable):
            raise TypeError(f"corpus must be a list of strings or of {{'title', 'text'}} dicts, got "
                            f"{type(corpus).__name__}")
        texts = []
        for i, c in enumerate([corpus] if single else corpus):
            if isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("title") or "", str):
                c = join_title(c.get("title"), c["text"])
            if not isinstance(c, str):
                raise TypeError(f"corpus item {i} must be a string or a dict with a string 'text' (and an optional "
                                f"string 'title'), got {c!r:.100}")
            texts.append(c)
        return self.encode_document(texts[0] if single else texts, **kwargs)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """``[N, M]`` scores of every pair by ``similarity_fn_name`` (cosine; dot; euclidean and manhattan as negative
        distances), for ``[N, D]`` / ``[M, D]`` (or ``[D]``) tensors or arrays, as in sentence-transformers."""
        return SIMILARITIES[self.similarity_fn_name][0](*_embedding_pair(embeddings1, embeddings2, batch=True))

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """``[N]`` scores of ``embeddings1[i]`` with ``embeddings2[i]`` by ``similarity_fn_name``."""
        a, b = _embedding_pair(embeddings1, embeddings2, batch=False)
        try:
            torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        except RuntimeError:
            raise ValueError(f"embeddings1 and embeddings2 must hold as many embeddings, got shapes {tuple(a.shape)} "
                             f"and {tuple(b.shape)}") from None
        return SIMILARITIES[self.similarity_fn_name][1](a, b)

    def evaluate(self, evaluator, output_path: Optional[str] = None):
        """Run a sentence-transformers evaluator on this model, as ``SentenceTransformer.evaluate``."""
        return evaluator(self, output_path=output_path)

    def save(self, path) -> None:
        """Write the model in Hugging Face + sentence-transformers layout, with this encoder's prompts,
        ``default_prompt_name``, ``truncate_dim``, ``similarity_fn_name`` and ``max_seq_length`` (as
        sentence-transformers saves them); it loads in both libraries."""
        self.model.similarity_fn_name = self.similarity_fn_name
        self.model.save_pretrained(path, max_seq_length=self.max_seq_length)

    save_pretrained = save
