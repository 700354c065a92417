"""``kalm-fast encode``: texts from a .txt / .jsonl file into embeddings.

Two output forms:
- a single file (``--output x.npy`` or ``x.safetensors``), written atomically (temp file + rename);
- a directory (any other ``--output``): numbered safetensors shards of ``--shard-size`` rows plus
  ``manifest.json`` (model, dims, count, per-shard sha256). Input is streamed (memory independent of corpus
  size), a rerun resumes by skipping finished shards (each is written atomically, so a shard on disk is
  complete), and under ``torchrun`` rank r encodes the shards i with ``i % world_size == r`` into the same directory.

Input: ``.txt`` is one text per line; ``.jsonl`` holds one JSON object per non-blank line with a string field
(``--text-field``, default ``text``). Row i of the output is text i of the input.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..distributed import process_group, torchrun_env

PROG = "kalm-fast encode"
MANIFEST = "manifest.json"
SINGLE_SUFFIXES = (".npy", ".safetensors")


class UsageError(Exception):
    """An error that is the user's fault: printed as one line, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl (one object per line)")
    parser.add_argument("--output", required=True,
                        help="x.npy / x.safetensors for one file, or a directory for sharded resumable output")
    parser.add_argument("--model", default=None, help="local model directory (default: the embedded MiniLM)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl input (default: text)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-length", type=int, default=512, help="max tokens per text (capped by the model)")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None, help="packed tokens per forward pass")
    parser.add_argument("--prompt", default=None, help="prefix added to every text (e.g. a KaLM query instruction)")
    parser.add_argument("--prompt-name", default=None, help="name of one of the model's prompts")
    parser.add_argument("--truncate-dim", type=int, default=None, help="keep the first D dims (Matryoshka)")
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalize the embeddings")
    parser.add_argument("--shard-size", type=int, default=100_000, help="rows per shard in directory output")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .bin weights")


def read_texts(path: Path, text_field: str = "text") -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` for each text of a .txt / .jsonl file, streamed; bad input raises UsageError."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise UsageError(f"--input must be a .txt or .jsonl file, got {str(path)!r}")
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --input {str(path)!r}: {exc.strerror or exc}") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if suffix == ".txt":
                    yield number, line
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise UsageError(f"{path}:{number}: expected a JSON object with a {text_field!r} field")
                if not isinstance(record[text_field], str):
                    raise UsageError(f"{path}:{number}: field {text_field!r} must be a string, "
                                     f"got {type(record[text_field]).__name__}")
                yield number, record[text_field]
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def scan_input(path: Path, text_field: str) -> tuple[int, str]:
    """Validate the whole input once (streamed) and return ``(count, sha256 of the file)``."""
    count = sum(1 for _ in read_texts(path, text_field))
    if count == 0:
        raise UsageError(f"--input {str(path)!r} holds no texts")
    return count, _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``; the temp file is removed on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash never leaves a renamed empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _encode_kwargs(args) -> dict:
    return dict(max_tokens_per_batch=args.max_tokens_per_batch, prompt=args.prompt, prompt_name=args.prompt_name,
                normalize_embeddings=not args.no_normalize, truncate_dim=args.truncate_dim,
                show_progress_bar=False)


def _load_encoder(args, device=None):
    from ..encode import Encoder

    try:
        return Encoder(args.model, device=device or args.device, dtype=args.dtype, max_length=args.max_length,
                       allow_pickle=args.allow_pickle)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot load --model: {exc}") from None


def encode_single(args, input_path: Path, output: Path) -> tuple[int, int, float]:
    """Whole input -> one .npy / .safetensors file. Returns ``(rows, rows, seconds spent encoding)``."""
    if torchrun_env().world_size > 1:
        raise UsageError("under torchrun, --output must be a directory (sharded output); a single file cannot be "
                         "written by several processes")
    texts = [t for _, t in read_texts(input_path, args.text_field)]
    if not texts:
        raise UsageError(f"--input {str(input_path)!r} holds no texts")
    if not output.parent.is_dir():
        raise UsageError(f"the directory of --output {str(output)!r} does not exist")
    encoder = _load_encoder(args)
    started = time.perf_counter()
    emb = encoder.encode(texts, **_encode_kwargs(args))
    seconds = time.perf_counter() - started
    if output.suffix.lower() == ".npy":
        def write_npy(tmp):
            with open(tmp, "wb") as f:
                np.save(f, emb)

        _atomic_write(output, write_npy)
    else:
        from safetensors.numpy import save_file

        meta = dict(model=str(args.model or "default"), count=str(len(texts)), dim=str(emb.shape[1]))
        _atomic_write(output, lambda tmp: save_file({"embeddings": emb}, str(tmp), metadata=meta))
    return len(texts), len(texts), seconds


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.safetensors"


def _shard_header(args, count: int, input_sha: str, encoder) -> dict:
    """What a shard must agree on to be reused by a resumed run."""
    dim = args.truncate_dim or encoder.get_sentence_embedding_dimension()
    return dict(input_sha256=input_sha, count=count, shard_size=args.shard_size, dim=dim,
                model=str(Path(args.model).resolve()) if args.model else "default",
                normalize=not args.no_normalize, prompt=args.prompt or "", prompt_name=args.prompt_name or "",
                text_field=getattr(args, "text_field", None) or "",
                max_length=encoder.max_length, dtype=str(encoder.model.dtype).replace("torch.", ""))


def _check_existing(path: Path, header: dict) -> bool:
    """True if ``path`` is a finished shard of this same encode; raises if it belongs to another."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise UsageError(f"{path} is not a readable shard ({exc}); delete it to re-encode") from None
    stored = json.loads(meta.get("header", "{}"))
    if stored != header:
        diff = sorted(k for k in set(stored) | set(header) if stored.get(k) != header.get(k))
        raise UsageError(f"--output {str(path.parent)!r} holds shards of a different encode (differs in "
                         f"{', '.join(diff)}); use a new directory")
    return True


def encode_sharded(args, input_path: Path, directory: Path) -> tuple[int, int, float]:
    """Input -> numbered shards + manifest in ``directory``, resuming.

    Returns ``(rows encoded by this process now, rows in total, seconds spent encoding)``.
    """
    from safetensors.numpy import save_file

    if args.shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {args.shard_size}")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--output {str(directory)!r} exists and is not a directory "
                         f"(single-file output needs a {' or '.join(SINGLE_SUFFIXES)} suffix)")
    count, input_sha = scan_input(input_path, args.text_field)
    env = torchrun_env()
    rank, world, local_rank = env.rank, env.world_size, env.local_rank
    device = args.device
    if device is None and world > 1:
        import torch

        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    encoder = _load_encoder(args, device)
    header = _shard_header(args, count, input_sha, encoder)
    directory.mkdir(parents=True, exist_ok=True)
    n_shards = (count + args.shard_size - 1) // args.shard_size
    done_now, seconds = 0, 0.0

    def shards() -> Iterator[tuple[int, list]]:
        texts, index = [], 0
        for _, text in read_texts(input_path, args.text_field):
            texts.append(text)
            if len(texts) == args.shard_size:
                yield index, texts
                texts, index = [], index + 1
        if texts:
            yield index, texts

    for index, texts in shards():
        path = shard_path(directory, index)
        if index % world != rank or (path.exists() and _check_existing(path, header)):
            continue
        started = time.perf_counter()
        emb = encoder.encode(texts, **_encode_kwargs(args))
        seconds += time.perf_counter() - started
        start = index * args.shard_size
        tensors = {"embeddings": np.ascontiguousarray(emb),
                   "row_ids": np.arange(start, start + len(texts), dtype=np.int64)}
        meta = {"header": json.dumps(header, sort_keys=True), "start": str(start), "rows": str(len(texts))}
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        done_now += len(texts)
    if world > 1:
        _barrier(world, rank)
    if rank == 0:
        write_manifest(directory, header, n_shards, count)
    return done_now, count, seconds


def _barrier(world: int, rank: int) -> None:
    """Wait for every rank's shards (ranks may finish hours apart on a big corpus)."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=48))
    dist.barrier()


def write_manifest(directory: Path, header: dict, n_shards: int, count: int) -> None:
    """``manifest.json``: the encode's settings, row count, dims and every shard's rows and sha256."""
    entries = []
    for index in range(n_shards):
        path = shard_path(directory, index)
        if not path.exists():
            raise UsageError(f"shard {path.name} is missing; rerun the same command to finish the encode")
        start = index * header["shard_size"]
        entries.append(dict(file=path.name, start=start, rows=min(header["shard_size"], count - start),
                            sha256=_sha256(path)))
    manifest = dict(format="kalm_fast.shards/1", **header, shards=entries)
    _atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    for stale in directory.glob(".shard-*.tmp"):  # left by a killed run; every rank is done by now
        stale.unlink()


def run(args) -> int:
    input_path, output = Path(args.input), Path(args.output)
    try:
        with process_group():
            if output.suffix.lower() in SINGLE_SUFFIXES:
                rows, total, seconds = encode_single(args, input_path, output)
            else:
                rows, total, seconds = encode_sharded(args, input_path, output)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"encoded {rows} of {total} texts in {seconds:.2f} s ({rows / max(seconds, 1e-9):.1f} texts/s) -> {output}")
    return 0
