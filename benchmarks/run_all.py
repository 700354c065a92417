"""Run every benchmark that fits this device (`make bench`); results land in benchmarks/results/ (or
``KALM_BENCH_OUT``)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

from .harness import device_tag, results_dir

SCRIPTS = ["mean_pool", "attention", "contrastive", "encode", "train_step"]


def main(argv=None) -> int:
    argparse.ArgumentParser(description="Run every benchmark script at its default preset for this device, then "
                            "the pytest-benchmark suite (`make bench`); results land in benchmarks/results/ (or "
                            "KALM_BENCH_OUT).").parse_args(argv)
    failed = []
    for name in SCRIPTS:
        if find_spec(f"benchmarks.{name}") is None:
            continue
        print(f"== benchmarks.{name}", flush=True)
        try:
            import_module(f"benchmarks.{name}").main([])
        except Exception as exc:  # keep going: one broken benchmark should not hide the others
            print(f"benchmarks.{name} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(name)
    print("== pytest-benchmark", flush=True)
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    report = out / f"pytest-benchmark-{device_tag()}.json"
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", str(here), "-p", "no:cacheprovider",
                          "--benchmark-enable", f"--benchmark-json={report}"], cwd=here.parent)
    if failed:
        print("failed benchmarks: " + ", ".join(failed))
    return 1 if failed or rc not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
