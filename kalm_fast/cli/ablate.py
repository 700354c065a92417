"""``kalm-fast ablate CONFIG.yaml``: plain InfoNCE vs + focal vs + mixing vs both vs their soup, with seeds, on
the config's test split (the arguments of ``kalm_fast.train.ablation.ablate``)."""
from __future__ import annotations

import argparse

from .args import input_file, nonnegative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("config", help="training config (YAML) with an 'eval' (validation) and a 'test' section")
    parser.add_argument("--seeds", type=positive_int, default=3, help="runs per variant (default 3)")
    parser.add_argument("--stage", default=None, help="the training stage to ablate (default: the first one)")
    parser.add_argument("--output-dir", default=None, help="where runs and results go (default: OUTPUT_DIR/ablation)")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of an earlier ablation")
    parser.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--bootstrap-seed", type=nonnegative_int, default=0, help="seed of the bootstrap (default 0)")


def run(args) -> int:
    from ..train.ablation import Ablation, format_table

    ablation = Ablation(input_file(args.config, "config"), seeds=args.seeds, stage=args.stage,
                        output_dir=args.output_dir, resume=args.resume, resamples=args.bootstrap,
                        bootstrap_seed=args.bootstrap_seed)
    results = ablation.run()
    print(format_table(results))
    print(f"\nwall time {results['wall_s']:.0f} s; wrote " + ", ".join(p for p in results["files"].values() if p))
    return 0
