"""Mean pooling throughput per backend: ms, GB/s, the share of a device copy's bandwidth measured in the same run,
speedup over the reference.

    python -m benchmarks.mean_pool                      # shapes that fit the device
    python -m benchmarks.mean_pool --preset quick       # one small shape
    python -m benchmarks.mean_pool --preset gpu-check   # [64, 4096, 2048] bf16, few long rows, the packed encode shapes

Bytes counted: the real (unpadded) rows of the hidden states read once (a padded row need not be read: the
``cuda`` and ``triton`` kernels skip it), the mask (padded) or cu_seqlens (packed) and the output written. The
padded shapes' lengths are uniform in 1..L, so about half their rows are padding. The baseline "copy" row is
``torch.Tensor.copy_`` of the hidden states into a preallocated buffer: bytes read plus written over its time, the
bandwidth the device actually sustains.
"""
from __future__ import annotations

import argparse

import torch

from kalm_fast import _registry
from kalm_fast.ops import Varlen, mean_pool

from .harness import device_info, failed_note, progress, time_fn, write_report

# Padded (B, L, H) shapes, or ("packed", T, H): a long-tailed packed encode batch of T tokens, hidden size H.
PRESETS = {
    "gpu": [(64, 512, 1024), (256, 512, 896), (32, 2048, 1024), (1024, 128, 896), ("packed", 65536, 896)],
    "cpu": [(64, 512, 384), (64, 512, 1024)],
    "quick": [(8, 128, 384)],
    "gpu-check": [(64, 4096, 2048), (4, 8192, 896), ("packed", 65536, 896), ("packed", 262144, 896)],
    "dry": [(2, 16, 32), ("packed", 64, 32)],
}


def _inputs(shape, dtype, device, g):
    """``(hidden, kwargs for mean_pool, bytes moved)`` of a padded shape or a packed long-tailed batch."""
    if shape[0] == "packed":
        _, total, H = shape
        lengths = []
        while sum(lengths) < total:  # 85% of texts 20-60 tokens, 10% 60-200, 5% 512 (as benchmarks.attention)
            u = float(torch.rand((), generator=g, device=device))
            lo, hi = (20, 60) if u < 0.85 else (60, 200) if u < 0.95 else (512, 512)
            lengths.append(int(torch.randint(lo, hi + 1, (), generator=g, device=device)))
        lengths[-1] -= sum(lengths) - total
        hidden = torch.randn(total, H, device=device, dtype=dtype, generator=g)
        varlen = Varlen.from_lengths(lengths, device)
        size = hidden.element_size()
        return hidden, dict(cu_seqlens=varlen), hidden.numel() * size + 4 * (len(lengths) + 1) + len(lengths) * H * size
    B, L, H = shape
    hidden = torch.randn(B, L, H, device=device, dtype=dtype, generator=g)
    lengths = torch.randint(1, L + 1, (B,), device=device, generator=g)
    mask = torch.arange(L, device=device)[None] < lengths[:, None]
    return hidden, dict(attention_mask=mask), (int(lengths.sum()) + B) * H * hidden.element_size() + mask.numel()


def run(shapes, dtype: torch.dtype, backends, repeats: int) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = device_info().get("bandwidth_gbs")
    runnable = _registry.runnable("mean_pool", device, dtype)
    rows, copy_gbs, ref_ms = [], {}, {}
    # the cuda backend, not yet verified on hardware, after every other row: a fault there spoils the CUDA context
    for phase in ([b for b in backends if b != "cuda"], [b for b in backends if b == "cuda"]):
        for shape in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            hidden, kwargs, nbytes = _inputs(shape, dtype, device, g)
            tokens = hidden.shape[0] * (hidden.shape[1] if hidden.dim() == 3 else 1)
            name = f"{shape[1]} packed x{shape[2]}" if shape[0] == "packed" else "x".join(map(str, shape))
            if name not in copy_gbs:
                copy_to = torch.empty_like(hidden)
                copy_ms = time_fn(lambda: copy_to.copy_(hidden), repeats=repeats)["median_ms"]
                copy_gbs[name] = 2 * hidden.numel() * hidden.element_size() / (copy_ms * 1e-3) / 1e9
                copy_to = None
                rows.append(progress({"shape": name, "tokens": tokens, "backend": "copy", "series": "copy",
                                      "dtype": str(dtype).split(".")[-1], "ms": copy_ms, "GB/s": copy_gbs[name],
                                      "% of copy": 100.0,
                                      "% nominal": (100 * copy_gbs[name] / bandwidth) if bandwidth else None}))
            for normalize in (False, True):  # the encoders pool with normalize=True
                for backend in phase:
                    if backend not in runnable or (backend == "reference" and shape[0] == "packed"
                                                   and device == "cuda"):
                        continue  # the reference loops over the sequences of a packed batch in Python
                    row = {"shape": name, "tokens": tokens, "backend": backend, "normalize": normalize}
                    try:
                        ms = time_fn(lambda: mean_pool(hidden, **kwargs, normalize=normalize, backend=backend),
                                     repeats=repeats)["median_ms"]
                    except Exception as exc:  # noqa: BLE001  (one failing backend must not lose the other rows)
                        rows.append(progress(dict(row, note=failed_note(exc))))
                        continue
                    if backend == "reference":
                        ref_ms[name, normalize] = ms
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    reference = ref_ms.get((name, normalize))
                    rows.append(progress({**row, "series": backend + (" normalize" if normalize else ""),
                                          "dtype": str(dtype).split(".")[-1], "ms": ms, "GB/s": gbs,
                                          "% of copy": 100 * gbs / copy_gbs[name],
                                          "% nominal": (100 * gbs / bandwidth) if bandwidth else None,
                                          "x reference": (reference / ms) if reference else None}))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu or cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    preset = args.preset or ("gpu" if gpu else "cpu")
    repeats = 3 if preset in ("quick", "dry") else 20
    rows = run(PRESETS[preset], dtype, ["reference", "torch", "triton", "cuda"], repeats=repeats)
    write_report("mean_pool", rows, columns=["shape", "backend", "normalize", "dtype", "ms", "GB/s", "% of copy",
                                             "% nominal", "x reference", "note"],
                 plot=dict(x="shape", y="GB/s", series="series", title="mean_pool forward"))


if __name__ == "__main__":
    main()
