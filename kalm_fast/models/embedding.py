"""``EmbeddingModel``: a Hugging Face encoder or decoder LLM run bidirectionally on packed tokens, mean-pooled (or
CLS-pooled, as BGE-style encoders are; or last-token-pooled and causal, as Qwen3-Embedding-style decoders are).
Encoders that keep their own attention (MPNet, DeBERTa-v2, RoFormer, T5) run their batches right-padded instead."""
from __future__ import annotations

import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_int
from .._cuda import free_memory, to_device
from .._registry import BACKEND_NAMES
from ..distributed import check_device
from ..ops import Varlen, mean_pool
from . import bert_packed, decoder_packed, fused_decoder
from .bidirectional import (
    DECODER_MODEL_TYPES,
    OWN_ATTENTION_MODEL_TYPES,
    make_bidirectional,
    runs_causally,
    runtime_only_keys,
)
from .loading import (
    DENSE_ACTIVATIONS,
    POOLING_MODES,
    TEXT_MODEL_TYPES,
    DenseModule,
    load_tokenizer,
    load_transformer,
    lowercase_inputs,
    read_sentence_transformer_info,
    resolve_model_dir,
    token_embedding_size,
)
from .packing import DEFAULT_TOKENS, PackedBatch, pack, pack_padded, token_budget_batches

# Families whose absolute position ids start after the padding index (RoBERTa convention).
_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "mpnet")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _cpu_has_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _position_offset(config) -> int:
    """First absolute position id: RoBERTa-style models count from ``pad_token_id + 1``."""
    return config.pad_token_id + 1 if config.model_type in _ROBERTA_LIKE else 0


def _position_limit(model: nn.Module) -> Optional[int]:
    """The longest text ``model`` can embed when it takes absolute positions from a table (BERT-like): the table's
    size less the first position id; None for rotary and relative-position models, whose saved ``max_seq_length``
    beyond ``max_position_embeddings`` stands, as in sentence-transformers."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and any(isinstance(m, nn.Embedding) and "position" in name for name, m in model.named_modules()):
        return positions - _position_offset(model.config)
    return None


def _one_token(hidden: torch.Tensor, varlen: Varlen, last: bool, dim: Optional[int], normalize: bool) -> torch.Tensor:
    """CLS / last-token pooling: the hidden state of each sequence's first (or ``last``) token, ``[T, H]`` ->
    ``[N, dim or H]`` (a zero vector for an empty sequence), truncated to ``dim`` then L2-normalized if asked.
    Differentiable; no synchronization."""
    lengths = varlen.lengths
    rows = [start + (n - 1 if last else 0) if n else 0
            for start, n in zip(itertools.accumulate([0, *lengths[:-1]]), lengths)]
    out = hidden.index_select(0, to_device(torch.tensor(rows, dtype=torch.long), hidden.device))[:, :dim]
    if 0 in lengths:
        out = out.masked_fill(to_device(torch.tensor([n == 0 for n in lengths]), hidden.device)[:, None], 0.0)
    return F.normalize(out, dim=-1) if normalize else out


def check_gradient_checkpointing(model_class, model_type: str) -> None:
    """A ValueError naming the model when transformers' ``model_class`` cannot checkpoint activations (ALBERT)."""
    if not getattr(model_class, "supports_gradient_checkpointing", True):
        raise ValueError(f"gradient_checkpointing: transformers' {model_class.__name__} (model_type "
                         f"{model_type!r}) does not support it; set it to false")


def resolve_dtype(dtype):
    """A torch dtype, None (float32 weights) or ``"auto"`` (the checkpoint's own dtype) from a name or dtype."""
    if dtype == "auto":
        return dtype
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, 'auto' or a torch dtype, got {dtype!r}")
    return DTYPES[str(dtype)]


def check_texts(texts, name: str = "texts") -> list:
    """``texts`` as a list of strings (a TypeError naming the first that is not)."""
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, got one str (wrap a single text in a list)")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name} must be strings, item {i} is {type(t).__name__}")
    return texts


class DenseLayer(nn.Module):
    """sentence-transformers' Dense module: ``activation(x @ weight.T + bias)``, ``[N, in] -> [N, out]``; its state
    dict has the keys of that module's file (``linear.weight``, ``linear.bias``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "Tanh"):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_name = activation
        self.activation = getattr(nn, activation)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


def _load_dense(spec: DenseModule, dtype, allow_pickle: bool) -> DenseLayer:
    """The ``DenseLayer`` of a checked ``DenseModule`` with its weights, in ``dtype``; pickled weights (written by
    sentence-transformers < 3.1) only with ``allow_pickle``."""
    layer = DenseLayer(spec.in_features, spec.out_features, spec.bias, spec.activation)
    path = spec.weights
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif allow_pickle:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: a Dense module's weights are pickled (sentence-transformers < 3.1 wrote them so), "
                         "which can run code when loaded; save the model with sentence-transformers >= 3.1 or pass "
                         "allow_pickle=True if you trust the files")
    want = set(layer.state_dict())
    if set(state) != want or any(state[k].shape != v.shape for k, v in layer.state_dict().items()):
        shapes = {k: tuple(t.shape) for k, t in state.items()}
        raise ValueError(f"{path}: expected the tensors {sorted(want)} of a Dense module [{spec.out_features}, "
                         f"{spec.in_features}], got {shapes}")
    layer.load_state_dict(state)
    return layer.to(dtype)


class EmbeddingModel(nn.Module):
    """Text -> ``[N, E]`` pooled embeddings (through the model's Dense modules, if any), differentiable: the module
    that is trained and that encodes.

    ``tokenize(texts)`` returns a ``PackedBatch`` (``models.packing``); ``forward(batch)`` runs the transformer on it
    with bidirectional attention (``ops.flash_attention``, varlen; causal for a last-token-pooled decoder,
    ``causal``) and pools with ``ops.mean_pool`` (or takes each text's first / last token: ``pooling``); encoders
    that keep their own attention (``OWN_ATTENTION_MODEL_TYPES``) run it right-padded through their own modules. A
    padded batch (a dict of ``input_ids [B, L]`` and ``attention_mask [B, L]``) is packed first. ``embed(texts)`` is
    the batching loop of inference (token budget, longest first, order restored) that ``Encoder``, evaluation and
    hard-negative mining share. In eval mode without autograd, BERT-family models take the packed fast path
    (``bert_packed``), decoder LLMs on CPU theirs (``decoder_packed``; on a GPU too with ``KALM_PACKED_DECODER=all``).
    Otherwise transformers' modules run, decoder LLMs' with fused ops on a GPU under ``KALM_FUSED_DECODER=1``
    (``fused_decoder``, training included).
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 512, prompts: Optional[dict] = None,
                 normalize: bool = False, attn_backend: str = "auto", default_prompt_name: Optional[str] = None,
                 include_prompt: bool = True, similarity_fn_name: Optional[str] = None,
                 truncate_dim: Optional[int] = None, dense: Sequence[DenseLayer] = (), pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if pooling == "cls" and model.config.model_type in DECODER_MODEL_TYPES:
            raise ValueError(f"CLS pooling is for encoders (a [CLS] token first); a {model.config.model_type} decoder "
                             "has none (sentence-transformers would pool a padding token for an empty text)")
        self.pooling = pooling
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.hidden_size = token_embedding_size(model.config)  # the width of the hidden states it pools
        # sentence-transformers Dense modules after pooling; the embedding size is the last one's
        self.dense = nn.Sequential(*dense)
        sizes = [self.hidden_size] + [layer.linear.out_features for layer in self.dense]
        for layer, size in zip(self.dense, sizes):
            if layer.linear.in_features != size:
                raise ValueError(f"a Dense module takes {layer.linear.in_features} features, but gets {size}")
        self.embedding_size = sizes[-1]
        self.max_length = int(max_length)
        # The sentence-transformers side of the model, read from and saved to its files (``loading``): prompts, whether
        # its modules end in Normalize, whether pooling counts the prompt's tokens, and its saved defaults.
        self.model_max_length = self.max_length  # the model's own limit (what save_pretrained writes)
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.normalize = normalize
        self.include_prompt = include_prompt
        self.similarity_fn_name = similarity_fn_name
        self.truncate_dim = truncate_dim
        self.attn_backend = attn_backend
        self.position_offset = _position_offset(model.config)
        # RoBERTa-style positions skip the padding id wherever it stands (a text may hold the pad token itself)
        self.position_pad_id = model.config.pad_token_id if model.config.model_type in _ROBERTA_LIKE else None
        self.causal = runs_causally(model.config, pooling)
        make_bidirectional(model, attn_backend, self.max_length, causal=self.causal)
        self._packed_bert = bert_packed.PackedBert(model) if bert_packed.supports(model) else None
        self._packed_decoder = decoder_packed.PackedDecoder(model) if decoder_packed.supports(model) else None
        if self._packed_decoder is not None:  # transformers' modules with fused ops under KALM_FUSED_DECODER=1
            fused_decoder.install(model)
        self._copy_fits = {}  # device -> whether the packed paths' copy of the linear weights fits there

    @classmethod
    def from_pretrained(cls, path=None, *, device=None, dtype=None, attn_backend: str = "auto",
                        max_length: Optional[int] = None, allow_pickle: bool = False) -> "EmbeddingModel":
        """Load a local Hugging Face / sentence-transformers directory (None -> the embedded default model).

        ``dtype``: of the weights; None is float32, ``"auto"`` the checkpoint's own (as transformers 5 loads it).

        The model's own max length is sentence-transformers' (its saved ``max_seq_length``, else the tokenizer's
        ``model_max_length`` capped by ``max_position_embeddings``), capped by a table of absolute positions;
        ``max_length`` caps it further. Local layers keep their sliding windows: texts are not cut at them.
        """
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if attn_backend not in BACKEND_NAMES:
            raise ValueError(f"attn_backend must be one of {BACKEND_NAMES}, got {attn_backend!r}")
        dtype, device = resolve_dtype(dtype), check_device(device)
        model_dir = resolve_model_dir(path)
        info = read_sentence_transformer_info(model_dir)
        config, model = load_transformer(info.transformer_dir, dtype=dtype, allow_pickle=allow_pickle)
        if device.type == "cpu" and model.dtype == torch.bfloat16 and not _cpu_has_bf16():  # also from "auto"
            warnings.warn("this CPU has no native bf16 (avx512_bf16 / AMX): bfloat16 runs emulated and slowly; "
                          "use dtype='float32' here", stacklevel=2)
        tokenizer = load_tokenizer(info.transformer_dir, model_dir)
        if info.do_lower_case:
            lowercase_inputs(tokenizer)
        positions = getattr(config, "max_position_embeddings", None)
        own = info.max_seq_length or min(x for x in (tokenizer.model_max_length, positions) if x)
        if _position_limit(model):  # a longer text would index past the table
            own = min(own, _position_limit(model))
        asked = min(x for x in (max_length, own) if x)
        embedder = cls(model, tokenizer, max_length=asked, prompts=info.prompts,
                       normalize=info.normalize, attn_backend=attn_backend,
                       default_prompt_name=info.default_prompt_name, include_prompt=info.include_prompt,
                       pooling=info.pooling,
                       similarity_fn_name=info.similarity_fn_name, truncate_dim=info.truncate_dim,
                       dense=[_load_dense(spec, model.dtype, allow_pickle) for spec in info.dense])
        embedder.model_max_length = own
        return embedder.to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "EmbeddingModel":
        """``nn.Module.train``; leaving training mode drops the packed paths' fused copies of the linear weights: an
        optimizer may have changed the weights in place without bumping their version (fused AdamW does)."""
        if self.training and not mode:
            for packed in (getattr(self, "_packed_bert", None), getattr(self, "_packed_decoder", None)):
                if packed is not None:
                    packed.weight_cache.clear()
        return super().train(mode)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def token_ids(self, texts: Sequence[str]) -> list:
        """Token ids per text, special tokens added, truncated to ``max_length``."""
        return self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def prompt_length(self, prompt: str) -> int:
        """How many leading tokens of a text prefixed with ``prompt`` are the prompt's, counted as sentence-transformers
        does for ``include_prompt: false``: the prompt tokenized alone, less a trailing special token (EOS / SEP)."""
        ids = self.token_ids([prompt])[0]
        return len(ids) - 1 if ids and ids[-1] in self.tokenizer.all_special_ids else len(ids)

    def pack(self, ids: Sequence[Sequence[int]]) -> PackedBatch:
        """A ``PackedBatch`` on the model's device from token id lists."""
        return pack(ids, device=self.device, position_offset=self.position_offset, pad_id=self.position_pad_id)

    def tokenize(self, texts: Sequence[str]) -> PackedBatch:
        """The ``PackedBatch`` of ``texts`` (special tokens added, truncated to ``max_length``)."""
        return self.pack(self.token_ids(texts))

    def token_embeddings(self, batch: PackedBatch) -> torch.Tensor:
        """Last hidden states ``[T, H]`` of a packed batch."""
        if batch.input_ids.numel() == 0:  # only empty texts (a tokenizer without special tokens)
            return torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device)
        if self.config.model_type in OWN_ATTENTION_MODEL_TYPES:
            return self._own_attention_forward(batch)
        # the packed inference paths read the weights themselves: not FSDP-sharded ones (DTensors, which only the
        # modules' own forward gathers)
        inference = not self.training and not torch.is_grad_enabled() and not any(
            hasattr(p, "device_mesh") for p in self.model.parameters())
        device = batch.input_ids.device
        if self._packed_bert is not None and inference and self._weight_copy_fits(device):
            return self._packed_bert(batch)
        if (self._packed_decoder is not None and inference and decoder_packed.runs_on(device)
                and self._weight_copy_fits(device)):
            return self._packed_decoder(batch)
        out = self.model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                         kalm_varlen=batch.varlen, use_cache=False)
        return out.last_hidden_state[0]

    def _own_attention_forward(self, batch: PackedBatch) -> torch.Tensor:
        """``token_embeddings`` of a model that keeps its own attention (MPNet, DeBERTa-v2, RoFormer, T5): its own
        forward over the non-empty texts right-padded ``[N, L]``, with its own position ids, as transformers runs
        it; then the real tokens ``[T, H]`` in the packed order."""
        lengths = torch.tensor([n for n in batch.varlen.lengths if n])
        mask = torch.arange(max(batch.varlen.lengths))[None] < lengths[:, None]  # on the host: no synchronization
        device = batch.input_ids.device
        indices = to_device(mask.flatten().nonzero().flatten(), device)
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        input_ids = batch.input_ids.new_full((mask.numel(),), pad_id).index_copy(0, indices, batch.input_ids)
        hidden = self.model(input_ids=input_ids.view(mask.shape), attention_mask=to_device(mask.long(), device))
        return hidden.last_hidden_state.flatten(0, 1)[indices]

    def _weight_copy_fits(self, device) -> bool:
        """Whether the packed inference paths may build their copy of the linear weights (oneDNN's layout on CPU,
        fused Q/K/V): only when it takes at most half of what ``device`` has free, decided once per device (a 7B
        model on a small machine runs transformers' modules instead, with a warning, rather than run out of
        memory)."""
        if device not in self._copy_fits:
            need = sum(m.weight.numel() * m.weight.element_size() for m in self.model.modules()
                       if isinstance(m, nn.Linear))
            free = free_memory(device)
            self._copy_fits[device] = free is None or need <= free / 2
            if not self._copy_fits[device]:
                warnings.warn(f"the fast inference path would copy the linear weights ({need / 2**30:.1f} GiB) "
                              f"with {free / 2**30:.1f} GiB free on {device}: running transformers' modules "
                              "instead (slower, no second copy)", RuntimeWarning, stacklevel=3)
        return self._copy_fits[device]

    def forward(self, batch, *, dim: Optional[int] = None, normalize: bool = False,
                prompt_length: int = 0) -> torch.Tensor:
        """``[N, dim or E]`` embeddings of a ``PackedBatch`` (or a padded dict), in the model's dtype: pooled (by
        ``pooling``: the mean of the tokens, or the first token's hidden state), through the Dense modules if any
        (E = ``embedding_size``); ``dim`` truncates (Matryoshka) and ``normalize`` L2-normalizes after truncation.
        The first ``prompt_length`` tokens of each text are left out of the mean (sentence-transformers'
        ``include_prompt: false``; mean pooling only)."""
        if prompt_length and self.pooling != "mean":
            raise ValueError(f"prompt_length (include_prompt false) is for mean pooling; this model pools by "
                             f"{self.pooling}")
        if not isinstance(batch, PackedBatch):
            batch = pack_padded(batch["input_ids"], batch["attention_mask"], position_offset=self.position_offset,
                                pad_id=self.position_pad_id)
        if not len(self.dense):
            return self._pool(batch, dim, normalize, prompt_length)
        out = self.dense(self._pool(batch, None, False, prompt_length))[:, :dim]  # pool in full, Dense, truncate
        return F.normalize(out, dim=-1) if normalize else out

    def _pool(self, batch: PackedBatch, dim: Optional[int], normalize: bool, prompt_length: int) -> torch.Tensor:
        """``forward`` without the Dense modules: ``[N, dim or H]``."""
        if batch.input_ids.numel() == 0:  # only empty texts: zero vectors
            return torch.zeros(batch.num_seqs, dim or self.hidden_size, dtype=self.dtype, device=self.device)
        hidden = self.token_embeddings(batch)
        if self.pooling != "mean":
            return _one_token(hidden, batch.varlen, self.pooling == "lasttoken", dim, normalize)
        if not prompt_length:
            return mean_pool(hidden, cu_seqlens=batch.varlen, dim=dim, normalize=normalize)
        # Each text is two segments of the packed tokens, its prompt's and the rest: pool the 2N segments (no copy of
        # the hidden states) and keep the second of each pair.
        cut = [min(prompt_length, n) for n in batch.varlen.lengths]
        segments = Varlen.from_lengths([k for c, n in zip(cut, batch.varlen.lengths) for k in (c, n - c)], self.device)
        return mean_pool(hidden, cu_seqlens=segments, dim=dim, normalize=normalize)[1::2]

    def _batched(self, ids: list, compute, max_tokens: Optional[int], max_sequences: Optional[int],
                 show_progress: bool) -> tuple:
        """``compute(batch)`` for each packed batch of the texts ``ids`` in eval mode: the texts sorted by length, at
        most ``max_tokens`` tokens (default per device: ``DEFAULT_TOKENS``) and ``max_sequences`` texts a batch.
        Returns ``(order, outputs)``: the text indices in the order the batches hold them, and each batch's output."""
        max_tokens, max_sequences = check_int("max_tokens", max_tokens), check_int("max_sequences", max_sequences)
        kind = self.device.type + ("-decoder" if self._packed_decoder is not None else "")
        budget = max_tokens or DEFAULT_TOKENS.get(kind, DEFAULT_TOKENS.get(self.device.type, 16384))
        batches = list(token_budget_batches([len(x) for x in ids], budget, max_sequences,
                                            padded=self.config.model_type in OWN_ATTENTION_MODEL_TYPES))
        was_training = self.training
        self.eval()
        try:  # no host synchronization per batch: the CPU packs the next batch while the GPU runs this one
            outputs = [compute(self.pack([ids[i] for i in index]))
                       for index in tqdm(batches, desc="Batches", disable=not show_progress)]
        finally:
            self.train(was_training)
        return [i for index in batches for i in index], outputs

    @torch.no_grad()
    def embed(self, texts: Sequence[str], *, max_tokens: Optional[int] = None, max_sequences: Optional[int] = None,
              dim: Optional[int] = None, normalize: bool = False, prompt_length: int = 0,
              show_progress: bool = False) -> torch.Tensor:
        """float32 ``[len(texts), dim or E]`` embeddings on the model's device, in the order of ``texts`` (batching as
        ``_batched``; ``dim``, ``normalize`` and ``prompt_length`` as ``forward``)."""
        texts = check_texts(texts)
        out = torch.empty(len(texts), dim or self.embedding_size, dtype=torch.float32, device=self.device)
        if not texts:
            return out
        order, embs = self._batched(self.token_ids(texts), lambda batch: self(batch, dim=dim, normalize=normalize,
                                                                              prompt_length=prompt_length),
                                    max_tokens, max_sequences, show_progress)
        out[torch.tensor(order, device=self.device)] = torch.cat(embs).float()
        return out

    @property
    def default_prompt(self) -> str:
        """The prefix of the prompt named ``default_prompt_name`` ("" when none)."""
        return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name is not None else ""

    @torch.no_grad()
    def sentence_embeddings(self, texts: Sequence[str], *, prompt: str = "", dim: Optional[int] = None,
                            normalize: bool = False, **batching) -> torch.Tensor:
        """float32 ``[len(texts), dim or E]`` as ``SentenceTransformer.encode`` makes them: ``prompt`` before each
        text (its tokens left out of the mean when ``include_prompt`` is false), pooling, the Dense and Normalize
        modules, truncation to ``dim``, then ``normalize``. ``batching``: ``embed``'s ``max_tokens``,
        ``max_sequences``, ``show_progress``."""
        texts = [prompt + t for t in texts] if prompt else texts
        skip = self.prompt_length(prompt) if prompt and not self.include_prompt else 0
        dim = dim or self.embedding_size
        if self.normalize and dim < self.embedding_size:  # Normalize module, then truncation (no renormalization)
            out = self.embed(texts, normalize=True, prompt_length=skip, **batching)[:, :dim]
            return F.normalize(out, dim=-1) if normalize else out
        # one fused pass: pool, truncate, normalize
        return self.embed(texts, dim=dim, normalize=normalize or self.normalize, prompt_length=skip, **batching)

    @torch.no_grad()
    def embed_tokens(self, texts: Sequence[str], *, max_tokens: Optional[int] = None,
                     max_sequences: Optional[int] = None, show_progress: bool = False) -> list:
        """The last hidden states of each text, float32 ``[tokens_i, H]`` on the model's device, in the order of
        ``texts`` (batching as ``_batched``)."""
        texts = check_texts(texts)
        if not texts:
            return []
        order, hidden = self._batched(
            self.token_ids(texts), lambda batch: self.token_embeddings(batch).float().split(batch.varlen.lengths),
            max_tokens, max_sequences, show_progress)
        out = [None] * len(texts)
        for i, tokens in zip(order, itertools.chain.from_iterable(hidden)):
            out[i] = tokens
        return out

    def gradient_checkpointing_enable(self):
        """Recompute each layer's activations in backward (non-reentrant checkpointing)."""
        check_gradient_checkpointing(type(self.model), self.config.model_type)
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(self, directory, *, max_seq_length: Optional[int] = None) -> None:
        """Safetensors weights, config, tokenizer and the sentence-transformers files, in the layout that
        sentence-transformers 2.x to 6.x all load (bidirectional decoders with ``is_causal: false``, Gemma 3 with
        ``use_bidirectional_attention``, so bidirectionally there too; causal last-token-pooled ones without it;
        Dense modules' weights as safetensors, which sentence-transformers reads from 3.1 on; EmbeddingGemma 2 as its
        text model).
        ``max_seq_length``: the one saved (default: the model's own, ``model_max_length``)."""
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
        if max_seq_length is not None:
            limit = _position_limit(self.model)
            if (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1
                    or (limit and max_seq_length > limit)):
                bound = f" up to {limit} (the model's position table)" if limit else ""
                raise ValueError(f"max_seq_length must be a positive int{bound} or None, got {max_seq_length!r}")
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{str(directory)!r} is an existing file; save writes a model directory (give a new "
                             "path or an existing directory)")
        directory.mkdir(parents=True, exist_ok=True)
        runtime = {key: self.config.__dict__.pop(key) for key in runtime_only_keys(self.config)
                   if key in self.config.__dict__}
        try:
            # a multimodal checkpoint's text model as itself, not under the checkpoint's names
            self.model.save_pretrained(str(directory),
                                       save_original_format=self.config.model_type not in TEXT_MODEL_TYPES)
        finally:
            self.config.__dict__.update(runtime)
        self.tokenizer.save_pretrained(str(directory))
        modules = [dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
                   dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling")]
        for layer in self.dense:
            name = str(len(modules))
            (directory / f"{name}_Dense").mkdir(exist_ok=True)
            modules.append(dict(idx=len(modules), name=name, path=f"{name}_Dense",
                                type="sentence_transformers.models.Dense"))
            activation = DENSE_ACTIVATIONS[layer.activation_name]
            with open(directory / f"{name}_Dense" / "config.json", "w", encoding="utf-8") as f:
                json.dump(dict(in_features=layer.linear.in_features, out_features=layer.linear.out_features,
                               bias=layer.linear.bias is not None, activation_function=activation), f, indent=2)
            save_file({k: v.detach().contiguous() for k, v in layer.state_dict().items()},
                      str(directory / f"{name}_Dense" / "model.safetensors"))
        if self.normalize:
            name = str(len(modules))
            modules.append(dict(idx=len(modules), name=name, path=f"{name}_Normalize",
                                type="sentence_transformers.models.Normalize"))
            (directory / f"{name}_Normalize").mkdir(exist_ok=True)
        pooling = dict(word_embedding_dimension=self.hidden_size, pooling_mode_cls_token=self.pooling == "cls",
                       pooling_mode_mean_tokens=self.pooling == "mean", pooling_mode_max_tokens=False,
                       pooling_mode_mean_sqrt_len_tokens=False, pooling_mode_weightedmean_tokens=False,
                       pooling_mode_lasttoken=self.pooling == "lasttoken", include_prompt=self.include_prompt)
        (directory / "1_Pooling").mkdir(exist_ok=True)
        model_config = dict(model_type="SentenceTransformer", prompts=self.prompts,
                            default_prompt_name=self.default_prompt_name,
                            similarity_fn_name=self.similarity_fn_name or "cosine")
        if self.truncate_dim is not None:
            model_config["truncate_dim"] = self.truncate_dim
        files = {"modules.json": modules, "1_Pooling/config.json": pooling,
                 "sentence_bert_config.json": dict(max_seq_length=max_seq_length if max_seq_length is not None
                                                   else self.model_max_length,
                                                   do_lower_case=False),
                 "config_sentence_transformers.json": model_config}
        for name, data in files.items():
            with open(directory / name, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
