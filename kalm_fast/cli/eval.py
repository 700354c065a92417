"""``kalm-fast eval``: nDCG@k, Recall@k and MRR@k of a model on an eval set (queries + corpus JSONL)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..files import atomic_write_text, check_writable_dir
from ..train.evaluate import DEFAULT_KS
from .args import device, input_file, positive_int


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default=None, help="model directory (default: the embedded MiniLM)")
    parser.add_argument("--queries", required=True, help="eval queries JSONL: {query, relevant, instruction?}")
    parser.add_argument("--corpus", required=True, help="corpus JSONL: {id, text, title?}")
    parser.add_argument("--instruction", default=None, help="task instruction for queries that carry none")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="max tokens per text (default: the model's own; a larger value is capped by it)")
    parser.add_argument("--device", type=device, default=None)
    parser.add_argument("--k", type=positive_int, nargs="+", default=list(DEFAULT_KS),
                        help="cut-offs (default 1 5 10 100)")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")


def run(args) -> int:
    from ..encode import Encoder
    from ..train.data import load_eval_set
    from ..train.evaluate import evaluate_encoder

    queries, corpus = input_file(args.queries, "--queries"), input_file(args.corpus, "--corpus")
    if args.output:
        if Path(args.output).is_dir():
            raise ValueError(f"--output {args.output!r} is a directory; expected a file path for the metrics JSON")
        check_writable_dir(Path(args.output).parent, "--output")
    eval_set = load_eval_set(queries, corpus, instruction=args.instruction)
    try:
        encoder = Encoder(args.model, device=args.device, max_length=args.max_length)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot load --model: {exc}") from None

    def encode(texts):
        return encoder.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                              convert_to_tensor=True).float().cpu()

    metrics = evaluate_encoder(encode, eval_set, ks=args.k)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        atomic_write_text(Path(args.output), text + "\n")
    return 0
