"""Bidirectional attention for Hugging Face models through transformers' own extension points.

``install()`` registers an attention function and a mask function named ``"kalm_fast"`` in transformers'
``AttentionInterface`` / ``AttentionMaskInterface``. ``make_bidirectional(model, backend)`` then switches a
loaded model to them and sets ``config.is_causal = False``, which makes transformers build a bidirectional
(padding-only) mask instead of a causal one for decoder LLMs (Qwen2/3, Llama, Mistral). No model code is copied.
A last-token-pooled decoder (Qwen3-Embedding style) keeps its causal mask instead (``runs_causally``,
``make_bidirectional(..., causal=True)``): kalm_fast's attention then runs causally.

Two batch layouts reach the attention function:
- packed input ``[1, T]`` with a ``kalm_varlen`` keyword argument (a checked ``kalm_fast.ops.Varlen``, what
  ``EmbeddingModel`` passes) or flash-attention's ``cu_seq_lens_q`` / ``max_length_q`` (checked in every layer);
  transformers forwards such keyword arguments from ``model(...)`` down to every attention call;
- padded ``[B, L]`` input: the mask function hands the 2-D key padding mask (or None) to the attention, which
  unpads q/k/v by it; the unpadding (one synchronization) is computed once per forward, since every layer gets
  the same mask object.
Both run through ``kalm_fast.ops.flash_attention``.
"""
from __future__ import annotations

import weakref

import torch

from .. import ops
from ..ops.attention import TRITON_MAX_HEAD_DIM
from ..ops.attention.padding import unpad_layout

NAME = "kalm_fast"
# What runs packed through kalm_fast's attention, tested against transformers' own forward.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert",
                         "modernbert", "nomic_bert", "gte", "eurobert", "jina_embeddings_v3",
                         "embedding_gemma2", "embedding_gemma2_text",
                         "qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text")
# Encoders that keep their own attention (MPNet's, DeBERTa-v2's and T5's relative position biases, RoFormer's
# rotary embedding inside its attention, LongT5's local blocks): texts packed in one row would attend to each other
# there, so ``EmbeddingModel`` runs them padded through their own modules (bidirectional already; the T5 family:
# its encoder), also tested against transformers. Other families are refused.
OWN_ATTENTION_MODEL_TYPES = ("mpnet", "deberta-v2", "roformer", "t5", "mt5", "umt5", "longt5")
# Local layers run with their window, a band of ``flash_attention``: transformers hands a local layer's window w to
# the attention function, flash-attention style, for keys |i - j| < w (ModernBERT: w is half its local_attention,
# plus one; EmbeddingGemma 2's w is its sliding_window plus one). Run bidirectionally, these families' windows widen to
# |i - j| <= w, as transformers' masks for ``is_causal: false`` make them; causally they stay 0 <= i - j < w. Layer
# types, which also pick each layer's RoPE base, stay as they are. Gemma 3 gets transformers' own bidirectional
# switch (``use_bidirectional_attention``) instead, which keeps |i - j| < w.
_IS_CAUSAL_WINDOWS = ("gemma2", "qwen2", "qwen3", "mistral")
# The families whose transformers models slide (a ``sliding_window`` in another family's config, Llama's say, is
# ignored by transformers, and so here).
_SLIDING_MODEL_TYPES = _IS_CAUSAL_WINDOWS + ("gemma3_text", "modernbert", "embedding_gemma2_text")
# Multimodal models of which kalm_fast runs the text model alone (``load_transformer`` builds it from the
# checkpoint): the attribute that holds it.
TEXT_MODEL_ATTRIBUTES = {"embedding_gemma2": "language_model"}
# The oldest transformers that runs each family right with kalm_fast, and why.
MIN_TRANSFORMERS = {
    "gemma3_text": ("5.16", "which would halve its sliding window on every save"),
    "modernbert": ("5.7", "whose ModernBERT cannot switch to another attention function"),
    # rotary encoders that were custom code on the Hub before transformers built them in
    "eurobert": ("5.5", "before 5.3 it has no EuroBERT built in, 5.4 cannot build its config, and kalm_fast is "
                        "tested with EuroBERT from 5.5"),
    "jina_embeddings_v3": ("5.4", "which has no Jina Embeddings v3 built in"),
    "nomic_bert": ("5.5", "which has no NomicBERT built in"),
    "gte": ("5.18", "which has no GTE built in"),
    # EmbeddingGemma 2, and the text model kalm_fast runs of it
    "embedding_gemma2": ("5.19", "which has no EmbeddingGemma 2 built in"),
    "embedding_gemma2_text": ("5.19", "which has no EmbeddingGemma 2 built in"),
}


# Decoder LLM families: the ones a last-token pooling runs causally (``runs_causally``); those of them whose
# transformers config reads ``use_bidirectional_attention``.
DECODER_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text")
_USE_BIDIRECTIONAL = ("gemma", "gemma3_text")


def runs_causally(config, pooling: str) -> bool:
    """Whether a model runs with its causal mask: a decoder LLM pooled by its last token (Qwen3-Embedding style, as
    sentence-transformers runs it) unless its config says it is bidirectional (``is_causal: false``, or Gemma's
    ``use_bidirectional_attention: true``, which only the Gemma families read). Everything else runs
    bidirectionally, the KaLM way."""
    return (pooling == "lasttoken" and config.model_type in DECODER_MODEL_TYPES
            and getattr(config, "is_causal", True) is not False
            and not (config.model_type in _USE_BIDIRECTIONAL and getattr(config, "use_bidirectional_attention", False)))


def check_model_type(model_type, where) -> None:
    """A ValueError naming ``where`` (a config file) when kalm_fast does not run ``model_type``, before any weights
    load."""
    if model_type == "gemma3":
        raise ValueError(f"{where}: model_type 'gemma3' is Gemma 3 with its vision tower; kalm_fast runs the text "
                         "model only: save its language model (transformers' Gemma3TextModel, model_type "
                         "'gemma3_text') and load that")
    if model_type not in SUPPORTED_MODEL_TYPES + OWN_ATTENTION_MODEL_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported by kalm_fast (tested: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES + OWN_ATTENTION_MODEL_TYPES)})")
    if model_type in MIN_TRANSFORMERS:
        import transformers
        from packaging.version import Version

        oldest, why = MIN_TRANSFORMERS[model_type]
        if Version(transformers.__version__) < Version(oldest):
            raise ValueError(f"{where}: a {model_type} model needs transformers >= {oldest} (found "
                             f"{transformers.__version__}, {why})")


def local_window(config):
    """The sliding window of ``config``'s local layers (``sliding_window``), None when no layer slides."""
    layer_types = getattr(config, "layer_types", None)
    if (config.model_type not in _SLIDING_MODEL_TYPES or getattr(config, "sliding_window", None) is None
            or not getattr(config, "use_sliding_window", True)
            or (layer_types is not None and "sliding_attention" not in layer_types)):
        return None
    return config.sliding_window


def layer_window(attention):
    """The window transformers hands the attention function of an ``attention`` module of a decoder layer: its own
    ``sliding_window`` (Qwen2/Qwen3: None on full-attention layers), Mistral's config's, else None (Llama)."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return attention.config.sliding_window if attention.config.model_type == "mistral" else None


def window_band(config, window):
    """``flash_attention``'s ``window`` for the ``window`` w transformers hands a local layer's attention: keys
    ``|i - j| < w``, ``(w - 1, w - 1)``, or ``|i - j| <= w``, ``(w, w)``, where ``make_bidirectional`` recorded so
    (``kalm_window_inclusive``); None for a full-attention layer (w None)."""
    if window is None:
        return None
    reach = window if getattr(config, "kalm_window_inclusive", False) else window - 1
    return reach, reach


def runtime_only_keys(config) -> tuple:
    """The config attributes ``make_bidirectional`` sets for kalm_fast's own run, which a saved config leaves out:
    the attention backend, whether local windows include their edge (``kalm_window_inclusive``), and Gemma 3's
    ``is_causal`` (its ``use_bidirectional_attention`` already makes transformers run it bidirectionally with local
    layers at |i - j| < window; ``is_causal: false`` would widen them to |i - j| <= window there), unless its own
    config said ``is_causal: false``."""
    keys = ("kalm_attn_backend", "kalm_causal", "kalm_window_inclusive")
    if config.model_type == "gemma3_text" and not getattr(config, "kalm_window_inclusive", False):
        keys += ("is_causal",)
    return keys


def kalm_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function. ``query [B, Hq, L, D]``, ``key/value [B, Hkv, L, D]`` ->
    ``([B, L, Hq, D], None)``. ``softcap`` (Gemma 2's soft-capped logits) is passed on.

    Attention-probability dropout is not applied (``flash_attention`` has none); hidden-state dropout still is.
    Under autocast q, k and v run in the autocast dtype, as transformers' SDPA attention does: the rotary embedding
    (float32 cos/sin) promotes q and k to float32 there while v stays in the autocast dtype.
    """
    backend = getattr(module.config, "kalm_attn_backend", "auto")
    causal = getattr(module.config, "kalm_causal", False)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    band = window_band(module.config, kwargs.get("sliding_window"))  # a local layer's
    softcap = kwargs.get("softcap")
    varlen = kwargs.get("kalm_varlen")
    if varlen is None and kwargs.get("cu_seq_lens_q") is not None:
        varlen = kwargs["cu_seq_lens_q"]
    if varlen is not None:
        if q.shape[0] != 1:
            raise ValueError(f"packed attention needs a batch of one row [1, T], got query shape {tuple(query.shape)}")
        out = ops.flash_attention(q[0], k[0], v[0], cu_seqlens=varlen, causal=causal, window=band,
                                  softmax_scale=scaling, softcap=softcap, backend=backend)
        return out.unsqueeze(0), None
    if attention_mask is None:
        return ops.flash_attention(q, k, v, causal=causal, window=band, softmax_scale=scaling, softcap=softcap,
                                   backend=backend), None
    if attention_mask.shape != q.shape[:2]:
        raise ValueError(f"kalm_fast attention takes a [B, L] = {list(q.shape[:2])} key padding mask, got shape "
                         f"{list(attention_mask.shape)}")
    indices, varlen = _forward_layout(attention_mask.bool())
    packed = ops.flash_attention(*(x.flatten(0, 1)[indices] for x in (q, k, v)), cu_seqlens=varlen, causal=causal,
                                 window=band, softmax_scale=scaling, softcap=softcap, backend=backend)
    return ops.pad(packed, indices, q.shape[0], q.shape[1]), None


_last_layouts = []  # (weak reference to a padding mask of the latest forward, its unpad_layout), the latest two


def _forward_layout(mask: torch.Tensor):
    """``unpad_layout(mask)``, computed once for every layer of a forward: ``kalm_mask`` makes a new mask object per
    forward (one per layer type: full and sliding) and the model hands the same objects to each layer."""
    global _last_layouts
    for ref, layout in _last_layouts:
        if ref() is mask:
            return layout
    layout = unpad_layout(mask)
    _last_layouts = [(weakref.ref(mask), layout)] + _last_layouts[:1]
    return layout


def kalm_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
              attention_mask=None, config=None, **kwargs):
    """transformers mask function: the 2-D padding mask ``[B, L]`` (bool) or None when nothing is padded. Called with
    keywords; transformers < 5.4 passes ``cache_position`` instead of ``q_length`` / ``q_offset``, which are unused.

    Which mask function transformers composed (bidirectional, causal, wrapped for packed position ids, ...) does not
    matter: kalm_fast's attention masks within each sequence itself, bidirectionally or causally as
    ``make_bidirectional`` recorded (``config.kalm_causal``)."""
    if getattr(config, "kalm_causal", None) is None:
        raise ValueError("kalm_fast attention needs make_bidirectional(model) first (it records whether the model "
                         "runs bidirectionally or causally)")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(attention_mask.all()) else attention_mask


_installed = False


def install() -> None:
    """Register ``"kalm_fast"`` in transformers' attention and mask registries (idempotent)."""
    global _installed
    if _installed:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, kalm_attention_forward)
    AttentionMaskInterface.register(NAME, kalm_mask)
    _installed = True


def make_bidirectional(model, backend: str = "auto", max_length: int = 512, causal: bool = False):
    """Switch a transformers model (decoder LLM or BERT-like encoder) to kalm_fast bidirectional attention, or with
    ``causal`` (a decoder only, see ``runs_causally``) to kalm_fast's attention with the causal mask kept.

    Local layers keep their sliding windows (``window_band``): they attend to ``|i - j| < w``, w the window
    transformers hands the attention function (``sliding_window``; ModernBERT's and EmbeddingGemma 2's plus one), or
    to ``|i - j| <= w`` for Gemma 2, Qwen2, Qwen3 and Mistral run bidirectionally, as transformers runs them with
    ``is_causal: false``. Gemma 3 runs with ``use_bidirectional_attention`` on, as transformers runs it, so that a
    saved model loads bidirectionally in transformers too. A window that reaches every token of a batch's texts (a
    Mistral's 4096 over texts of at most 4096 tokens) costs nothing: ``flash_attention`` runs it as none, so
    ``backend="cuda"``, which has no window, is refused only where the window is shorter than ``max_length``.
    Soft-capped attention logits (Gemma 2's ``attn_logit_softcapping``) are capped by ``flash_attention``
    (``softcap``).

    Encoders that keep their own attention (``OWN_ATTENTION_MODEL_TYPES``) are left as they are: bidirectional
    already, they take no attention backend but ``"auto"``.
    """
    install()
    config = model.config
    if config.model_type in TEXT_MODEL_ATTRIBUTES:
        raise ValueError(f"the {type(model).__name__} holds a text model and other modalities' towers; kalm_fast runs "
                         f"the text model: pass model.{TEXT_MODEL_ATTRIBUTES[config.model_type]} "
                         "(EmbeddingModel.from_pretrained loads it alone from the checkpoint)")
    check_model_type(config.model_type, f"the {type(model).__name__}")
    if backend == "cuda" and getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"attn_backend 'cuda' has no soft-capping, which the {config.model_type} model's attention "
                         f"logits need (attn_logit_softcapping={config.attn_logit_softcapping}): use 'triton' or "
                         "'auto'")
    if causal and config.model_type not in DECODER_MODEL_TYPES:
        raise ValueError(f"causal attention is for decoder LLMs ({', '.join(DECODER_MODEL_TYPES)}), not "
                         f"{config.model_type!r}")
    if config.model_type in OWN_ATTENTION_MODEL_TYPES:
        if backend != "auto":
            raise ValueError(f"the {config.model_type} model runs its own attention (kalm_fast runs it padded, through "
                             f"its own modules): attn_backend must be 'auto', got {backend!r}")
        return model
    if config.model_type == "gemma3_text":
        # as transformers' from_pretrained(..., use_bidirectional_attention=True): the window becomes |i - j| < it
        # (|i - j| <= it where the config itself says is_causal: false, as transformers then runs it)
        config.kalm_window_inclusive = getattr(config, "is_causal", True) is False
        config.use_bidirectional_attention = not causal
    elif config.model_type in _IS_CAUSAL_WINDOWS:  # transformers' masks for is_causal: false: |i - j| <= window
        config.kalm_window_inclusive = not causal
    widest = max((m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)), default=0)
    if backend in ("triton", "cuda") and widest > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"attn_backend {backend!r} takes head dims up to {TRITON_MAX_HEAD_DIM}; the "
                         f"{config.model_type} model has {widest}: use 'auto' (which runs those layers on 'torch') "
                         "or 'torch'")
    window = local_window(config)
    if backend == "cuda" and window is not None and window < max_length:
        raise ValueError(f"attn_backend 'cuda' has no local window, which the {config.model_type} model's sliding "
                         f"layers need for texts longer than it (sliding_window={window}, max_length={max_length}): "
                         f"use 'triton' or 'auto', or max_length <= {window}")
    if not causal:
        config.is_causal = False
    config.kalm_causal = causal
    config.kalm_attn_backend = backend
    model.set_attn_implementation(NAME)
    if config._attn_implementation != NAME:  # transformers keeps a model's own attention when it cannot switch
        raise ValueError(f"the {config.model_type} model kept its {config._attn_implementation!r} attention: "
                         "kalm_fast's packed batches need its bidirectional attention")
    return model
