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
import time
from pathlib import Path
from typing import Optional

import torch

from ..files import sha256_file, write_resumable
from ..prompts import format_query
from .data import check_instruction_tasks, check_records_output, iter_train_records, load_record_model, unchanged_check


def score_file(teacher, input_path, output, *, instructions: Optional[dict] = None, chunk_records: int = 1024,
               show_progress: bool = True, **encoder_kwargs) -> dict:
    """Score every record of the training JSONL ``input_path`` with the embedder ``teacher`` (a model directory,
    None for the embedded MiniLM) and write ``output`` (JSONL). ``encoder_kwargs`` go to ``Encoder`` (``device``,
    ``dtype``, ``max_length``, ``allow_pickle``), except ``max_tokens_per_batch``, which goes to ``encode``.

    Returns ``{"records", "pairs", "resumed_at", "seconds"}`` (``pairs`` scored by this run; ``resumed_at``: records
    an earlier run had finished).
    """
    input_path, output = Path(input_path), Path(output)
    instructions = dict(instructions or {})
    if chunk_records < 1:
        raise ValueError(f"chunk_records must be >= 1, got {chunk_records}")
    check_records_output(output, input_path)
    input_sha256 = sha256_file(input_path)  # before the scan: a later change fails the final check
    count, tasks = 0, set()
    for _, _, record in iter_train_records(input_path):  # validates every line before the teacher loads
        count += 1
        tasks.add(record["task"])
    if count == 0:
        raise ValueError(f"{input_path}: no records")
    check_instruction_tasks(instructions, tasks)
    encoder, model_settings, encode = load_record_model(teacher, encoder_kwargs)
    settings = dict(model_settings, input_sha256=input_sha256, records=count, similarity=encoder.similarity_fn_name,
                    instructions=instructions)
    started, pairs = time.perf_counter(), 0

    def render(chunk: list) -> str:
        nonlocal pairs
        pairs += sum(len(r["pos"]) + len(r["neg"]) for _, _, r in chunk)
        return "".join(_score_chunk(encoder, chunk, instructions, encode))

    resumed_at = write_resumable(output, settings, iter_train_records(input_path), count, render, chunk=chunk_records,
                                 final_check=unchanged_check(input_path, input_sha256, "scored", "score"),
                                 desc="teacher scores", show_progress=show_progress)
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
