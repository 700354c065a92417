"""``kalm-fast`` command line, one module per subcommand: ``encode``, ``demo``, ``train``, ``mine``, ``score``,
``soup``, ``eval``, ``ablate``, ``bench``.

Each module defines ``add_arguments(parser)`` and ``run(args) -> int``; argparse lives here only. Under torchrun:
``torchrun --nproc_per_node N -m kalm_fast.cli train run.yaml``.

Exit codes, the same for every subcommand: 0 done; 2 bad input (arguments, files, config, data, model), refused
before any work with one line ``kalm-fast CMD: error: ...`` on stderr; 1 the work failed on the way (a full disk,
an I/O error, a non-finite training loss), also one line. What was finished before a failure stays valid.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .. import __version__
from ..errors import RunError

COMMANDS = {
    "encode": "encode texts (.txt / .jsonl) into .npy / .safetensors, or a sharded resumable output dir",
    "demo": "encode the bundled sample corpus and show nearest neighbours of sample queries",
    "train": "run a multi-stage training config (YAML)",
    "mine": "hard negatives for training records from a model's ranks 50-100 (the KaLM-Embedding-V2 way)",
    "score": "a teacher embedder's scores of training records (pos_scores / neg_scores, for distillation)",
    "soup": "average checkpoints into a model soup",
    "eval": "retrieval evaluation: nDCG@10, Recall@k, MRR",
    "ablate": "what focal loss, hard-negative mixing and the soup buy, with seeds and CIs",
    "bench": "run the benchmarks that fit this device",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line ``kalm-fast CMD: error: ...`` (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="kalm-fast", description="Fast KaLM-style text embedding: encode, train, mine, score, soup, "
                                                    "eval, ablate, bench.")
    parser.add_argument("--version", action="version", version=f"kalm-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == argv_command:  # import only the module of the command being run
            import_module(f"{__name__}.{name}").add_arguments(command_parser)
            parser.set_defaults(command_parser=command_parser)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand's parser: "kalm-fast encode: error: ..."
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, a usage error: argparse has printed what to print
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"kalm-fast {args.command}"
    try:
        return int(import_module(f"{__name__}.{args.command}").run(args) or 0)
    except ValueError as exc:  # kalm_fast's bad-input errors name the argument, key, file or line
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (RunError, OSError) as exc:
        what = f"{exc.strerror}: {exc.filename!r}" if isinstance(exc, OSError) and exc.filename else _one_line(exc)
        print(f"{prog}: error: {what}", file=sys.stderr)
        return 1
