"""Argument types shared by the subcommands: a bad value is argparse's one-line ``kalm-fast CMD: error: argument
--x: ...`` (exit 2) before any work, and files named on the command line are checked before anything loads."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..distributed import check_device


def int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def device(text: str) -> str:
    try:
        check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def input_file(text: str, what: str) -> Path:
    """``text`` names a readable regular file or a pipe (ValueError naming ``what`` otherwise)."""
    path = Path(text)
    if not path.exists():
        raise ValueError(f"cannot read {what} {text!r}: it does not exist")
    if path.is_dir():
        raise ValueError(f"cannot read {what} {text!r}: it is a directory, expected a file")
    if not os.access(path, os.R_OK):  # not opened: opening a named pipe would wait for its writer
        raise ValueError(f"cannot read {what} {text!r}: permission denied")
    return path


def task_instruction(text: str) -> tuple[str, str]:
    """An argparse type: ``TASK=INSTRUCTION``."""
    task, sep, instruction = text.partition("=")
    if not sep or not task or not instruction.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=INSTRUCTION, got {text!r}")
    return task, instruction


def add_record_tool_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The arguments ``kalm-fast score`` and ``mine`` share: the model that reads the records, the files, the query
    instructions and the model's placement."""
    parser.add_argument("--model", required=True, help=f"the {what}: a local model directory")
    parser.add_argument("--input", required=True, help="training records (.jsonl: query, pos, neg, task, ...)")
    parser.add_argument("--output", required=True, help="the rewritten records (.jsonl)")
    parser.add_argument("--instruction", type=task_instruction, action="append", default=[], metavar="TASK=TEXT",
                        help="query instruction of a task's records that carry none (a stage's `instructions`); "
                             "repeatable")
    parser.add_argument("--device", type=device, default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "auto"],
                        help="weights dtype (default: the checkpoint's own on a GPU, float32 on CPU)")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="max tokens per text (capped by the model)")
    parser.add_argument("--max-tokens-per-batch", type=positive_int, default=None,
                        help="packed tokens per forward pass")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .bin weights")


def instructions_of(args) -> dict:
    """``--instruction`` as a ``{task: instruction}`` mapping (ValueError when a task is named twice)."""
    instructions = dict(args.instruction)
    if len(instructions) != len(args.instruction):
        raise ValueError("--instruction names a task twice")
    return instructions
