"""Shared benchmark plumbing: timing (CUDA events on GPU, wall clock on CPU), device facts, reports.

``write_report`` prints a markdown table and saves ``benchmarks/results/<name>-<device>.{json,md,png}``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch

from kalm_fast._registry import kernel_settings

RESULTS = Path(__file__).resolve().parent / "results"

# Nominal peak memory bandwidth (GB/s) by device name, for "% of bandwidth" columns.
NOMINAL_BANDWIDTH_GBS = {
    "H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
    "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0,
    "L4": 300.0, "A10": 600.0, "RTX 4090": 1008.0,
}


def on_gpu() -> bool:
    return torch.cuda.is_available()


# Before each timed GPU run: L2 is flushed (no run reads what the last one left in cache), then the GPU sleeps this
# many cycles (a few ms) while the host queues the run behind the sleep, so that the host's launch overhead (Python,
# argument checks, launches) is not counted as GPU time, for kalm_fast and its baselines alike.
L2_FLUSH_BYTES = 256 * 2**20
SLEEP_CYCLES = 10_000_000
_L2_FLUSH: dict = {}  # device index -> the flush buffer


def l2_flush_buffer() -> torch.Tensor:
    """The buffer ``time_fn`` zeroes before each timed GPU run, on the current device, allocated once (a peak memory
    measured from after its first call does not count it)."""
    device = torch.cuda.current_device()
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return _L2_FLUSH[device]


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10) -> dict:
    """Median/min milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs: device time between CUDA
    events on a GPU (see ``SLEEP_CYCLES``), wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if on_gpu():
        flush = l2_flush_buffer()
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush.zero_()
            torch.cuda._sleep(SLEEP_CYCLES)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def print_profile(label: str, fn: Callable[[], object], device, top: int = 20) -> None:
    """Print the ``top`` ops by time (device time on a GPU) of one call of ``fn`` under torch.profiler: where the
    time goes, for the next optimization."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.device(device).type == "cuda"
    sort = "self_device_time_total" if gpu else "self_cpu_time_total"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        fn()
        if gpu:
            torch.cuda.synchronize(device)
    print(f"== profile of {label}: the {top} ops with the most {sort}", flush=True)
    print(prof.key_averages().table(sort_by=sort, row_limit=top), flush=True)


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nominal_bandwidth_gbs(name: str) -> Optional[float]:
    for key, value in NOMINAL_BANDWIDTH_GBS.items():
        if key.lower() in name.lower():
            return value
    return None


def device_info() -> dict:
    """What the numbers were measured on: device, versions, threads, date, and the kernel settings in effect
    (``KALM_*``, README's settings table; rows that time a variant name its setting themselves)."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
        "python": platform.python_version(), "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(),
        "settings": kernel_settings(),
    }
    if on_gpu():
        name = torch.cuda.get_device_name()
        info.update(device=name, cuda=torch.version.cuda, capability=list(torch.cuda.get_device_capability()),
                    bandwidth_gbs=nominal_bandwidth_gbs(name))
    else:
        info.update(device=f"CPU: {info['cpu']}", bandwidth_gbs=None)
    return info


def device_tag() -> str:
    if not on_gpu():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def failed_note(exc: BaseException, prefix: str = "failed") -> str:
    """The ``note`` of a row whose measurement raised ``exc`` (a row of its own: the report shows the failure)."""
    return f"{prefix}: {type(exc).__name__}: {exc}"[:300]


def progress(row: dict) -> dict:
    """Print a measured row at once (a run cut short still shows what it measured) and return it."""
    print("row", json.dumps(row, default=str), flush=True)
    return row


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def results_dir() -> Path:
    """Where reports go: ``KALM_BENCH_OUT`` if set, else ``benchmarks/results/``."""
    return Path(os.environ.get("KALM_BENCH_OUT", RESULTS))


def write_report(name: str, rows: list[dict], *, columns: list[str], plot: Optional[dict] = None,
                 meta: Optional[dict] = None, out_dir: Optional[Path] = None) -> Path:
    """Print the table; save JSON (device info + rows), markdown and, with ``plot``, a PNG. Returns the JSON path."""
    out_dir = Path(out_dir or results_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {**device_info(), **(meta or {})}
    table = markdown_table(rows, columns)
    settings = "".join(f", {k}={v}" for k, v in info["settings"].items())
    header = (f"### {name} on {info['device']} ({info['date']}, torch {info['torch']}, triton {info['triton']}"
              f"{settings})")
    print(header + "\n\n" + table + "\n", flush=True)
    stem = out_dir / f"{name}-{device_tag()}"
    stem.with_suffix(".json").write_text(json.dumps({"name": name, "meta": info, "rows": rows}, indent=1, default=str))
    stem.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    if plot:
        _plot(rows, plot, stem.with_suffix(".png"), title=plot.get("title", f"{name} ({info['device']})"))
    return stem.with_suffix(".json")


def _plot(rows: list[dict], spec: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the tables and JSON are written already; the plot is a convenience
        print(f"matplotlib is not installed: no {path.name}", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, series = spec["x"], spec["y"], spec.get("series")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict = {}
    for r in rows:
        if r.get(y) is not None and r.get(x) is not None:
            groups.setdefault(r.get(series) if series else y, []).append((r[x], r[y]))
    for label, points in groups.items():
        xs, ys = zip(*points)
        if all(isinstance(v, (int, float)) for v in xs):
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            xs, ys = [xs[i] for i in order], [ys[i] for i in order]
        ax.plot([str(v) for v in xs] if not all(isinstance(v, (int, float)) for v in xs) else xs, ys, marker="o",
                label=str(label))
    if spec.get("logx") and all(isinstance(r.get(x), (int, float)) for r in rows):
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
