"""``kalm-fast soup CHECKPOINT... --output OUT``: the weighted average of checkpoints (``kalm_fast.model_soup``)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("checkpoints", nargs="+", help=".safetensors files or model directories")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per checkpoint (normalized)")
    parser.add_argument("--output", required=True, help="output .safetensors file or directory")


def run(args) -> int:
    from ..train.soup import model_soup

    if args.weights is not None and len(args.weights) != len(args.checkpoints):
        raise ValueError(f"--weights has {len(args.weights)} value(s) for {len(args.checkpoints)} checkpoints; "
                         "give one per checkpoint")
    out = model_soup(args.checkpoints, weights=args.weights, output=args.output)
    print(f"wrote {out}")
    return 0
