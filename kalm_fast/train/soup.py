"""Model soup: the weighted average of several checkpoints, streamed one tensor at a time.

``model_soup(["a/", "b/"], weights=[0.5, 0.5], output="soup/")`` averages every tensor (in fp32, written
back in its own dtype) of checkpoints that hold the same tensor names, shapes and dtypes. A checkpoint is a
``.safetensors`` file or a model directory (one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``). The output safetensors files are written by hand, header first and then
each averaged tensor, so peak memory is about one tensor per checkpoint. Names, shapes and dtypes are checked
before the first byte is written, values (NaN or inf are refused, naming the tensor) as they are read; the result
appears atomically (written under a temporary name, fsynced, renamed), and on any error nothing appears. Temporary
files a killed soup left next to ``output`` are removed by the next one.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open

from ..files import atomic_write, publish_dir, remove_leftovers
from ..models.loading import TEXT_MODEL_PREFIXES

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _Checkpoint:
    """The safetensors files of one checkpoint and, per tensor, its file, shape and dtype (no data loaded)."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise ValueError(f"checkpoint {self.path} must be a .safetensors file or a model directory")
            self.is_dir, self.shards = False, [self.path.name]
            root = self.path.parent
        elif self.path.is_dir():
            self.is_dir, root = True, self.path
            index = self.path / INDEX_NAME
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.shards = sorted(set(weight_map.values()))
            elif (self.path / "model.safetensors").is_file():
                self.shards = ["model.safetensors"]
            else:
                found = sorted(p.name for p in self.path.glob("*.safetensors"))
                if len(found) != 1:
                    sub = _transformer_subdir(self.path)
                    hint = (f"; its weights are in {sub}/ (an older sentence-transformers layout): save it anew first, "
                            "with Encoder(path).save(new_path)") if sub and not found else ""
                    raise ValueError(f"checkpoint directory {self.path} must hold model.safetensors, sharded files "
                                     f"with {INDEX_NAME}, or exactly one .safetensors file; found {found}{hint}")
                self.shards = found
        else:
            raise ValueError(f"checkpoint {self.path} does not exist")
        self.root = root
        self.tensors = {}  # name -> (shard, shape, dtype string)
        self.metadata = {}
        for shard in self.shards:
            try:
                with safe_open(root / shard, framework="pt") as f:
                    self.metadata[shard] = f.metadata()
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self.tensors[name] = (shard, tuple(sl.get_shape()), sl.get_dtype())
            except Exception as exc:  # missing, truncated or not safetensors: safetensors' own error types
                raise ValueError(f"checkpoint file {root / shard} is not a readable safetensors file ({exc})") from None


def _normalized_weights(weights, n: int) -> list:
    if weights is None:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a list of numbers, one per checkpoint ({n}), got {weights!r:.200}") from None
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per checkpoint ({n}), got {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {weights}")
    return [w / total for w in weights]


def _check_compatible(ckpts: list):
    first = ckpts[0]
    for other in ckpts[1:]:
        missing = sorted(set(first.tensors) - set(other.tensors))
        extra = sorted(set(other.tensors) - set(first.tensors))
        if missing:
            raise ValueError(f"tensor {missing[0]!r} of {first.path} is missing from {other.path}"
                             f" ({len(missing)} missing in all){_text_model_hint(first, other)}")
        if extra:
            raise ValueError(f"tensor {extra[0]!r} of {other.path} is not in {first.path} ({len(extra)} extra in all)"
                             f"{_text_model_hint(first, other)}")
        for name, (_, shape, dtype) in first.tensors.items():
            _, oshape, odtype = other.tensors[name]
            if oshape != shape:
                raise ValueError(f"tensor {name!r} has shape {list(shape)} in {first.path} but {list(oshape)} in "
                                 f"{other.path}")
            if odtype != dtype:
                raise ValueError(f"tensor {name!r} has dtype {dtype} in {first.path} but {odtype} in {other.path}")
    for name, (_, _, dtype) in first.tensors.items():
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which model_soup does not handle")


def _text_model_hint(a, b) -> str:
    """Where one checkpoint holds every tensor of the other under a multimodal checkpoint's text-model prefix
    (EmbeddingGemma 2 as released beside one kalm_fast saved, which is its text model alone): what to do instead."""
    for prefix in TEXT_MODEL_PREFIXES.values():
        for whole, text in ((a, b), (b, a)):
            if text.tensors and all(prefix + name in whole.tensors for name in text.tensors):
                return (f"; {whole.path} holds a multimodal model with its text model under {prefix!r}, {text.path} "
                        "the text model alone: load the multimodal one with kalm_fast and save it (its text model) "
                        "before the soup")
    return ""


def _average(name: str, ckpts: list, weights: list, handles: dict) -> torch.Tensor:
    dtype = _DTYPES[ckpts[0].tensors[name][2]]
    acc = None
    first = None
    for i, (ck, w) in enumerate(zip(ckpts, weights)):
        t = handles[(i, ck.tensors[name][0])].get_tensor(name)
        if dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} of {ck.path} holds NaN or inf values; a soup with it would too")
        if not dtype.is_floating_point:  # integer buffers (e.g. position ids) must agree, not be averaged
            if first is None:
                first = t
            elif not torch.equal(first, t):
                raise ValueError(f"tensor {name!r} is an integer tensor that differs between {ckpts[0].path} "
                                 f"and {ck.path}; it cannot be averaged")
            continue
        acc = t.float() * w if acc is None else acc.add_(t.float(), alpha=w)
    return first if acc is None else acc.to(dtype)


def _write_streaming(path: Path, names: list, ckpts: list, weights: list, shard: Optional[str], metadata):
    """Write one safetensors file holding ``names`` (sorted), computing each tensor only when it is written."""
    ref = ckpts[0].tensors
    header, offset = {}, 0
    for name in names:
        _, shape, dtype = ref[name]
        nbytes = _DTYPES[dtype].itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    handles = {}
    try:
        for i, ck in enumerate(ckpts):
            for sh in ck.shards:
                if shard is None or any(ck.tensors[n][0] == sh for n in names):
                    handles[(i, sh)] = safe_open(ck.root / sh, framework="pt")
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for name in names:
                t = _average(name, ckpts, weights, handles).contiguous()
                out.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    finally:
        handles.clear()


# Weights (averaged ones are written anew; pickled ones would shadow the soup) are never copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx")


def _module_dirs(src: Path) -> list:
    """The sentence-transformers module subdirectories that modules.json of ``src`` names (Pooling, Dense, ...)."""
    modules = src / "modules.json"
    if not modules.is_file():
        return []
    return [m["path"] for m in json.loads(modules.read_text()) if m.get("path") and (src / m["path"]).is_dir()]


def _transformer_subdir(src: Path) -> Optional[str]:
    """The sub-directory modules.json of ``src`` puts the Transformer in (sentence-transformers 2.x and older)."""
    modules = src / "modules.json"
    if not modules.is_file():
        return None
    return next((m["path"] for m in json.loads(modules.read_text())
                 if str(m.get("type", "")).endswith(".Transformer") and m.get("path")), None)


def _copy_side_files(src: Path, dst: Path):
    """Config and tokenizer files of a model directory and of its sentence-transformers module dirs (not weights)."""
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != INDEX_NAME:
            shutil.copy2(item, dst / item.name)
    for sub in _module_dirs(src):
        shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*(f"*{suffix}" for suffix in WEIGHT_SUFFIXES)))


def _check_same_modules(ckpts: list) -> None:
    """Every checkpoint directory has the first's embedding settings (``_embedding_settings``: pooling however its
    config spells it, attention, prompts, the model's config, ...) and weighted sentence-transformers modules (its
    Dense modules: path and config), with their weights only as safetensors (the soup averages those; pickled ones
    it would drop)."""

    def weighted_modules(root: Path) -> list:
        found = []
        for sub in _module_dirs(root):
            for item in sorted((root / sub).iterdir()):
                if item.name.endswith(WEIGHT_SUFFIXES) and item.name != "model.safetensors":
                    raise ValueError(f"{item}: module weights the soup cannot average (only model.safetensors)")
            if (root / sub / "model.safetensors").is_file():
                config = root / sub / "config.json"
                found.append((sub, json.loads(config.read_text()) if config.is_file() else None))
        return found

    settings = _embedding_settings(ckpts[0].path)
    for ckpt in ckpts[1:]:
        other = _embedding_settings(ckpt.path)
        if settings is None or other is None:
            continue
        differ = [key for key in {**settings, **other} if settings.get(key) != other.get(key)]
        if differ:
            raise ValueError(f"checkpoints {ckpts[0].path} and {ckpt.path} embed differently ({differ[0]}: "
                             f"{settings.get(differ[0])!r:.120} and {other.get(differ[0])!r:.120}): a soup averages "
                             "models that embed the same way (it would keep the first one's setting)")
    first = weighted_modules(ckpts[0].path)
    for ckpt in ckpts[1:]:
        if weighted_modules(ckpt.path) != first:
            raise ValueError(f"checkpoints {ckpts[0].path} and {ckpt.path} have other modules with weights (Dense: "
                             f"{[sub for sub, _ in first]} in the first): a soup averages models with the same ones")


# config.json keys that say nothing about what the weights compute (or that the "attention" setting judges)
_CONFIG_METADATA = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
                    "is_causal", "use_bidirectional_attention")


def _embedding_settings(root: Path) -> Optional[dict]:
    """What decides a model directory's embeddings besides its weights, as kalm_fast runs it: pooling, attention
    ("causal" or "bidirectional"), Normalize, the prompts, truncation, similarity, lower-casing and each config.json
    setting (as transformers reads it: ``config.<key>``); its ``max_seq_length`` is left out (the first one's is
    kept). None for a model kalm_fast does not run (the soup still averages it)."""
    from ..models.bidirectional import runs_causally  # loads transformers: only for directories
    from ..models.loading import build_config, read_sentence_transformer_info

    try:
        info = read_sentence_transformer_info(root)
        config = build_config(info.transformer_dir)
    except (ValueError, OSError):
        return None
    causal = runs_causally(config, info.pooling)
    settings = dict(pooling=info.pooling, attention="causal" if causal else "bidirectional", normalize=info.normalize,
                    include_prompt=info.include_prompt, prompts={name: text for name, text in info.prompts.items()
                                                                 if text},  # an empty prompt is none
                    default_prompt_name=info.default_prompt_name, truncate_dim=info.truncate_dim,
                    similarity_fn_name=info.similarity_fn_name or "cosine", do_lower_case=info.do_lower_case)
    settings.update((f"config.{key}", value) for key, value in config.to_dict().items()
                    if key not in _CONFIG_METADATA)
    return settings


def _soup_module_weights(ckpts: list, weights: list, out: Path):
    """Average the weights of each module dir (a Dense module's ``model.safetensors``) as the model's are."""
    for sub in _module_dirs(ckpts[0].path):
        if (ckpts[0].path / sub / "model.safetensors").is_file():
            files = [_Checkpoint(c.path / sub / "model.safetensors") for c in ckpts]
            _check_compatible(files)
            _write_streaming(out / sub / "model.safetensors", sorted(files[0].tensors), files, weights, None,
                             files[0].metadata[files[0].shards[0]])


def model_soup(checkpoints: Sequence, *, weights: Optional[Sequence[float]] = None, output) -> Path:
    """Average ``checkpoints`` (files or model directories) with ``weights`` into ``output``; returns its path."""
    if isinstance(checkpoints, (str, os.PathLike)) or len(checkpoints) == 0:
        raise ValueError("checkpoints must be a non-empty list of .safetensors files or model directories")
    ckpts = [_Checkpoint(c) for c in checkpoints]
    weights = _normalized_weights(weights, len(ckpts))
    kinds = {c.is_dir for c in ckpts}
    if len(kinds) > 1:
        raise ValueError("checkpoints must be all .safetensors files or all model directories, not a mix")
    _check_compatible(ckpts)
    if ckpts[0].is_dir:
        _check_same_modules(ckpts)
    output = Path(output)
    if output.resolve() in {c.path.resolve() for c in ckpts}:
        raise ValueError(f"output {output} is one of the checkpoints; choose a new path")
    first = ckpts[0]
    if first.is_dir:
        if output.suffix == ".safetensors":
            raise ValueError(f"output must be a directory path when the checkpoints are model directories, got "
                             f"{output}")
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ValueError(f"output directory {output} already exists and is not empty")
    elif output.suffix != ".safetensors" or output.is_dir():
        raise ValueError(f"output must be a .safetensors file path when the checkpoints are files, got {output}")
    elif output.exists():
        raise ValueError(f"output file {output} already exists; choose a new path (a soup replaces nothing)")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output.parent, f".{glob.escape(output.name)}.*.tmp")
    if not first.is_dir:
        atomic_write(output, lambda tmp: _write_streaming(tmp, sorted(first.tensors), ckpts, weights, None,
                                                          first.metadata[first.shards[0]]))
        return output
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        for shard in first.shards:
            names = sorted(n for n, v in first.tensors.items() if v[0] == shard)
            _write_streaming(tmp / shard, names, ckpts, weights, shard, first.metadata[shard])
        if (first.path / INDEX_NAME).is_file():
            shutil.copy2(first.path / INDEX_NAME, tmp / INDEX_NAME)
        _copy_side_files(first.path, tmp)
        _soup_module_weights(ckpts, weights, tmp)
        if output.exists():
            output.rmdir()
        publish_dir(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output
