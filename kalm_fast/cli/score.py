"""``kalm-fast score --model TEACHER --input train.jsonl --output scored.jsonl``: a teacher embedder's scores of
every (query, text) pair of training records, as ``pos_scores`` / ``neg_scores`` for stages that distill
(``kalm_fast.train.teacher_scores``; resumable: run it again after an interruption)."""
from __future__ import annotations

import argparse

from ..distributed import torchrun_env
from .args import device, input_file, positive_int


def _task_instruction(text: str) -> tuple[str, str]:
    task, sep, instruction = text.partition("=")
    if not sep or not task or not instruction.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=INSTRUCTION, got {text!r}")
    return task, instruction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the teacher: a local model directory")
    parser.add_argument("--input", required=True, help="training records (.jsonl: query, pos, neg, task, ...)")
    parser.add_argument("--output", required=True, help="the scored records (.jsonl)")
    parser.add_argument("--instruction", type=_task_instruction, action="append", default=[], metavar="TASK=TEXT",
                        help="query instruction of a task's records that carry none (a stage's `instructions`); "
                             "repeatable")
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                                                                     "available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "auto"],
                        help="weights dtype (default: the checkpoint's own on a GPU, float32 on CPU)")
    parser.add_argument("--max-length", type=positive_int, default=512, help="max tokens per text (capped by the "
                                                                             "model)")
    parser.add_argument("--max-tokens-per-batch", type=positive_int, default=None,
                        help="packed tokens per forward pass")
    parser.add_argument("--chunk-records", type=positive_int, default=1024,
                        help="records per chunk: the unit of progress an interrupted run keeps (default 1024)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .bin weights")


def run(args) -> int:
    from ..train.teacher_scores import score_file

    if torchrun_env().world_size > 1:
        raise ValueError("kalm-fast score runs in one process (it writes one file); run it without torchrun")
    instructions = dict(args.instruction)
    if len(instructions) != len(args.instruction):
        raise ValueError("--instruction names a task twice")
    result = score_file(args.model, input_file(args.input, "--input"), args.output, instructions=instructions,
                        chunk_records=args.chunk_records, device=args.device, dtype=args.dtype,
                        max_length=args.max_length, allow_pickle=args.allow_pickle,
                        max_tokens_per_batch=args.max_tokens_per_batch)
    resumed = f" (resumed after record {result['resumed_at']})" if result["resumed_at"] else ""
    print(f"scored {result['records']} records{resumed}: {result['pairs']} pairs in {result['seconds']:.2f} s "
          f"-> {args.output}")
    return 0
