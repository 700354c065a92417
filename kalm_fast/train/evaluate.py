"""Retrieval evaluation: nDCG@k, Recall@k and MRR@k of a model on an eval set, and ``kalm-fast eval``.

nDCG uses linear gains (as trec_eval / BEIR): ``DCG@k = sum_{r<k} grade(doc_r) / log2(r + 2)``, divided by
the DCG of the ideal ordering of the query's relevant grades. Recall@k counts relevant docs (grade > 0) in
the top k over all relevant docs. MRR@k is ``1 / rank`` of the first relevant doc within the top k (else 0).
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Callable, Optional, Sequence

import torch

from .data import EvalSet, load_eval_set

DEFAULT_KS = (1, 5, 10, 100)


def query_metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[dict], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Per-query metrics ``{name: [value of query 0, query 1, ...]}``. ``ranked[i]``: doc ids best first;
    ``relevant[i]``: ``{doc_id: grade > 0}``."""
    if len(ranked) != len(relevant):
        raise ValueError(f"ranked has {len(ranked)} queries but relevant has {len(relevant)}")
    if not ranked:
        raise ValueError("ranked and relevant need at least one query")
    out = {}
    for ids, rel in zip(ranked, relevant):
        ideal = sorted(rel.values(), reverse=True)
        first_hit = next((r for r, d in enumerate(ids) if rel.get(d, 0) > 0), None)
        for k in ks:
            dcg = sum(rel.get(d, 0.0) / math.log2(r + 2) for r, d in enumerate(ids[:k]))
            idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal[:k]))
            hits = sum(1 for d in ids[:k] if rel.get(d, 0) > 0)
            values = {f"ndcg@{k}": dcg / idcg, f"recall@{k}": hits / len(rel),
                      f"mrr@{k}": 1.0 / (first_hit + 1) if first_hit is not None and first_hit < k else 0.0}
            for name, v in values.items():
                out.setdefault(name, []).append(v)
    return out


def rank_metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[dict], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Mean metrics over queries (the mean of ``query_metrics``)."""
    return {name: sum(values) / len(values) for name, values in query_metrics(ranked, relevant, ks).items()}


def search(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, *, chunk: int = 1024) -> torch.Tensor:
    """Indices ``[Q, min(k, N)]`` of the highest dot products, best first, in chunks of queries."""
    k = min(k, doc_emb.shape[0])
    out = []
    for start in range(0, query_emb.shape[0], chunk):
        scores = query_emb[start:start + chunk].float() @ doc_emb.float().T
        out.append(scores.topk(k, dim=1).indices)
    return torch.cat(out)


def evaluate_embeddings(query_emb: torch.Tensor, doc_emb: torch.Tensor, eval_set: EvalSet,
                        ks: Sequence[int] = DEFAULT_KS, *, per_query: bool = False) -> dict:
    """Metrics of normalized embeddings ``[Q, D]`` and ``[N, D]`` on ``eval_set`` (``per_query``: one value per
    query, as ``query_metrics``; else the means)."""
    top = search(query_emb, doc_emb, max(ks)).tolist()
    ranked = [[eval_set.doc_ids[j] for j in row] for row in top]
    return (query_metrics if per_query else rank_metrics)(ranked, eval_set.relevant, ks)


@torch.no_grad()
def embed_with_model(model, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """L2-normalized fp32 embeddings ``[N, H]`` of ``texts`` from an ``EmbeddingModel`` (in eval mode)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        emb = model(model.tokenize([texts[i] for i in idx])).float()
        emb = torch.nn.functional.normalize(emb, dim=-1)
        for i, e in zip(idx, emb.cpu()):
            out[i] = e
    model.train(was_training)
    return torch.stack(out)


def evaluate_model(model, eval_set: EvalSet, *, batch_size: int = 64, ks: Sequence[int] = DEFAULT_KS,
                   per_query: bool = False) -> dict:
    """Metrics of an in-memory ``EmbeddingModel`` (what the trainer uses to pick checkpoints)."""
    q = embed_with_model(model, eval_set.queries, batch_size=batch_size)
    d = embed_with_model(model, eval_set.docs, batch_size=batch_size)
    return evaluate_embeddings(q, d, eval_set, ks, per_query=per_query)


def evaluate_encoder(encode: Callable, eval_set: EvalSet, *, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Metrics of ``encode(texts) -> [N, D]`` normalized tensor (e.g. ``Encoder.encode``)."""
    q = torch.as_tensor(encode(eval_set.queries))
    d = torch.as_tensor(encode(eval_set.docs))
    return evaluate_embeddings(q, d, eval_set, ks)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default=None, help="model directory (default: the embedded MiniLM)")
    parser.add_argument("--queries", required=True, help="eval queries JSONL: {query, relevant, instruction?}")
    parser.add_argument("--corpus", required=True, help="corpus JSONL: {id, text, title?}")
    parser.add_argument("--instruction", default=None, help="task instruction for queries that carry none")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="cut-offs (default 1 5 10 100)")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")


def run(args) -> int:
    from kalm_fast import Encoder

    eval_set = load_eval_set(args.queries, args.corpus, instruction=args.instruction)
    encoder = Encoder(args.model, device=args.device)

    def encode(texts):
        return encoder.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                              convert_to_tensor=True).float().cpu()

    metrics = evaluate_encoder(encode, eval_set, ks=args.k)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser("kalm-fast eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
