"""Mean pooling throughput per backend: ms, GB/s, % of memory bandwidth (GPU), speedup over the reference.

    python -m benchmarks.mean_pool            # shapes that fit the device
    python -m benchmarks.mean_pool --quick    # one small shape
"""
from __future__ import annotations

import argparse

import torch

from kalm_fast import _registry
from kalm_fast.ops import mean_pool

from .harness import device_info, time_fn, write_report

GPU_SHAPES = [(64, 512, 1024), (256, 512, 896), (32, 2048, 1024), (1024, 128, 896)]
CPU_SHAPES = [(64, 512, 384), (64, 512, 1024)]


def run(shapes, dtype: torch.dtype, backends, repeats: int) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = device_info().get("bandwidth_gbs")
    rows = []
    for B, L, H in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(B, L, H, device=device, dtype=dtype, generator=g)
        lengths = torch.randint(1, L + 1, (B,), device=device, generator=g)
        mask = torch.arange(L, device=device)[None] < lengths[:, None]
        nbytes = hidden.numel() * hidden.element_size() + mask.numel() + B * H * hidden.element_size()
        ref_ms = None
        for name in backends:
            backend = _registry.backends("mean_pool").get(name)
            if backend is None or backend.why_not(torch.device(device), dtype) is not None:
                continue
            t = time_fn(lambda: mean_pool(hidden, mask, backend=name), repeats=repeats)
            ms = t["median_ms"]
            ref_ms = ms if name == "reference" else ref_ms
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append({"shape": f"{B}x{L}x{H}", "tokens": B * L, "backend": name, "dtype": str(dtype).split(".")[-1],
                         "ms": ms, "GB/s": gbs, "% bandwidth": (100 * gbs / bandwidth) if bandwidth else None,
                         "x reference": (ref_ms / ms) if ref_ms else None})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    shapes = [(8, 128, 384)] if args.quick else (GPU_SHAPES if gpu else CPU_SHAPES)
    rows = run(shapes, dtype, ["reference", "torch", "triton", "cuda"], repeats=3 if args.quick else 20)
    write_report("mean_pool", rows, columns=["shape", "backend", "dtype", "ms", "GB/s", "% bandwidth", "x reference"],
                 plot=dict(x="shape", y="GB/s", series="backend", title="mean_pool forward"))


if __name__ == "__main__":
    main()
