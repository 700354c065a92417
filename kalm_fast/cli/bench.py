"""``kalm-fast bench``: run the benchmarks of a source checkout (they ship with the repository, not the wheel)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("only", nargs="*", help="benchmark names (mean_pool, attention, contrastive, encode); default all")


def run(args) -> int:
    if not (CHECKOUT / "benchmarks" / "run_all.py").exists():
        print("kalm-fast bench: error: benchmarks ship with the source checkout; run it from a clone "
              "(`make bench`)", file=sys.stderr)
        return 2
    if args.only:
        return max(subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=CHECKOUT) for name in args.only)
    return subprocess.call([sys.executable, "-m", "benchmarks.run_all"], cwd=CHECKOUT)
