"""Teacher scores for distillation: a teacher embedder scores every (query, text) pair of training records and
writes them as FlagEmbedding's ``pos_scores`` / ``neg_scores`` (what ``kalm-fast score`` runs).

Queries are formatted as the trainer formats them (``Instruct: {instruction} \\n Query: {query}`` with the record's
instruction, else ``instructions[task]``, else the bare query), texts as they are, neither with a model prompt; the
score is the teacher's own similarity (``similarity_fn_name``, cosine unless its config says otherwise). Every line
of the input is validated first (errors name ``file:line``). The output holds the input's records in order, each with
every key it had, its ``task`` (the input file's stem if it had none) and the two score lists set (replaced if it
had them). It is written beside its final name as ``.NAME.partial``, a chunk of records at a time (each chunk
fsynced, then the progress in ``.NAME.partial.json``), and renamed to NAME when complete: a run interrupted at any
point continues after its last finished chunk when run again with the same input, teacher and settings, and starts
over otherwise.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..files import atomic_write_text, check_writable_dir, fsync_dir, read_lines, sha256_file
from ..models.loading import model_fingerprint
from ..prompts import format_query
from .data import parse_train_line

STATE_FORMAT = "kalm_fast.teacher_scores/1"


def _records(path: Path):
    """``(line number, raw JSON object, normalized record)`` of every non-blank line; the raw object keeps its keys
    and gets the record's ``task`` (the file's stem when it had none: the scored file has another stem)."""
    for line_no, line in read_lines(path):
        if line.strip():
            record = parse_train_line(path, line_no, line, path.stem)
            raw = json.loads(line)
            raw.setdefault("task", record["task"])
            try:
                json.dumps(raw, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{path}:{line_no}: holds a lone surrogate escape (\\ud800-\\udfff), which "
                                 "cannot be written as UTF-8") from None
            yield line_no, raw, record


def _partial_paths(output: Path) -> tuple[Path, Path]:
    return output.with_name(f".{output.name}.partial"), output.with_name(f".{output.name}.partial.json")


def _resume_point(partial: Path, state_path: Path, settings: dict) -> tuple[int, int]:
    """``(records done, bytes of them)`` of an earlier run with the same settings, else ``(0, 0)``."""
    try:
        state = json.loads(state_path.read_text())
        if (state.get("format") == STATE_FORMAT and state.get("settings") == settings
                and partial.stat().st_size >= state["bytes"]):
            return int(state["records"]), int(state["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 0, 0


def score_file(teacher, input_path, output, *, instructions: Optional[dict] = None, chunk_records: int = 1024,
               show_progress: bool = True, **encoder_kwargs) -> dict:
    """Score every record of the training JSONL ``input_path`` with the embedder ``teacher`` (a model directory,
    None for the embedded MiniLM) and write ``output`` (JSONL). ``encoder_kwargs`` go to ``Encoder`` (``device``,
    ``dtype``, ``max_length``, ``allow_pickle``), except ``max_tokens_per_batch``, which goes to ``encode``.

    Returns ``{"records", "pairs", "resumed_at", "seconds"}`` (``pairs`` scored by this run; ``resumed_at``: records
    an earlier run had finished).
    """
    from ..encode import Encoder

    input_path, output = Path(input_path), Path(output)
    instructions = dict(instructions or {})
    if chunk_records < 1:
        raise ValueError(f"chunk_records must be >= 1, got {chunk_records}")
    if output.suffix.lower() != ".jsonl":
        raise ValueError(f"output must be a .jsonl file, got {str(output)!r}")
    if output.is_dir():
        raise ValueError(f"output {str(output)!r} is a directory, expected a .jsonl file path")
    if output.exists() and output.resolve() == input_path.resolve():
        raise ValueError(f"output {str(output)!r} is the input: write the scored records to another file")
    if not output.parent.is_dir():
        raise ValueError(f"the directory of output {str(output)!r} does not exist")
    check_writable_dir(output.parent, "output")
    count = sum(1 for _ in _records(input_path))  # validates every line before the teacher loads
    if count == 0:
        raise ValueError(f"{input_path}: no records")
    max_tokens = encoder_kwargs.pop("max_tokens_per_batch", None)
    encoder = Encoder(teacher, **encoder_kwargs)
    settings = dict(input_sha256=sha256_file(input_path), records=count,
                    teacher_sha256=model_fingerprint(teacher, encoder_kwargs.get("allow_pickle", False)),
                    dtype=str(encoder.model.dtype), max_length=encoder.max_seq_length,
                    similarity=encoder.similarity_fn_name, instructions=instructions)
    partial, state_path = _partial_paths(output)
    done, size = _resume_point(partial, state_path, settings)
    if not done:  # a fresh start: no earlier progress record may ever describe the new partial file
        state_path.unlink(missing_ok=True)
        fsync_dir(output.parent)
    resumed_at, seen = done, done
    encode = dict(prompt="", convert_to_tensor=True, show_progress_bar=False, max_tokens_per_batch=max_tokens)
    started, pairs = time.perf_counter(), 0
    with open(partial, "r+b" if done else "wb") as out, \
            tqdm(total=count, initial=done, desc="teacher scores", disable=not show_progress) as progress:
        out.truncate(size)
        out.seek(size)

        def write(chunk):
            nonlocal done, pairs
            out.write("".join(_score_chunk(encoder, chunk, instructions, encode)).encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
            done, pairs = done + len(chunk), pairs + sum(len(r["pos"]) + len(r["neg"]) for _, _, r in chunk)
            atomic_write_text(state_path, json.dumps(dict(format=STATE_FORMAT, settings=settings, records=done,
                                                          bytes=out.tell())))
            progress.update(len(chunk))

        chunk = []
        for i, item in enumerate(_records(input_path)):
            if i >= done:
                chunk.append(item)
                seen = i + 1
            if len(chunk) == chunk_records:
                write(chunk)
                chunk = []
        if chunk:
            write(chunk)
    if seen != count or sha256_file(input_path) != settings["input_sha256"]:
        raise ValueError(f"{input_path} changed while it was scored; run again to score it as it is now")
    os.replace(partial, output)
    fsync_dir(output.parent)
    state_path.unlink()
    return dict(records=count, pairs=pairs, resumed_at=resumed_at, seconds=time.perf_counter() - started)


def _score_chunk(encoder, chunk: list, instructions: dict, encode: dict) -> list:
    """The output lines of ``chunk`` (``(line number, raw object, record)`` triples)."""
    queries = [format_query(r["query"], r["instruction"] or instructions.get(r["task"])) for _, _, r in chunk]
    texts = [t for _, _, r in chunk for t in r["pos"] + r["neg"]]
    sizes = torch.tensor([len(r["pos"]) + len(r["neg"]) for _, _, r in chunk])
    q = encoder.encode(queries, **encode)
    docs = encoder.encode(texts, **encode)
    scores = encoder.similarity_pairwise(q[torch.repeat_interleave(torch.arange(len(chunk)), sizes)], docs)
    scores = [round(s, 6) for s in scores.float().tolist()]
    lines, at = [], 0
    for _, raw, record in chunk:
        n_pos, n_neg = len(record["pos"]), len(record["neg"])
        raw["pos_scores"] = scores[at:at + n_pos]
        raw["neg_scores"] = scores[at + n_pos:at + n_pos + n_neg]
        at += n_pos + n_neg
        lines.append(json.dumps(raw, ensure_ascii=False) + "\n")
    return lines
