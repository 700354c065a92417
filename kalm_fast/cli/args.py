"""Argument types shared by the subcommands: a bad value is argparse's one-line ``kalm-fast CMD: error: argument
--x: ...`` (exit 2) before any work, and files named on the command line are checked before anything loads."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..distributed import check_device


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
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
