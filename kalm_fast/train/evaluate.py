"""Retrieval evaluation: nDCG@k, Recall@k and MRR@k of a model on an eval set.

nDCG uses linear gains (as trec_eval / BEIR): ``DCG@k = sum_{r<k} grade(doc_r) / log2(r + 2)``, divided by
the DCG of the ideal ordering of the query's relevant grades. Recall@k counts relevant docs (grade > 0) in
the top k over all relevant docs. MRR@k is ``1 / rank`` of the first relevant doc within the top k (else 0).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .data import EvalSet

DEFAULT_KS = (1, 5, 10, 100)


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be one or more positive int cut-offs, got {ks!r}")


def query_metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[dict], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Per-query metrics ``{name: [value of query 0, query 1, ...]}``. ``ranked[i]``: doc ids best first;
    ``relevant[i]``: ``{doc_id: grade > 0}``."""
    if len(ranked) != len(relevant):
        raise ValueError(f"ranked has {len(ranked)} queries but relevant has {len(relevant)}")
    if not ranked:
        raise ValueError("ranked and relevant need at least one query")
    _check_ks(ks)
    out = {}
    for i, (ids, rel) in enumerate(zip(ranked, relevant)):
        num_relevant = sum(1 for grade in rel.values() if grade > 0)
        if not num_relevant:
            raise ValueError(f"relevant[{i}] has no document with a grade > 0; every query needs one")
        ideal = sorted(rel.values(), reverse=True)
        first_hit = next((r for r, d in enumerate(ids) if rel.get(d, 0) > 0), None)
        for k in ks:
            dcg = sum(rel.get(d, 0.0) / math.log2(r + 2) for r, d in enumerate(ids[:k]))
            idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal[:k]))
            hits = sum(1 for d in ids[:k] if rel.get(d, 0) > 0)
            values = {f"ndcg@{k}": dcg / idcg, f"recall@{k}": hits / num_relevant,
                      f"mrr@{k}": 1.0 / (first_hit + 1) if first_hit is not None and first_hit < k else 0.0}
            for name, v in values.items():
                out.setdefault(name, []).append(v)
    return out


def rank_metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[dict], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Mean metrics over queries (the mean of ``query_metrics``)."""
    return {name: sum(values) / len(values) for name, values in query_metrics(ranked, relevant, ks).items()}


def search(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, *, chunk: int = 1024, with_scores: bool = False):
    """Indices ``[Q, min(k, N)]`` of the highest dot products, best first, in chunks of queries; with
    ``with_scores``, ``(indices, scores)`` (float32, the same shape)."""
    k = min(k, doc_emb.shape[0])
    indices, values = [], []
    for start in range(0, query_emb.shape[0], chunk):
        top = (query_emb[start:start + chunk].float() @ doc_emb.float().T).topk(k, dim=1)
        indices.append(top.indices)
        values.append(top.values)
    return (torch.cat(indices), torch.cat(values)) if with_scores else torch.cat(indices)


def evaluate_embeddings(query_emb: torch.Tensor, doc_emb: torch.Tensor, eval_set: EvalSet,
                        ks: Sequence[int] = DEFAULT_KS, *, per_query: bool = False) -> dict:
    """Metrics of normalized embeddings ``[Q, D]`` and ``[N, D]`` on ``eval_set`` (``per_query``: one value per
    query, as ``query_metrics``; else the means)."""
    _check_ks(ks)
    top = search(query_emb, doc_emb, max(ks)).tolist()
    ranked = [[eval_set.doc_ids[j] for j in row] for row in top]
    return (query_metrics if per_query else rank_metrics)(ranked, eval_set.relevant, ks)


def evaluate_model(model, eval_set: EvalSet, *, batch_size: Optional[int] = None,
                   ks: Sequence[int] = DEFAULT_KS, per_query: bool = False) -> dict:
    """Metrics of an in-memory ``EmbeddingModel`` (what the trainer uses to pick checkpoints), embedding as the saved
    model serves (as ``kalm-fast eval`` scores it): its default prompt and ``truncate_dim``, then normalized;
    ``batch_size`` caps the texts per packed batch."""
    embed = dict(prompt=model.default_prompt, dim=model.truncate_dim, normalize=True, max_sequences=batch_size)
    q = model.sentence_embeddings(eval_set.queries, **embed)
    d = model.sentence_embeddings(eval_set.docs, **embed)
    return evaluate_embeddings(q, d, eval_set, ks, per_query=per_query)


def evaluate_encoder(encode: Callable, eval_set: EvalSet, *, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Metrics of ``encode(texts) -> [N, D]`` normalized tensor (e.g. ``Encoder.encode``)."""
    q = torch.as_tensor(encode(eval_set.queries))
    d = torch.as_tensor(encode(eval_set.docs))
    return evaluate_embeddings(q, d, eval_set, ks)
