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
