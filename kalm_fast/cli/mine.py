"""``kalm-fast mine --model M --input train.jsonl --output mined.jsonl``: hard negatives from ranks 50-100 of a
model's search, the KaLM-Embedding-V2 way (``kalm_fast.train.mining``; resumable: run it again after an
interruption)."""
from __future__ import annotations

import argparse

from ..distributed import torchrun_env
from .args import add_record_tool_arguments, fraction, input_file, instructions_of, nonnegative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_record_tool_arguments(parser, "model that ranks the candidates (a previous stage's)")
    parser.add_argument("--corpus", default=None,
                        help="more candidates: .txt (one text per line) or .jsonl (text, title?); the records' own "
                             "pos/neg texts are always candidates")
    parser.add_argument("--negatives", type=positive_int, default=7, help="negatives per record (default 7)")
    parser.add_argument("--range", type=nonnegative_int, nargs=2, default=[50, 100], metavar=("LO", "HI"),
                        help="draw them from the candidates ranked [LO, HI), 0-based (default 50 100)")
    parser.add_argument("--max-positive-rank", type=nonnegative_int, default=50,
                        help="drop a record none of whose positives ranks among the first N (default 50; 0: keep "
                             "every record)")
    parser.add_argument("--max-negative-ratio", type=fraction, default=None, metavar="R",
                        help="leave out a candidate scoring above R times the lowest score of the record's positives "
                             "(likely a false negative; NV-Retriever uses 0.95; default: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument("--chunk-records", type=positive_int, default=4096,
                        help="records per chunk: the unit of progress an interrupted run keeps (default 4096)")


def run(args) -> int:
    from ..train.mining import mine_file

    if torchrun_env().world_size > 1:
        raise ValueError("kalm-fast mine runs in one process (it writes one file); run it without torchrun")
    lo, hi = args.range
    if hi <= lo:
        raise ValueError(f"--range {lo} {hi}: HI must be greater than LO")
    corpus = input_file(args.corpus, "--corpus") if args.corpus is not None else None
    result = mine_file(args.model, input_file(args.input, "--input"), args.output, corpus=corpus,
                       num_negatives=args.negatives, rank_range=(lo, hi),
                       max_positive_rank=args.max_positive_rank or None,
                       max_negative_ratio=args.max_negative_ratio, seed=args.seed,
                       instructions=instructions_of(args), chunk_records=args.chunk_records, device=args.device,
                       dtype=args.dtype, max_length=args.max_length, allow_pickle=args.allow_pickle,
                       max_tokens_per_batch=args.max_tokens_per_batch)
    mined = result["records"] - result["resumed_at"]
    resumed = f" (the {result['resumed_at']} before them were mined by an earlier run)" if result["resumed_at"] else ""
    rank_filter = (f"{result['dropped_positive_rank']} dropped (no positive in the first {args.max_positive_rank}), "
                   if args.max_positive_rank else "")
    ratio_filter = (f" ({result['ratio_filtered']} candidates above {args.max_negative_ratio:g} x the lowest "
                    "positive score left out)" if args.max_negative_ratio is not None else "")
    print(f"mined {mined} of {result['records']} records{resumed} against {result['pool']} candidates: "
          f"{result['written']} written ({result['fewer_negatives']} with fewer than {args.negatives} negatives), "
          f"{rank_filter}{result['dropped_no_candidates']} dropped (no candidate in ranks {lo}-{hi}){ratio_filter}, "
          f"in {result['seconds']:.2f} s -> {args.output}")
    return 0
