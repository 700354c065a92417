"""``kalm-fast demo`` (what ``make run`` calls): encode the sample corpus with the embedded model, print the
throughput and, for a few sample queries, their nearest neighbours in the corpus. The sample files are package
data (``kalm_fast/data``), so the demo runs from an installed wheel as well as from a checkout."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..files import read_lines
from .args import device, input_file, positive_int

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # package data: the sample corpus and queries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=str(DATA_DIR / "sample_corpus.txt"), help="one text per line")
    parser.add_argument("--queries", default=str(DATA_DIR / "sample_queries.txt"), help="one query per line")
    parser.add_argument("--model", default=None, help="local model directory (default: the embedded MiniLM)")
    parser.add_argument("--device", type=device, default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "auto"],
                        help="weights dtype (default: the checkpoint's own on a GPU, float32 on CPU; auto: the "
                             "checkpoint's own)")
    parser.add_argument("--top-k", type=positive_int, default=3)


def _lines(path: str, what: str) -> list:
    lines = [line for _, line in read_lines(input_file(path, what)) if line.strip()]
    if not lines:
        raise ValueError(f"{what} {path!r} holds no texts")
    return lines


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def run(args) -> int:
    import torch

    from ..encode import Encoder

    corpus, queries = _lines(args.corpus, "--corpus"), _lines(args.queries, "--queries")
    try:
        encoder = Encoder(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot load --model: {exc}") from None
    model = encoder.model
    print(f"model: {model.config.model_type} ({model.embedding_size} dims, max {model.max_length} tokens) on "
          f"{encoder.device} {str(model.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads")
    tokens = sum(len(x) for x in model.token_ids(corpus))
    encoder.encode(corpus)  # warm-up: first-touch allocations and GEMM setup are not throughput
    started = time.perf_counter()
    docs = encoder.encode(corpus, convert_to_tensor=True)
    seconds = time.perf_counter() - started
    print(f"encoded {len(corpus)} texts ({tokens} tokens) in {seconds * 1000:.0f} ms: "
          f"{len(corpus) / seconds:.0f} texts/s, {tokens / seconds:.0f} tokens/s")
    q = encoder.encode_queries(queries, convert_to_tensor=True)
    scores = q @ docs.T
    for i, query in enumerate(queries):
        print(f"\nquery: {query}")
        top = torch.topk(scores[i], min(args.top_k, len(corpus)))
        for score, j in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {score:.3f}  {_short(corpus[j])}")
    sys.stdout.flush()
    return 0
