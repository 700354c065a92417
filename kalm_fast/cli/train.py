"""``kalm-fast train CONFIG.yaml [--resume]``: the multi-stage trainer (``kalm_fast.train.Trainer``).

The config, every stage's data, the eval set and the model's files are checked before the first step; a
non-finite loss stops the run (exit code 1) without saving a model from it.
"""
from __future__ import annotations

import argparse

from .args import input_file


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    parser.add_argument("--output-dir", default=None, help="override the config's output_dir")


def run(args) -> int:
    from ..distributed import process_group, torchrun_env
    from ..train import Trainer, load_config

    config = load_config(input_file(args.config, "config"))
    if args.output_dir:
        config.output_dir = args.output_dir
    with process_group():
        final = Trainer(config, resume=args.resume).train()
        if torchrun_env().is_main:
            print(f"final model: {final}")
    return 0
