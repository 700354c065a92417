"""``kalm-fast bench``: run the benchmarks of a source checkout (they ship with the repository, not the wheel)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
NOT_BENCHMARKS = ("__init__", "harness", "run_all")


def add_arguments(parser) -> None:
    parser.add_argument("only", nargs="*", help=f"benchmark names ({', '.join(available()) or 'in a checkout'}); "
                        "default all")


def available() -> list:
    """The benchmark modules of the checkout (empty when kalm_fast runs from an installed wheel)."""
    directory = CHECKOUT / "benchmarks"
    return sorted(p.stem for p in directory.glob("*.py")
                  if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("test_"))


def run(args) -> int:
    if not (CHECKOUT / "benchmarks" / "run_all.py").exists():
        raise ValueError("benchmarks ship with the source checkout; run it from a clone (`make bench`)")
    unknown = [name for name in args.only if name not in available()]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(available())}")
    modules = [f"benchmarks.{name}" for name in args.only] or ["benchmarks.run_all"]
    codes = [subprocess.call([sys.executable, "-m", module], cwd=CHECKOUT) for module in modules]
    return 1 if any(codes) else 0  # a benchmark killed by a signal exits negative
