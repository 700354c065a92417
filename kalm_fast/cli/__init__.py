"""``kalm-fast`` command line, one module per subcommand: ``encode``, ``demo``, ``train``, ``soup``, ``eval``,
``ablate``, ``bench``.

Each module defines ``add_arguments(parser)`` and ``run(args) -> int``; argparse lives here only. Under torchrun:
``torchrun --nproc_per_node N -m kalm_fast.cli train run.yaml``.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

COMMANDS = {
    "encode": "encode texts (.txt / .jsonl) into .npy / .safetensors, or a sharded resumable output dir",
    "demo": "encode the bundled sample corpus and show nearest neighbours of sample queries",
    "train": "run a multi-stage training config (YAML)",
    "soup": "average checkpoints into a model soup",
    "eval": "retrieval evaluation: nDCG@10, Recall@k, MRR",
    "ablate": "what focal loss, hard-negative mixing and the soup buy, with seeds and CIs",
    "bench": "run the benchmarks that fit this device",
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kalm-fast", description="Fast KaLM-style text embedding: encode, train, soup, eval.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == argv_command:  # import only the module of the command being run
            import_module(f"{__name__}.{name}").add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    return int(import_module(f"{__name__}.{args.command}").run(args) or 0)
