"""``kalm-fast score --model TEACHER --input train.jsonl --output scored.jsonl``: a teacher embedder's scores of
every (query, text) pair of training records, as ``pos_scores`` / ``neg_scores`` for stages that distill
(``kalm_fast.train.teacher_scores``; resumable: run it again after an interruption)."""
from __future__ import annotations

import argparse

from ..distributed import torchrun_env
from .args import add_record_tool_arguments, input_file, instructions_of, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_record_tool_arguments(parser, "teacher")
    parser.add_argument("--chunk-records", type=positive_int, default=1024,
                        help="records per chunk: the unit of progress an interrupted run keeps (default 1024)")


def run(args) -> int:
    from ..train.teacher_scores import score_file

    if torchrun_env().world_size > 1:
        raise ValueError("kalm-fast score runs in one process (it writes one file); run it without torchrun")
    result = score_file(args.model, input_file(args.input, "--input"), args.output, instructions=instructions_of(args),
                        chunk_records=args.chunk_records, device=args.device, dtype=args.dtype,
                        max_length=args.max_length, allow_pickle=args.allow_pickle,
                        max_tokens_per_batch=args.max_tokens_per_batch)
    resumed = f" (resumed after record {result['resumed_at']})" if result["resumed_at"] else ""
    print(f"scored {result['records']} records{resumed}: {result['pairs']} pairs in {result['seconds']:.2f} s "
          f"-> {args.output}")
    return 0
