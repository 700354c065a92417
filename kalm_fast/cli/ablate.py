"""``kalm-fast ablate CONFIG.yaml``: plain InfoNCE vs + focal vs + mixing vs both vs their soup, with seeds, on
the config's test split (the arguments of ``kalm_fast.train.ablation.ablate``)."""
from __future__ import annotations

import argparse
import sys


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("config", help="training config (YAML) with an 'eval' (validation) and a 'test' section")
    parser.add_argument("--seeds", type=_int_at_least(1), default=3, help="runs per variant (default 3)")
    parser.add_argument("--stage", default=None, help="the training stage to ablate (default: the first one)")
    parser.add_argument("--output-dir", default=None, help="where runs and results go (default: OUTPUT_DIR/ablation)")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of an earlier ablation")
    parser.add_argument("--bootstrap", type=_int_at_least(1), default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--bootstrap-seed", type=_int_at_least(0), default=0, help="seed of the bootstrap (default 0)")


def run(args) -> int:
    from ..train.ablation import Ablation, format_table

    try:
        ablation = Ablation(args.config, seeds=args.seeds, stage=args.stage, output_dir=args.output_dir,
                            resume=args.resume, resamples=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    except (ValueError, OSError) as exc:
        print(f"kalm-fast ablate: error: {exc}", file=sys.stderr)
        return 2
    results = ablation.run()
    print(format_table(results))
    print(f"\nwall time {results['wall_s']:.0f} s; wrote " + ", ".join(p for p in results["files"].values() if p))
    return 0
