"""``kalm-fast encode``: texts from a .txt / .jsonl file into embeddings.

Two output forms, chosen by ``--output``:
- a single file ``x.npy`` or ``x.safetensors``, written atomically (temp file, fsync, rename);
- a directory (an existing directory, a path without a suffix, or one ending in ``/``): numbered safetensors
  shards of ``--shard-size`` rows plus ``manifest.json`` (``kalm_fast.shards``; read back with
  ``kalm_fast.load_embeddings``). The input is streamed (memory independent of corpus size); a rerun verifies the
  finished shards and skips them, encodes again those that are damaged, and refuses shards of another encode; under
  ``torchrun`` rank r encodes the shards i with ``i % world_size == r`` into the same directory.

Any other suffix is refused. Input: ``.txt`` is one text per line (only ``\\n`` ends a line); ``.jsonl`` holds one
JSON object per non-blank line with a string field (``--text-field``, default ``text``). Row i of the output is
text i of the input. Everything that can be checked (arguments, the whole input, the model, the output's
directory and free space) is checked before the first text is encoded.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..distributed import from_main, local_device, process_group, torchrun_env
from ..files import (
    atomic_write,
    check_free_space,
    check_unicode,
    check_writable_dir,
    parse_json_line,
    read_lines,
    remove_leftovers,
    sha256_file,
)
from ..models.loading import model_fingerprint
from ..prompts import kalm_query_prompt
from ..shards import (
    MANIFEST,
    TEMP_NAME,
    check_directory,
    check_shard,
    read_manifest,
    shard_path,
    stored_header,
    write_manifest,
    write_shard,
)
from .args import device, input_file, positive_int

SINGLE_SUFFIXES = (".npy", ".safetensors")
INPUT_SUFFIXES = (".txt", ".jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl (one object per line)")
    parser.add_argument("--output", required=True,
                        help="x.npy / x.safetensors for one file, or a directory for sharded resumable output")
    parser.add_argument("--model", default=None, help="local model directory (default: the embedded MiniLM)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl input (default: text)")
    parser.add_argument("--device", type=device, default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "auto"],
                        help="weights dtype (default: the checkpoint's own on a GPU, float32 on CPU; auto: the "
                             "checkpoint's own)")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="max tokens per text (capped by the model)")
    parser.add_argument("--max-tokens-per-batch", type=positive_int, default=None,
                        help="packed tokens per forward pass")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="prefix added to every text")
    prompt.add_argument("--prompt-name", default=None, help="name of one of the model's prompts")
    prompt.add_argument("--task", default=None,
                        help="encode queries of this task in the KaLM format 'Instruct: {task} \\n Query: {text}'")
    parser.add_argument("--truncate-dim", type=positive_int, default=None, help="keep the first D dims (Matryoshka)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="do not L2-normalize the embeddings (a model that ends in a Normalize module still "
                        "does, as in sentence-transformers)")
    parser.add_argument("--shard-size", type=positive_int, default=100_000, help="rows per shard in directory output")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .bin weights")


def read_texts(path: Path, text_field: str = "text", suffix: str | None = None) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` for each text of a .txt / .jsonl file, streamed; bad input raises ValueError at
    ``file:line``. ``suffix`` overrides the file's own (for a spooled pipe)."""
    suffix = (suffix or path.suffix).lower()
    if suffix not in INPUT_SUFFIXES:
        raise ValueError(f"--input must be a .txt or .jsonl file, got {str(path)!r}")
    for number, line in read_lines(path):
        if suffix == ".txt":
            yield number, line
            continue
        if not line.strip():
            continue
        record = parse_json_line(path, number, line)
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{path}:{number}: expected a JSON object with a {text_field!r} field")
        if not isinstance(record[text_field], str):
            raise ValueError(f"{path}:{number}: field {text_field!r} must be a string, "
                             f"got {type(record[text_field]).__name__}")
        yield number, check_unicode(path, number, text_field, record[text_field])


def output_is_single(output: str) -> bool:
    """True for ``x.npy`` / ``x.safetensors``, False for a directory; ValueError for anything else."""
    path = Path(output)
    suffix = path.suffix.lower()
    if output.endswith(("/", os.sep)):  # a directory, whatever its name (x.npy/ is not the file x.npy)
        if path.is_file():
            raise ValueError(f"--output {output!r} ends in / (sharded output) but {str(path)!r} is an existing file")
        return False
    if suffix in SINGLE_SUFFIXES:
        if path.is_dir():
            raise ValueError(f"--output {output!r} is an existing directory; single-file output needs a file path")
        return True
    if path.is_dir() or not suffix:
        return False
    raise ValueError(f"--output {output!r}: unknown suffix {suffix!r}; use .npy or .safetensors for one file, or a "
                     "directory (no suffix, or a trailing /) for sharded output")


@contextlib.contextmanager
def readable_input(path: Path) -> Iterator[Path]:
    """``path`` itself if it is a regular file; a named pipe or other stream is read once into a temporary file
    (sharded output reads its input more than once)."""
    if stat.S_ISREG(os.stat(path).st_mode):
        yield path
        return
    fd, spool = tempfile.mkstemp(prefix="kalm-fast-input-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        yield Path(spool)
    finally:
        os.unlink(spool)


def _prompt_kwargs(args) -> dict:
    prompt = kalm_query_prompt(args.task) if args.task is not None else args.prompt
    return dict(prompt=prompt, prompt_name=args.prompt_name)


def _encode_kwargs(args) -> dict:
    return dict(max_tokens_per_batch=args.max_tokens_per_batch, normalize_embeddings=not args.no_normalize,
                truncate_dim=args.truncate_dim, show_progress_bar=False, **_prompt_kwargs(args))


def _load_encoder(args, device=None):
    from ..encode import Encoder

    try:
        return Encoder(args.model, device=device or args.device, dtype=args.dtype, max_length=args.max_length,
                       allow_pickle=args.allow_pickle)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot load --model: {exc}") from None


def _loaded(args, device=None):
    """The encoder, after checking the arguments that depend on the model."""
    encoder = _load_encoder(args, device)
    dim = encoder.model.embedding_size  # as Encoder.encode(truncate_dim=...): the model's width, not its saved cut
    if args.truncate_dim is not None and args.truncate_dim > dim:
        raise ValueError(f"--truncate-dim {args.truncate_dim} exceeds the model's {dim} dimensions")
    if args.prompt_name is not None and args.prompt_name not in encoder.prompts:
        raise ValueError(f"--prompt-name {args.prompt_name!r} is not one of the model's prompts "
                         f"{sorted(encoder.prompts) or '(it has none)'}")
    return encoder


def _dim(args, encoder) -> int:
    return args.truncate_dim or encoder.get_sentence_embedding_dimension()


def encode_single(args, input_path: Path, output: Path) -> tuple[int, int, float]:
    """Whole input -> one .npy / .safetensors file. Returns ``(rows, rows, seconds spent encoding)``."""
    if torchrun_env().world_size > 1:
        raise ValueError("under torchrun, --output must be a directory (sharded output); a single file cannot be "
                         "written by several processes")
    texts = [t for _, t in read_texts(input_path, args.text_field)]
    if not texts:
        raise ValueError(f"--input {str(input_path)!r} holds no texts")
    if not output.parent.is_dir():
        raise ValueError(f"the directory of --output {str(output)!r} does not exist")
    check_writable_dir(output.parent, "--output")
    encoder = _loaded(args)
    check_free_space(output.parent, len(texts) * _dim(args, encoder) * 4 + (1 << 16), "--output")
    started = time.perf_counter()
    emb = encoder.encode(texts, **_encode_kwargs(args))
    seconds = time.perf_counter() - started
    remove_leftovers(output.parent, f".{glob.escape(output.name)}.*.tmp")  # of a killed run into the same file
    if output.suffix.lower() == ".npy":
        def write_npy(tmp):
            with open(tmp, "wb") as f:
                np.save(f, emb)

        atomic_write(output, write_npy)
    else:
        from safetensors.numpy import save_file

        meta = dict(model=str(args.model or "default"), count=str(len(texts)), dim=str(emb.shape[1]))
        atomic_write(output, lambda tmp: save_file({"embeddings": emb}, str(tmp), metadata=meta))
    return len(texts), len(texts), seconds


def scan_input(path: Path, text_field: str, suffix: str) -> tuple[int, str]:
    """Validate the whole input once (streamed) and return ``(count, sha256 of the file)``."""
    count = sum(1 for _ in read_texts(path, text_field, suffix))
    if count == 0:
        raise ValueError(f"--input {str(path)!r} holds no texts")
    return count, sha256_file(path)


def _shard_header(args, count: int, input_sha: str, encoder) -> dict:
    """What a shard must agree on to be reused by a resumed run: among it, the prompt the texts got (``--prompt ""``
    and the model's default prompt differ, though neither names one)."""
    return dict(input_sha256=input_sha, count=count, shard_size=args.shard_size, dim=_dim(args, encoder),
                model_sha256=model_fingerprint(args.model, args.allow_pickle), normalize=not args.no_normalize,
                prompt=encoder.resolve_prompt(**_prompt_kwargs(args)), prompt_name=args.prompt_name or "",
                text_field=args.text_field,
                max_length=encoder.max_length, dtype=str(encoder.model.dtype).replace("torch.", ""))


def _shards(source: Path, text_field: str, suffix: str, size: int) -> Iterator[tuple[int, list]]:
    """``(shard index, its texts)`` in input order, streamed."""
    texts, index = [], 0
    for _, text in read_texts(source, text_field, suffix):
        texts.append(text)
        if len(texts) == size:
            yield index, texts
            texts, index = [], index + 1
    if texts:
        yield index, texts


def _warn(message: str) -> None:
    print(f"kalm-fast encode: warning: {message}", file=sys.stderr)


def encode_sharded(args, input_path: Path, directory: Path) -> tuple[int, int, float]:
    """Input -> numbered shards + manifest in ``directory``, resuming.

    Returns ``(rows encoded by this process now, rows in total, seconds spent encoding)``.
    """
    check_directory(directory)
    check_writable_dir(directory, "--output")
    env = torchrun_env()
    rank, world = env.rank, env.world_size
    if world > 1 and not input_path.is_file():
        raise ValueError(f"under torchrun, --input {str(input_path)!r} must be a regular file (every rank reads it)")
    with readable_input(input_path) as source:
        count, input_sha = scan_input(source, args.text_field, input_path.suffix)
        # under torchrun each rank on its own GPU, cuda:LOCAL_RANK (also for --device cuda), as in training
        device = str(local_device(env, args.device)) if world > 1 else args.device
        encoder = _loaded(args, device)
        header = _shard_header(args, count, input_sha, encoder)
        manifest = read_manifest(directory)
        if manifest is not None and manifest.get("header") != header:
            old = manifest.get("header") or {}
            diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
            raise ValueError(f"--output {str(directory)!r} holds the output of a different encode (differs in "
                             f"{', '.join(diff)}); use a new directory")
        recorded = {e["file"]: e for e in (manifest or {}).get("shards", [])}
        n_shards = (count + args.shard_size - 1) // args.shard_size
        mine = [i for i in range(n_shards) if i % world == rank]
        todo = []
        for index in mine:  # every finished shard is verified before any new work
            path = shard_path(directory, index)
            problem = check_shard(path, index, header, recorded.get(path.name)) if path.exists() else "missing"
            if problem not in (None, "missing"):
                _warn(f"{problem}; encoding it again")
            if problem is not None:
                todo.append(index)
        rows_todo = sum(min(args.shard_size, count - i * args.shard_size) for i in todo)
        check_free_space(directory, rows_todo * header["dim"] * 4 + (1 << 16), "--output")
        directory.mkdir(parents=True, exist_ok=True)
        for item in directory.iterdir():  # temp files of this rank's shards (or of the manifest) a killed run left
            match = TEMP_NAME.match(item.name)
            if match and (int(match.group(2)) % world == rank if match.group(2) else rank == 0):
                item.unlink()
        done_now, seconds, pending = 0, 0.0, set(todo)
        for index, texts in _shards(source, args.text_field, input_path.suffix, args.shard_size):
            if index in pending:
                started = time.perf_counter()
                emb = encoder.encode(texts, **_encode_kwargs(args))
                seconds += time.perf_counter() - started
                write_shard(shard_path(directory, index), emb, index * args.shard_size, header)
                done_now += len(texts)
        if world > 1:
            _barrier(world, rank)
        # rank 0 judges what every rank wrote, and every rank raises its verdict: none is left waiting for another
        problem = _unfinished(directory, source, input_path, input_sha, header, n_shards) if rank == 0 else None
        problem = from_main(env, problem)
        if problem:
            raise ValueError(problem)
    if rank == 0:
        extra = dict(model=str(Path(args.model).resolve()) if args.model else "default",
                     input=str(input_path.resolve()))
        write_manifest(directory, header, count, extra)
        remove_leftovers(directory, ".*.tmp")  # every rank is done by now
    return done_now, count, seconds


def _unfinished(directory: Path, source: Path, input_path: Path, input_sha: str, header: dict,
                n_shards: int) -> Optional[str]:
    """Why the output of a finished encode is not whole, or None: the input changed while it was encoded (every shard
    is removed), or some shards were encoded with other settings than rank 0's (a rank read the input, or loaded the
    model, after it changed; those shards are removed). Either way a rerun encodes what was removed."""
    changed = sha256_file(source) != input_sha
    stale = list(range(n_shards)) if changed else [
        i for i in range(n_shards) if stored_header(shard_path(directory, i)) != header]
    for index in stale:
        shard_path(directory, index).unlink(missing_ok=True)
    if stale:  # a manifest of an earlier run would now vouch for shards that are gone
        (directory / MANIFEST).unlink(missing_ok=True)
    if changed:
        return (f"--input {str(input_path)!r} changed while it was encoded (its shards were removed); run again to "
                "encode it as it is now")
    if stale:
        return (f"{len(stale)} of {n_shards} shards were encoded from another input or model than the others (one "
                "changed while the ranks encoded); they were removed: run again to encode them")
    return None


def _barrier(world: int, rank: int) -> None:
    """Wait for every rank's shards (ranks may finish hours apart on a big corpus)."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=48))
    dist.barrier()


def run(args) -> int:
    if args.task is not None and not args.task.strip():
        raise ValueError(f"--task must be a non-empty instruction, got {args.task!r}")
    single = output_is_single(args.output)
    input_path, output = input_file(args.input, "--input"), Path(args.output)
    if input_path.suffix.lower() not in INPUT_SUFFIXES:
        raise ValueError(f"--input must be a .txt or .jsonl file, got {args.input!r}")
    if args.text_field != "text" and input_path.suffix.lower() == ".txt":
        raise ValueError(f"--text-field {args.text_field!r} is for .jsonl input; {args.input!r} is .txt (one text "
                         "per line, no fields)")
    with process_group():
        if single:
            rows, total, seconds = encode_single(args, input_path, output)
        else:
            rows, total, seconds = encode_sharded(args, input_path, output)
    print(f"encoded {rows} of {total} texts in {seconds:.2f} s ({rows / max(seconds, 1e-9):.1f} texts/s) -> {output}")
    return 0
