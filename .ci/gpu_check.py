"""``make gpu-check``: every GPU check of kalm_fast in one time-boxed run, its results in at most 8 files.

    OUT=/path/to/dir make gpu-check                # on a CUDA machine whose packages are installed (no venv)
    python3 .ci/gpu_check.py --out DIR --dry       # anywhere: the same plumbing, GPU work replaced by tiny CPU runs

Made for the offline H200 test machine (system python3 with torch, triton, transformers, sentence-transformers,
pybind11, pytest, pytest-xdist; nothing can be installed; the 88 MB embedded-model package is absent) and for its
short leases: the whole run ends within ``--budget`` seconds (default 470), every stage has its own time limit (at
which it is interrupted, so that pytest still prints the failures so far, then killed with its workers) and a stage
that no longer fits is skipped and reported. Stages, in order:

- ``env``: GPU, driver, versions;
- ``build``: ``kalm_fast._C`` built in place with this interpreter; a build without CUDA fails the run loudly;
- ``tests``: every test marked ``gpu`` (``pytest -m gpu``) but those of the CUDA C++ backends, compiled
  (``TRITON_INTERPRET=0``), in one pytest-xdist worker per core stealing work from each other (Triton compiles
  single-threaded per process; the workers share compiled kernels and autotuning picks through Triton's cache), with
  ``KALM_GPU_CHECK=1``: a skipped GPU test is a failure;
- ``tests-native``: the GPU tests of the CUDA C++ backends (marked ``native`` too), never run on hardware before, in
  processes of their own with ``CUDA_LAUNCH_BLOCKING=1``: a fault there spoils no other test and is reported by the
  test that caused it;
- ``bench-*``: the Hopper speed targets in quick modes, each against its baseline in the same run: attention (D=128,
  L 2k-16k; fp32; the packed KaLM shape), the Qwen2-0.5B-shaped encode against sentence-transformers (and the
  top ops of each by GPU time, ``--profile``), pooling against a device copy, the loss at B=32k against one matmul
  and cross-entropy, a GradCache training step against sentence-transformers' CachedMultipleNegativesRankingLoss
  step (and each step's top ops);
- on request only (``--only build bench-attention-variants bench-encode-budgets --budget 520``, then ``--only build
  bench-train-step-1024 bench-attention-window --budget 520``: their limits add up past one run's budget): the
  triton attention's variants, ``benchmarks.attention --preset variants``; local attention, ``--preset window
  --window 1024``; the encode at token budgets 16k / 32k / 64k; the training step at B = 1024 against
  sentence-transformers', and the largest B of each in the same memory; and
  ``sanitize-native``: the native tests under compute-sanitizer's memcheck (where they fail or fault);
- ``pack``: ``OUT/summary.md`` (read it first), ``OUT/summary.json`` and ``OUT/gpu-check.tar.gz`` (every log, JUnit
  XML and benchmark JSON/MD; the benchmark files are named ``<name>-<device>.*`` for ``benchmarks/results/``).

Back on the CPU machine, ``python3 .ci/gpu_check.py --import-results DIR`` copies the GPU reports and the summary of
a returned ``OUT`` folder into ``benchmarks/results/``.

The exit code is 0 only when the build has CUDA, no test failed and no required stage failed or timed out; a
benchmark stage that is skipped, cut short by the budget or over its own limit is listed, with the rows it measured
so far in ``summary.md``, but does not fail the run (a slow benchmark is a finding, not a failure). ``--dry`` runs
the same stages on the CPU: the build and ``gpu`` tests are only collected, the benchmarks run their ``dry`` presets;
``make test`` runs it, so the script cannot rot between GPU runs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # what the H200 test machine hands back from OUT
MIN_STAGE_SECONDS = 30  # a stage with less time left than both this and its own limit is skipped
# a stage at its limit gets SIGINT and up to this long (a quarter of its limit at most) to print what it has: pytest
# its short summary of the failures so far, a benchmark where it was; then its whole process group is killed
INTERRUPT_GRACE = 15
# --dry checks plumbing on a CPU shared with other work, not speed: its stages get this many times their GPU limits
DRY_SLACK = 3
PARALLEL_TOKENIZERS = dict(TOKENIZERS_PARALLELISM="true")
TF32_OVERRIDE = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"
MAX_FILE_BYTES = 16 << 20  # the largest file the device hands back
# one CPU thread per pytest worker (one worker per core already); the tests' own files of CUDA faults
TEST_ENV = dict(OMP_NUM_THREADS="1", KALM_GPU_CHECK_FAULTS="{work}/cuda-faults.log")


@dataclass
class Stage:
    """One step: a command with its own time limit; ``required`` stages fail the run when they fail;
    ``on_request`` stages run only when ``--only`` names them."""

    name: str
    limit: int
    command: list
    required: bool = True
    env: dict = field(default_factory=dict)
    on_request: bool = False


def stages(dry: bool, workers: int) -> list:
    py = sys.executable
    bench = "dry" if dry else "gpu-check"

    def pytest_command(marker: str, name: str, workers: int = 0) -> list:
        # pyproject's addopts left out: they name pytest-benchmark's option, and that plugin is not needed here
        cmd = [py, "-m", "pytest", "-m", marker, "-p", "no:cacheprovider", "-o", "addopts=", "-rfEs", "tests"]
        if dry:
            return cmd + ["-q", "--collect-only"]
        # a line per test as it ends (what ran, should the stage be cut), the slowest tests at the end; idle workers
        # take queued tests from busy ones (the every-config tests compile for a minute or more)
        xdist = ["-n", str(workers), "--dist", "worksteal"] if workers else []
        return cmd + ["-v", "--durations=25", *xdist, "--junitxml", f"{{work}}/junit-{name}.xml"]

    gpu_check = dict(TEST_ENV, KALM_GPU_CHECK="0" if dry else "1")
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if dry:  # the plumbing only: the native tests collected
        sanitize = pytest_command("gpu and native", "sanitize-native")
    elif Path(sanitizer).is_file():  # one process: no xdist workers
        sanitize = [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20",
                    *pytest_command("gpu and native", "sanitize-native")]
    else:
        sanitize = [py, "-c", "raise SystemExit('compute-sanitizer not found (PATH, /usr/local/cuda/bin)')"]
    encode = [py, "-m", "benchmarks.encode", "--models", "qwen2", "--workloads", "longtail", "--quick", "--no-peers",
              *(["--dtypes", "float32", "--layers", "1", "--texts", "16"] if dry else ["--dtypes", "bfloat16"])]
    # the fused decoder's row on the GPU only (in --dry its Triton kernels would run in the interpreter: minutes)
    train = [py, "-m", "benchmarks.train_step", "--batch", "4" if dry else "256", "--repeats", "1", "--profile",
             "--backends", "auto", "st-cached-mnrl", *([] if dry else ["auto (fused decoder)"])]
    plan = [
        Stage("env", 30, [py, __file__, "--env"]),
        Stage("build", 300, [py, __file__, "--build", *(["--dry"] if dry else [])]),
        # the workers share their autotuning picks through Triton's cache (the configs are part of its key)
        Stage("tests", 260, pytest_command("gpu and not native", "tests", workers),
              env=dict(gpu_check, TRITON_CACHE_AUTOTUNING="1")),
        # the CUDA C++ backends, never run on hardware before, in processes of their own: a fault there spoils its
        # process's CUDA context (and with asynchronous launches would be reported by a later test)
        Stage("tests-native", 90, pytest_command("gpu and native", "tests-native", min(workers, 4)),
              env=dict(gpu_check, CUDA_LAUNCH_BLOCKING="1")),
        Stage("bench-attention", 120, [py, "-m", "benchmarks.attention", "--preset", bench], required=False),
        # + where the time goes; tokenizers may use every core there (both sides tokenize; pytest's workers may not)
        Stage("bench-encode", 120, [*encode, "--profile"], required=False, env=PARALLEL_TOKENIZERS),
        Stage("bench-mean-pool", 45, [py, "-m", "benchmarks.mean_pool", "--preset", bench], required=False),
        Stage("bench-contrastive", 90, [py, "-m", "benchmarks.contrastive", "--preset", bench], required=False),
        Stage("bench-train-step", 120, train, required=False),
        # for the speed issue: the triton attention variants (TMA loads, atomic dQ) against the defaults and SDPA;
        # the encode at three token budgets (the default, DEFAULT_TOKENS["cuda"], is 32768)
        Stage("bench-attention-variants", 240, [py, "-m", "benchmarks.attention", "--preset",
                                                "dry" if dry else "variants"], required=False, on_request=True),
        # local attention (Gemma 3's bidirectional window) against SDPA with the band as a mask
        Stage("bench-attention-window", 150, [py, "-m", "benchmarks.attention", "--preset", "dry" if dry else "window",
                                              "--window", "16" if dry else "1024"], required=False, on_request=True),
        Stage("bench-encode-budgets", 200, [*encode, "--report", "encode-budgets", "--token-budgets",
                                            "256,512" if dry else "16384,32768,65536"],
              required=False, on_request=True, env=PARALLEL_TOKENIZERS),
        # the training-step target's own batch, B = 1024 (the required run times B = 256), and "a larger batch fits"
        Stage("bench-train-step-1024", 300, [py, "-m", "benchmarks.train_step", "--batch", "8" if dry else "1024",
                                             "--repeats", "1", "--backends", "auto", "st-cached-mnrl",
                                             *([] if dry else ["auto (fused decoder)"]), "--max-batch",
                                             "--report", "train_step_1024"],
              required=False, on_request=True),
        # where the native tests fail or fault: compute-sanitizer's memcheck over them, each tensor its own
        # allocation (torch's caching allocator would hide an access past a tensor inside its cached block)
        Stage("sanitize-native", 300, sanitize, required=False, on_request=True,
              env=dict(gpu_check, PYTORCH_NO_CUDA_MEMORY_CACHING="1")),
    ]
    if dry:
        for stage in plan:
            stage.limit *= DRY_SLACK
    return plan


def report_env() -> int:
    """GPU, driver and versions (stdout goes to the stage's log)."""
    from importlib import metadata

    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                        "--format=csv"], check=False)
    print("python", sys.version.replace("\n", " "), platform.machine())
    for package in ("torch", "triton", "numpy", "transformers", "sentence-transformers", "tokenizers", "pybind11",
                    "pytest", "pytest-xdist", "matplotlib"):
        try:
            print(package, metadata.version(package))
        except metadata.PackageNotFoundError:
            print(package, "not installed")
    import torch

    print("torch cuda", torch.version.cuda, "devices", torch.cuda.device_count(), "fp32 matmul precision",
          torch.get_float32_matmul_precision(), "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
    print("nvcc", shutil.which("nvcc"))
    return 0


def build(dry: bool) -> int:
    """Build kalm_fast._C in place (not in --dry: the test setup built it already); fail without CUDA."""
    if not dry:
        proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT)
        if proc.returncode:
            print(f"BUILD FAILED: setup.py exited with {proc.returncode}")
            return proc.returncode
    import kalm_fast._native as native

    info = native.build_info()
    print("build_info", json.dumps(info))
    if not info["cuda"] and not dry:
        print(f"BUILD FAILED: kalm_fast._C was built WITHOUT CUDA ({info.get('reason')}): every cuda backend would "
              "skip; fix the build first")
        return 1
    return 0


def run_stage(stage: Stage, work: Path, deadline: float) -> dict:
    left = int(deadline - time.monotonic())
    row = dict(stage=stage.name, required=stage.required, limit_s=stage.limit)
    if left < min(stage.limit, MIN_STAGE_SECONDS):
        return dict(row, status="skipped", note=f"{left} s left of the budget")
    limit = min(stage.limit, left)
    log = work / f"{stage.name}.log"
    command = [str(c).format(work=work) for c in stage.command]
    env = dict(os.environ, **{key: str(value).format(work=work) for key, value in stage.env.items()})
    started = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: no worker outlives it
        grace = min(INTERRUPT_GRACE, limit // 4)
        if _finished(proc, limit - grace):
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        else:  # over its own limit, or cut short by the run's budget
            proc.send_signal(signal.SIGINT)
            _finished(proc, grace)
            status = f"timeout after {limit} s" if limit == stage.limit else f"cut at the budget after {limit} s"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone: nothing was left running
            pass
        proc.wait()
    row.update(status=status, seconds=round(time.monotonic() - started, 1), log=log.name)
    tail = log.read_text(errors="replace").splitlines()[-3:]
    row["tail"] = " | ".join(line.strip() for line in tail)[-400:]
    print(f"[{row['seconds']:6.1f} s] {stage.name}: {status}", flush=True)
    return row


def _finished(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=max(seconds, 0))
        return True
    except subprocess.TimeoutExpired:
        return False


def summarize(rows: list, work: Path, out: Path, dry: bool, started: float) -> int:
    failed = [r for r in rows if r["required"] and r["status"] != "ok"]
    failed += [r for r in rows if not r["required"] and r["status"].startswith("failed")]
    incomplete = [r["stage"] for r in rows if not r["required"] and r["status"] != "ok" and r not in failed]
    summary = dict(ok=not failed, dry=dry, seconds=round(time.monotonic() - started, 1), stages=rows,
                   incomplete=incomplete, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    unfinished = f" (benchmarks not finished: {', '.join(incomplete)})" if incomplete else ""
    lines = [f"# make gpu-check{' --dry' if dry else ''}: {'PASSED' if not failed else 'FAILED'}{unfinished} "
             f"in {summary['seconds']} s ({summary['date']})", "", "| stage | status | seconds | last lines |",
             "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | {r.get('tail', r.get('note', ''))} |"
              for r in rows]
    env_log = work / "env.log"
    if env_log.is_file():
        lines += ["", "## env", "```", env_log.read_text(errors="replace")[-3000:], "```"]
    faults = work / "cuda-faults.log"
    if faults.is_file():  # tests whose CUDA error ended their worker (conftest), each named once
        lines += ["", "## CUDA faults (each ended its test's worker)", "```",
                  *faults.read_text(errors="replace").splitlines()[-40:], "```"]
    for stage in ("tests", "tests-native", "sanitize-native"):
        tests_log = work / f"{stage}.log"
        if tests_log.is_file():  # pytest's short summary: failures, errors and skips with their reasons (and
            # compute-sanitizer's reports, its lines starting with "=")
            text = tests_log.read_text(errors="replace").splitlines()
            keep = [line for line in text if line.startswith(("FAILED", "ERROR", "SKIPPED", "=", "!"))
                    or " passed" in line or " collected" in line or re.match(r"\d+\.\d+s (call|setup) ", line)]
            lines += ["", f"## {stage}", "```", *keep[-100:], "```"]
    for report in sorted((work / "bench").glob("*.md")):
        lines += ["", report.read_text(errors="replace")]
    for r in rows:  # a benchmark stopped before its report: the rows it printed as it measured them
        log = work / r.get("log", "-")
        if not r["required"] and r["status"] != "ok" and log.is_file():
            measured = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("row ")]
            if measured:
                lines += ["", f"## {r['stage']}: {r['status']}, the rows measured so far", "```", *measured[-60:],
                          "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _pack(work, out / "gpu-check.tar.gz")
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES:
        print(f"{out} holds {len(files)} files; the device hands back only {MAX_FILES}")
        return 1
    print((out / "summary.md").read_text().split("\n## env")[0])
    return 0 if not failed else 1


def _pack(work: Path, tarball: Path) -> None:
    """Every file of ``work`` into ``tarball``; should that exceed what the device hands back, each file is cut to its
    last MiB (the end of a log says the most) and the tarball written again."""
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(work, arcname="gpu-check")
    if tarball.stat().st_size <= MAX_FILE_BYTES:
        return
    with tarfile.open(tarball, "w:gz") as tar:
        for path in sorted(p for p in work.rglob("*") if p.is_file()):
            data = path.read_bytes()[-(1 << 20):]
            info = tarfile.TarInfo(f"gpu-check/{path.relative_to(work).as_posix()}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    print(f"{tarball.name}: every file cut to its last MiB (the whole was past {MAX_FILE_BYTES >> 20} MiB)")


def import_results(folder: Path, results: Path = ROOT / "benchmarks" / "results") -> int:
    """Copy a GPU run's benchmark reports (``bench/<name>-<device>.json|md|png`` of its tarball, not the CPU ones
    of a dry run) and, unless it was a dry run, its ``summary.md`` (as ``gpu-check-summary.md``) into ``results``."""
    tarball = folder / "gpu-check.tar.gz"
    if not tarball.is_file():
        print(f"no gpu-check.tar.gz in {folder}")
        return 1
    copied = []
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if (member.isfile() and path.parent.name == "bench" and path.suffix in (".json", ".md", ".png")
                    and not path.stem.endswith("-cpu")):
                (results / path.name).write_bytes(tar.extractfile(member).read())
                copied.append(path.name)
    summary = folder / "summary.json"
    if summary.is_file() and not json.loads(summary.read_text()).get("dry"):
        shutil.copyfile(folder / "summary.md", results / "gpu-check-summary.md")
        copied.append("gpu-check-summary.md")
    print(f"copied into {results}: {', '.join(sorted(copied)) or 'nothing'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "build" / "gpu-check"),
                        help="output folder (default: $OUT, else build/gpu-check); emptied first")
    parser.add_argument("--dry", action="store_true", help="CPU plumbing run: GPU stages replaced by tiny CPU runs")
    parser.add_argument("--budget", type=int, default=470, help="seconds the whole run may take")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="pytest workers (default: one per core; Triton compiles single-threaded)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (and pack)")
    parser.add_argument("--import-results", metavar="DIR", type=Path,
                        help="copy the GPU reports and summary of a run's output folder into benchmarks/results")
    parser.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.import_results:
        return import_results(args.import_results)
    if args.env:
        return report_env()
    if args.build:
        return build(args.dry)
    every_stage = stages(args.dry, args.workers)
    known = [s.name for s in every_stage]
    unknown = [name for name in args.only or () if name not in known]
    if unknown:  # a typo would spend a device lease on nothing
        parser.error(f"--only: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(known)}")
    started = time.monotonic()
    deadline = started + args.budget - 15  # leave time to pack
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # emptied, not removed: OUT may be a mount point or sit in a read-only folder
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    work = Path(tempfile.mkdtemp(prefix="kalm-gpu-check-"))
    (work / "bench").mkdir()
    # fp32 matmuls stay fp32 (the tests' fp32 tolerances, the fp32 benchmarks): an override that some images set
    # makes cuBLAS use TF32 whatever torch's settings say
    if os.environ.pop(TF32_OVERRIDE, None) is not None:
        print(f"{TF32_OVERRIDE} dropped from every stage's environment", flush=True)
    os.environ.update(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                      PYTHONUNBUFFERED="1", KALM_BENCH_OUT=str(work / "bench"), HF_HUB_OFFLINE="1",
                      TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      TRITON_INTERPRET="1" if args.dry else "0")
    plan = [s for s in every_stage
            if not ((s.on_request or args.only is not None) and s.name not in (args.only or ()))]
    print(f"plan, {args.budget} s in all: " + ", ".join(f"{s.name} (at most {s.limit} s)" for s in plan) +
          "; a stage that no longer fits is skipped", flush=True)
    rows = []
    for stage in plan:
        rows.append(run_stage(stage, work, deadline))
        if stage.name == "build" and rows[-1]["status"] != "ok":
            print("the build failed: the remaining stages would test a build without CUDA; stopping", flush=True)
            break
    code = summarize(rows, work, out, args.dry, started)
    shutil.rmtree(work)
    return code


if __name__ == "__main__":
    sys.exit(main())
