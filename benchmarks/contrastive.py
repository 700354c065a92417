"""Focal-InfoNCE forward+backward: time and peak memory per backend.

    python -m benchmarks.contrastive                      # GPU: B 1k-64k; CPU: B 1k-8k
    python -m benchmarks.contrastive --preset gpu-check   # B = 8k and 32k (the Hopper target)


CPU: every (backend, B) runs in its own subprocess and reports its peak RSS above the RSS it had once the
inputs existed ("extra"). GPU: ``torch.cuda.max_memory_allocated`` above the allocated inputs; an
out-of-memory is reported as such. M = 7 hard negatives, D = 896 (KaLM-Embedding-V2), temperature 0.01.
On a GPU the Triton backend also runs as ``triton gemm-bwd`` (``KALM_FOCAL_INFONCE_BWD=gemm``: one score
recomputation per tile in the backward, the two gradient products on cuBLAS), and the ratio columns compare with
``matmul+ce``, the usual way to compute the loss: normalize, one bf16 matmul of the queries with every document, then
``F.cross_entropy`` (plain InfoNCE, no focal weight: its ``loss`` differs; ``loss_diff`` is taken against the
``reference`` oracle). On the CPU they compare with the ``reference`` oracle.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

from .harness import failed_note, on_gpu, progress, time_fn, write_report

M, D = 7, 896
# GPU presets: batch sizes (every backend each); CPU presets: (backend, B) runs, each in its own process.
PRESETS = {
    "gpu": [1024, 4096, 16384, 32768, 65536],
    "gpu-check": [32768, 8192],  # the target's B first
    "cpu": [("reference", 1024), ("reference", 2048), ("reference", 4096),
            ("torch", 1024), ("torch", 2048), ("torch", 4096), ("torch", 8192)],
    "dry": [("reference", 64), ("torch", 64)],
}
# on a GPU: the baseline, then the backends registered and able to run bf16 on CUDA (the unverified cuda last)
GPU_BACKENDS = ["matmul+ce", "reference", "torch", "triton", "triton gemm-bwd", "cuda"]
VARIANT_ENV = {"triton gemm-bwd": {"KALM_FOCAL_INFONCE_BWD": "gemm"}}  # a backend run under other settings
TEMPERATURE = 0.01


def _inputs(batch, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, D, generator=gen, device=device)
    docs = 0.3 * q[:, None] + torch.randn(batch, 1 + M, D, generator=gen, device=device)
    return q.to(dtype).requires_grad_(), docs.to(dtype).requires_grad_()


def _matmul_ce(q, docs):
    """The usual InfoNCE: cosine scores of every query with every document in one matmul, then cross-entropy."""
    scores = F.normalize(q, dim=-1) @ F.normalize(docs.reshape(-1, D), dim=-1).T
    target = torch.arange(q.shape[0], device=q.device) * (1 + M)
    return F.cross_entropy(scores.float() / TEMPERATURE, target)


def _step(q, docs, name):
    """One forward+backward of implementation ``name`` (a backend, a variant of VARIANT_ENV or ``matmul+ce``);
    the loss."""
    from kalm_fast.ops import focal_infonce

    q.grad = docs.grad = None
    if name == "matmul+ce":
        loss = _matmul_ce(q, docs)
        loss.backward()
        return loss.item()
    with mock.patch.dict(os.environ, VARIANT_ENV.get(name, {})):
        loss = focal_infonce(q, docs, temperature=TEMPERATURE, gamma=0.5, backend=name.split()[0])
        loss.backward()
    return loss.item()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _cpu_worker(backend: str, batch: int) -> dict:
    q, docs = _inputs(batch, torch.float32, "cpu")
    _step(q[:8].detach().requires_grad_(), docs[:8].detach().requires_grad_(), backend)  # warm up code paths
    base = _rss_mb()
    t0 = time.perf_counter()
    loss = _step(q, docs, backend)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(backend=backend, B=batch, loss=loss, ms=seconds * 1e3, extra_mb=peak - base,
                inputs_mb=(q.numel() + docs.numel()) * 4 / 2**20)


def _run_cpu(runs) -> list:
    rows = []
    for backend, batch in runs:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.contrastive", "--worker", backend, str(batch)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append(dict(backend=backend, B=batch, note=f"failed: {proc.stderr.strip()[-200:]}"))
            continue
        rows.append(progress(json.loads(proc.stdout.strip().splitlines()[-1])))
    return rows


def _run_gpu(sizes) -> list:
    import kalm_fast.ops  # noqa: F401  (registers the backends)
    from kalm_fast._registry import runnable

    backends = runnable("focal_infonce", "cuda", torch.bfloat16)
    names = [b for b in GPU_BACKENDS if b == "matmul+ce" or b.split()[0] in backends]
    rows = []
    # the cuda backend, not yet verified on hardware, after every other row: a fault there spoils the CUDA context
    runs = [(batch, name) for last in (False, True) for batch in sizes for name in names
            if (name.split()[0] == "cuda") == last]
    for batch, backend in runs:
        torch.cuda.empty_cache()
        row = dict(backend=backend, B=batch)
        try:
            q, docs = _inputs(batch, torch.bfloat16, "cuda")
            _step(q, docs, backend)  # compiles and autotunes: that scratch memory is not the loss's
            q.grad = docs.grad = None
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            row["loss"] = _step(q, docs, backend)
            row["extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["ms"] = time_fn(lambda: _step(q, docs, backend), warmup=1, repeats=3)["median_ms"]
            row["inputs_mb"] = (q.numel() + docs.numel()) * 2 / 2**20
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as exc:  # noqa: BLE001  (one failing implementation must not lose the other rows)
            row["note"] = failed_note(exc)
        q = docs = None
        rows.append(progress(row))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu or cpu")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_cpu_worker(args.worker[0], int(args.worker[1]))))
        return 0
    preset = PRESETS[args.preset or ("gpu" if on_gpu() else "cpu")]
    rows = _run_gpu(preset) if on_gpu() else _run_cpu(preset)
    measured = [r for r in rows if "extra_mb" in r]
    oracle = {r["B"]: r for r in measured if r["backend"] == "reference"}
    baseline = {**oracle, **{r["B"]: r for r in measured if r["backend"] == "matmul+ce"}}
    for r in measured:
        r["x_inputs"] = r["extra_mb"] / r["inputs_mb"]
        if r["B"] in baseline:  # matmul+ce where it ran at this B (the GPU runs), else the oracle: named per row
            r["baseline"] = baseline[r["B"]]["backend"]
            r["x_reference_mem"] = r["extra_mb"] / baseline[r["B"]]["extra_mb"]
            r["x_reference_speed"] = baseline[r["B"]]["ms"] / r["ms"]
        if r["B"] in oracle and r["backend"] != "matmul+ce":
            r["loss_diff"] = abs(r["loss"] - oracle[r["B"]]["loss"])
    write_report("contrastive", rows,
                 columns=["backend", "B", "ms", "extra_mb", "inputs_mb", "x_inputs", "baseline", "x_reference_mem",
                          "x_reference_speed", "loss", "loss_diff", "note"],
                 plot=dict(x="B", y="extra_mb", series="backend", logx=True,
                           title="focal-InfoNCE fwd+bwd peak extra memory, M=7, D=896"),
                 meta=dict(M=M, D=D, dtype="bfloat16" if on_gpu() else "float32", temperature=TEMPERATURE, gamma=0.5,
                           baseline="matmul+ce" if on_gpu() else "reference"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
