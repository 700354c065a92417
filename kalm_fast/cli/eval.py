"""``kalm-fast eval``: nDCG@k, Recall@k and MRR@k of a model on an eval set (queries + corpus JSONL)."""
from __future__ import annotations

import argparse
import json

from ..train.evaluate import DEFAULT_KS


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
    from ..encode import Encoder
    from ..train.data import load_eval_set
    from ..train.evaluate import evaluate_encoder

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
