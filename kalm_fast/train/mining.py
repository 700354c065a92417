"""Hard-negative mining the KaLM-Embedding-V2 way (what ``kalm-fast mine`` runs).

Each record's query, formatted as the trainer formats it, is searched with a model (cosine similarity of its
normalized embeddings, through ``Encoder``) against a candidate pool: every distinct ``pos`` / ``neg`` text of the
input, plus the texts of ``corpus`` when given (.txt: one text per line; .jsonl: ``text`` and optional ``title``,
joined as everywhere in kalm_fast). The record's ``neg`` becomes ``num_negatives`` texts drawn (seeded by ``seed``
and the record's line) from the candidates at ranks ``rank_range = (lo, hi)`` (0-based, ``ranked[lo:hi]``;
KaLM-Embedding-V2 mines ranks 50 to 100 of a previous model) that are neither one of its positives nor its query,
fewer where fewer are there. With ``max_negative_ratio = r`` a candidate is also left out when its score exceeds
``r`` times the lowest score of the record's positives (NV-Retriever's positive-aware filter, "TopK-PercPos", uses
0.95; meant for positive scores: below 0 the limit lies above the positive's score): likely an unlabelled positive
or a near-duplicate of one. A record none of whose positives ranks among the first ``max_positive_rank`` is dropped
as likely mislabelled (KaLM: 50; None keeps all), as is one with no candidate left in the range. Every other key of
a record is kept, its ``task`` written in when it had none, and ``neg_scores`` removed (it scored the old negatives).
The output is written a chunk of records at a time and continues after an interruption
(``kalm_fast.files.write_resumable``); the pool's embeddings are kept beside it until the run completes, so a
resumed run does not encode the pool again.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..files import (
    atomic_write,
    check_unicode,
    parse_json_line,
    read_lines,
    sha256_file,
    write_resumable,
)
from ..prompts import format_query, join_title
from .data import (
    check_instruction_tasks,
    check_records_output,
    input_changed,
    iter_train_records,
    load_record_model,
    unchanged_check,
)
from .evaluate import search

SEARCH_SCORES = 1 << 27  # at most this many query-candidate scores at once (512 MiB of float32)
POOL_BLOCK = 1 << 16  # pool texts encoded (and cached) at a time
FORMAT = "kalm_fast.mine/1"


def read_corpus(path: Path) -> list:
    """The non-blank texts of a .txt (one per line) or .jsonl (``text``, optional ``title``) corpus."""
    texts = []
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        if path.suffix.lower() == ".txt":
            texts.append(line)
            continue
        obj = parse_json_line(path, line_no, line)
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not isinstance(obj.get("title", ""),
                                                                                              str):
            raise ValueError(f"{path}:{line_no}: expected an object with a 'text' string (and optionally 'title')")
        text = check_unicode(path, line_no, "text", join_title(obj.get("title"), obj["text"]))
        if text.strip():
            texts.append(text)
    return texts


def _texts_sha256(texts: list) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _pool_embeddings(encoder, texts: list, cache: Path, settings: dict, encode: dict,
                     show_progress: bool) -> torch.Tensor:
    """``[N, D]`` float32 normalized embeddings of the pool on the model's device, ``POOL_BLOCK`` texts at a time;
    each block is kept in the directory ``cache`` (with ``settings``), where a resumed run finds it."""
    key = json.dumps(settings, sort_keys=True)
    cache.mkdir(exist_ok=True)
    out = None
    for start in tqdm(range(0, len(texts), POOL_BLOCK), desc="mining: candidates", disable=not show_progress,
                      unit="block"):
        block = texts[start:start + POOL_BLOCK]
        path = cache / f"block-{start // POOL_BLOCK:05d}.safetensors"
        emb = None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if f.metadata().get("settings") == key and f.get_slice("embeddings").get_shape()[0] == len(block):
                    emb = f.get_tensor("embeddings")
        except Exception:  # no block yet, or a damaged one: encode it again
            pass
        if emb is None:
            emb = encoder.encode(block, normalize_embeddings=True, **encode).float().cpu().contiguous()
            atomic_write(path, lambda tmp: save_file({"embeddings": emb}, str(tmp), metadata={"settings": key}))
        if out is None:
            out = torch.empty(len(texts), emb.shape[1], dtype=torch.float32, device=encoder.device)
        out[start:start + len(block)] = emb.to(encoder.device)
    return out


def _lowest_positive_scores(q: torch.Tensor, pool_emb: torch.Tensor, owns: list) -> torch.Tensor:
    """``[n]``: for each query ``q[j]`` the lowest score among its record's positives, the pool ids ``owns[j]``."""
    owner = torch.tensor([j for j, own in enumerate(owns) for _ in own], device=q.device)
    ids = torch.tensor([i for own in owns for i in own], device=q.device)
    scores = (pool_emb[ids] * q[owner]).sum(dim=-1)
    return torch.full((len(owns),), float("inf"), device=q.device).scatter_reduce(0, owner, scores, "amin")


def mine_file(model, input_path, output, *, corpus=None, num_negatives: int = 7, rank_range: tuple = (50, 100),
              max_positive_rank: Optional[int] = 50, max_negative_ratio: Optional[float] = None, seed: int = 0,
              instructions: Optional[dict] = None,
              chunk_records: int = 4096, show_progress: bool = True, **encoder_kwargs) -> dict:
    """Mine hard negatives for the training JSONL ``input_path`` with ``model`` (a model directory, None for the
    embedded MiniLM) and write ``output`` (JSONL). ``encoder_kwargs`` go to ``Encoder`` (``device``, ``dtype``,
    ``max_length``, ``allow_pickle``), except ``max_tokens_per_batch``, which goes to ``encode``.

    Returns ``{"records", "written", "dropped_positive_rank", "dropped_no_candidates", "fewer_negatives",
    "ratio_filtered", "pool", "resumed_at", "seconds"}``: the counts are of the records this run mined (after
    ``resumed_at``); ``ratio_filtered`` counts the candidates ``max_negative_ratio`` left out.
    """
    input_path, output = Path(input_path), Path(output)
    corpus = Path(corpus) if corpus is not None else None
    instructions = dict(instructions or {})
    lo, hi = rank_range
    for name, value, low in (("num_negatives", num_negatives, 1), ("chunk_records", chunk_records, 1),
                             ("rank_range[0]", lo, 0), ("rank_range[1]", hi, lo + 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_positive_rank is not None and (isinstance(max_positive_rank, bool) or not isinstance(max_positive_rank, int)
                                          or max_positive_rank < 1):
        raise ValueError(f"max_positive_rank must be an integer >= 1 or None, got {max_positive_rank!r}")
    if max_negative_ratio is not None and (isinstance(max_negative_ratio, bool)
                                           or not isinstance(max_negative_ratio, (int, float))
                                           or not 0 < max_negative_ratio <= 1):
        raise ValueError(f"max_negative_ratio must be a number in (0, 1] or None, got {max_negative_ratio!r}")
    check_records_output(output, input_path)
    if corpus is not None and corpus.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"corpus must be a .txt or .jsonl file, got {str(corpus)!r}")
    input_sha256 = sha256_file(input_path)  # before the scan: a later change fails the final check
    pool, positives_of = {}, {}  # text -> id (records' texts first, then the corpus's); query -> its positives' ids
    count, tasks = 0, set()
    for _, _, record in iter_train_records(input_path):  # validates every line before the model loads
        count += 1
        tasks.add(record["task"])
        for text in record["pos"] + record["neg"]:
            pool.setdefault(text, len(pool))
        positives_of.setdefault(record["query"], set()).update(pool[t] for t in record["pos"])
    if count == 0:
        raise ValueError(f"{input_path}: no records")
    check_instruction_tasks(instructions, tasks)
    for text in read_corpus(corpus) if corpus is not None else []:
        pool.setdefault(text, len(pool))
    texts = list(pool)
    if lo >= len(texts):
        raise ValueError(f"rank_range {lo}-{hi} starts past the {len(texts)} candidates (the records' texts"
                         f"{' and the corpus' if corpus is not None else ''}): lower it or give a larger corpus")
    encoder, model_settings, encode = load_record_model(model, encoder_kwargs)
    pool_settings = dict(model_settings, format=FORMAT, pool_sha256=_texts_sha256(texts))
    settings = dict(pool_settings, input_sha256=input_sha256, records=count, num_negatives=num_negatives,
                    rank_range=[lo, hi], max_positive_rank=max_positive_rank, seed=seed, instructions=instructions)
    if max_negative_ratio is not None:  # only when set: a run started before the option existed still resumes
        settings["max_negative_ratio"] = max_negative_ratio
    started = time.perf_counter()
    cache = output.with_name(f".{output.name}.pool")
    pool_emb = _pool_embeddings(encoder, texts, cache, pool_settings, encode, show_progress)
    k = min(max(hi, max_positive_rank or 0), len(texts))
    counts = dict(written=0, dropped_positive_rank=0, dropped_no_candidates=0, fewer_negatives=0, ratio_filtered=0)

    def render(chunk: list) -> str:
        queries = [format_query(r["query"], r["instruction"] or instructions.get(r["task"])) for _, _, r in chunk]
        owns = [{pool.get(t) for t in r["pos"]} for _, _, r in chunk]
        if any(None in own or r["query"] not in positives_of for own, (_, _, r) in zip(owns, chunk)):
            raise input_changed(input_path, "mined", "mine")
        q = encoder.encode(queries, normalize_embeddings=True, **encode).float()
        top, top_scores = search(q, pool_emb, k, chunk=max(1, SEARCH_SCORES // len(texts)), with_scores=True)
        ranked = top.tolist()
        if max_negative_ratio is not None:
            limits = (max_negative_ratio * _lowest_positive_scores(q, pool_emb, owns)).tolist()
            range_scores = top_scores[:, lo:hi].tolist()
        lines = []
        for j, ((line_no, raw, record), row, own) in enumerate(zip(chunk, ranked, owns)):
            if max_positive_rank is not None and not own.intersection(row[:max_positive_rank]):
                counts["dropped_positive_rank"] += 1
                continue
            # neither a positive of any record of this query nor the query's own text
            excluded = positives_of[record["query"]]
            candidates = [i for i in row[lo:hi] if i not in excluded and texts[i] != record["query"]]
            if max_negative_ratio is not None:
                too_close = {i for i, s in zip(row[lo:hi], range_scores[j]) if s > limits[j]}
                counts["ratio_filtered"] += sum(i in too_close for i in candidates)
                candidates = [i for i in candidates if i not in too_close]
            if not candidates:
                counts["dropped_no_candidates"] += 1
                continue
            chosen = random.Random(f"{seed}:{line_no}").sample(candidates, min(num_negatives, len(candidates)))
            counts["fewer_negatives"] += len(chosen) < num_negatives
            raw["neg"] = [texts[i] for i in chosen]
            raw.pop("neg_scores", None)
            lines.append(json.dumps(raw, ensure_ascii=False) + "\n")
        counts["written"] += len(lines)
        return "".join(lines)

    resumed_at = write_resumable(output, settings, iter_train_records(input_path), count, render, chunk=chunk_records,
                                 final_check=unchanged_check(input_path, input_sha256, "mined", "mine"),
                                 desc="mining: queries", show_progress=show_progress)
    shutil.rmtree(cache, ignore_errors=True)
    return dict(records=count, **counts, pool=len(texts), resumed_at=resumed_at,
                seconds=time.perf_counter() - started)
