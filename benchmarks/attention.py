"""Attention throughput: our backends vs scaled_dot_product_attention (and flash-attn when installed).

1. Kernel TFLOP/s, forward / backward / forward+backward, equal-length sequences (B * L = 16k tokens),
   head dims 64 and 128, bf16 on GPU. FLOPs: 4 * L^2 * D * H per sequence forward (half when causal),
   2.5x that backward.
2. A realistic embedding batch: 64k tokens (8k on CPU) packed from a long-tailed length mix (most texts 20-60
   tokens, some 512), Qwen2-0.5B heads (14 query / 2 key-value, D = 64): packed vs padded SDPA, tokens/s; on a GPU
   also torch's ``varlen_attn`` (FlashAttention-2's varlen kernel, torch 2.9+) and flash-attn's when installed.

    python -m benchmarks.attention                       # full sweep on GPU, small one on CPU
    python -m benchmarks.attention --preset quick        # a couple of shapes
    python -m benchmarks.attention --preset gpu-check    # the Hopper targets: D=128, L 2k-16k, + fp32 and KaLM shape
    python -m benchmarks.attention --preset variants     # the triton backend's variants on a GPU (below)
    python -m benchmarks.attention --preset window --window 1024   # local attention, |i - j| < 1024 (Gemma 3)

``--window W`` times the kernel sweep with a local band, ``window=(W - 1, W - 1)`` (Gemma 3's bidirectional local
layers), against SDPA with the band as a boolean mask (and flash-attn's ``window_size``); FLOPs count the visible
pairs only. The packed long-tailed batch is then left out (its texts are shorter than any local window).

The ``variants`` preset (bf16 on a GPU; reports ``attention_variants-*`` and ``attention_packed_variants-*``) adds
the triton backend under each of its environment settings: ``triton tma`` (``KALM_ATTENTION_TMA=1``: the forward
and dQ kernels load K/V tiles through tensor descriptors, sm_90+) and ``triton atomic-dQ``
(``KALM_ATTENTION_DQ=atomic``: the backward adds dQ atomically in the dK/dV kernel, 5 GEMMs per tile pair instead
of 7).

Packed inputs come with a ``Varlen`` (checked once), so our timings hold no argument validation.
"""
from __future__ import annotations

import argparse
import functools
import os
from unittest import mock

import torch
import torch.nn.functional as F

from kalm_fast import _registry
from kalm_fast.ops import Varlen
from kalm_fast.ops.attention import flash_attention

from .harness import failed_note, progress, time_fn, write_report

try:  # optional peer: FlashAttention-2's varlen kernel
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None
try:  # optional peer: torch's own varlen attention (FlashAttention-2's kernel inside torch, 2.9+)
    from torch.nn.attention.varlen import varlen_attn
except Exception:  # noqa: BLE001
    varlen_attn = None


def _ours(backend):
    def run(q, k, v, varlen, max_len, causal, window):
        return flash_attention(q, k, v, cu_seqlens=varlen, causal=causal, window=window, backend=backend)
    return run


# Variants of our backends, each an environment that their backward reads (the autograd pass runs outside ``fn``).
VARIANT_ENV = {"triton tma": {"KALM_ATTENTION_TMA": "1"}, "triton atomic-dQ": {"KALM_ATTENTION_DQ": "atomic"}}


def _variant(name):
    """The environment of implementation ``name`` for the duration of a ``with`` (restored afterwards)."""
    return mock.patch.dict(os.environ, VARIANT_ENV.get(name, {}))


@functools.lru_cache(maxsize=4)
def _band(length, left, right, device):
    """The bool mask [L, L] of a local window (key j visible from query i when i - left <= j <= i + right)."""
    offset = torch.arange(length, device=device)[None, :] - torch.arange(length, device=device)[:, None]
    return (offset >= -left) & (offset <= right)


def _sdpa_equal(q, k, v, varlen, max_len, causal, window):
    """Equal-length packed [B*L, H, D] viewed as [B, H, L, D] (the transposes are part of the cost); a window as a
    bool mask (built once per shape, outside the timing's first call)."""
    B = varlen.num_seqs
    to = lambda x: x.view(B, max_len, x.shape[1], x.shape[2]).transpose(1, 2)  # noqa: E731
    mask = None if window is None else _band(max_len, window[0], 0 if causal else window[1], q.device)
    out = F.scaled_dot_product_attention(to(q), to(k), to(v), attn_mask=mask, is_causal=causal and mask is None,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).reshape(q.shape)


def _flash_attn(q, k, v, varlen, max_len, causal, window):
    return flash_attn_varlen_func(q, k, v, varlen.cu_seqlens, varlen.cu_seqlens, max_len, max_len, causal=causal,
                                  window_size=(-1, -1) if window is None else window)


def _visible_pairs(length, causal, window) -> int:
    """(query, key) pairs a sequence of ``length`` attends over."""
    if window is None:
        return length * length // 2 if causal else length * length
    i = torch.arange(length, dtype=torch.int64)
    right = 0 if causal else window[1]
    return int(((i + right).clamp(max=length - 1) - (i - window[0]).clamp(min=0) + 1).sum())


def _impls(device, dtype, max_len, with_reference=True, variants=False):
    impls = {}
    runnable = _registry.runnable("flash_attention", device, dtype)
    for name in ("triton", "torch", "reference"):
        if name not in runnable:
            continue
        if name == "triton" and device == "cpu" and not _registry.triton_interpreting():
            continue  # on CPU only in the interpreter (plumbing checks), never for timings
        if name == "torch" and device == "cuda":
            continue  # on GPU the torch backend is SDPA itself
        if name == "reference" and (max_len > 2048 or not with_reference):
            continue  # materializes [H, L, L] per sequence
        impls[name] = _ours(name)
        if name == "triton" and variants and dtype != torch.float32:
            impls.update((variant, _ours(name)) for variant in VARIANT_ENV)
    impls["sdpa"] = _sdpa_equal
    if flash_attn_varlen_func is not None and device == "cuda" and dtype != torch.float32:
        impls["flash_attn2"] = _flash_attn
    return impls


def _timed(fn, q, k, v, cu, max_len, causal, window, repeats):
    """(forward ms, forward+backward ms)."""
    grad = torch.randn_like(q)
    fwd = time_fn(lambda: fn(q, k, v, cu, max_len, causal, window), repeats=repeats)["median_ms"]

    def step():
        out = fn(q, k, v, cu, max_len, causal, window)
        torch.autograd.grad(out, (q, k, v), grad)

    return fwd, time_fn(step, repeats=repeats)["median_ms"]


def kernel_sweep(device, dtype, seqlens, head_dims, causal, tokens, repeats, with_reference=True, variants=False,
                 window=None):
    rows = []
    for d in head_dims:
        heads = 2048 // d
        for L in seqlens:
            B = max(1, tokens // L)
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(B * L, heads, d, device=device, dtype=dtype, generator=g).requires_grad_()
                       for _ in range(3))
            varlen = Varlen.from_lengths([L] * B, device)
            flops = 4 * _visible_pairs(L, causal, window) * d * heads * B
            dt = str(dtype).split(".")[-1]
            shape = {"seqlen": L, "batch": B, "heads": heads, "head_dim": d, "causal": causal, "window": window,
                     "dtype": dt}
            for name, fn in _impls(device, dtype, L, with_reference, variants).items():
                try:
                    with _variant(name):
                        fwd, both = _timed(fn, q, k, v, varlen, L, causal, window, repeats)
                except Exception as exc:  # noqa: BLE001  (e.g. the reference out of memory, a compile error)
                    # a row of its own: a failing kernel shows in the report, not only as a missing row
                    rows.append(progress({"impl": name, "mode": "fwd+bwd", **shape,
                                          "note": failed_note(exc)}))
                    continue
                bwd = max(both - fwd, 1e-6)
                for mode, ms, f in (("fwd", fwd, flops), ("bwd", bwd, 2.5 * flops), ("fwd+bwd", both, 3.5 * flops)):
                    rows.append(progress({"impl": name, "mode": mode, **shape, "ms": ms,
                                          "TFLOP/s": f / (ms * 1e-3) / 1e12, "series": f"{name} {mode} D={d} {dt}"}))
    return rows


def _long_tail_lengths(total, generator):
    """Lengths summing to ``total``: 85% of texts 20-60 tokens, 10% 60-200, 5% at the 512 cap."""
    lengths = []
    while sum(lengths) < total:
        u = float(torch.rand((), generator=generator))
        hi_lo = (20, 60) if u < 0.85 else (60, 200) if u < 0.95 else (512, 512)
        lengths.append(int(torch.randint(hi_lo[0], hi_lo[1] + 1, (), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def realistic_batch(device, dtype, total, repeats, variants=False):
    """Packed (ours, flash-attn) vs padded SDPA with a key mask on one long-tailed batch; tokens/s. The baseline,
    ``padded sdpa`` (``enable_gqa``), may fall back to SDPA's math kernel on a GPU (a mask and GQA together);
    ``padded sdpa (K/V repeated)`` is what transformers' SDPA attention runs instead (K/V heads repeated)."""
    g = torch.Generator().manual_seed(0)
    lengths = _long_tail_lengths(total, g)
    hq, hkv, d = 14, 2, 64
    T, B, L = sum(lengths), len(lengths), max(lengths)
    q = torch.randn(T, hq, d, generator=g).to(device, dtype)
    k, v = (torch.randn(T, hkv, d, generator=g).to(device, dtype) for _ in range(2))
    varlen = Varlen.from_lengths(lengths, device)
    mask = torch.arange(L, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    index = torch.nonzero(mask.flatten()).flatten()

    def padded(x):
        out = x.new_zeros(B * L, *x.shape[1:])
        out[index] = x
        return out.view(B, L, *x.shape[1:]).transpose(1, 2)

    qp, kp, vp = padded(q), padded(k), padded(v)
    attn_mask = mask[:, None, None, :]
    kr, vr = (x.repeat_interleave(hq // hkv, dim=1) for x in (kp, vp))
    cases = {"padded sdpa": lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=attn_mask, enable_gqa=True),
             "padded sdpa (K/V repeated)": lambda: F.scaled_dot_product_attention(qp, kr, vr, attn_mask=attn_mask)}
    kernels = {"padded sdpa": sdpa_kernel(qp, kp, vp, attn_mask=attn_mask, enable_gqa=True),
               "padded sdpa (K/V repeated)": sdpa_kernel(qp, kr, vr, attn_mask=attn_mask)}
    runnable = _registry.runnable("flash_attention", device, dtype)
    for name in ("triton", "torch"):
        if name not in runnable or (name == "triton" and device == "cpu"):
            continue
        cases[f"packed {name}"] = functools.partial(flash_attention, q, k, v, cu_seqlens=varlen, backend=name)
        if name == "triton" and variants and dtype != torch.float32:
            cases["packed triton tma"] = cases["packed triton"]  # forward only: the atomic-dQ variant is the same
    if flash_attn_varlen_func is not None and device == "cuda" and dtype != torch.float32:
        cu = varlen.cu_seqlens
        cases["packed flash_attn2"] = lambda: flash_attn_varlen_func(q, k, v, cu, cu, L, L)
    if varlen_attn is not None and device == "cuda" and dtype != torch.float32:
        cases.update(_torch_varlen_case(q, k, v, varlen.cu_seqlens, L))
    rows, base, best = [], None, None
    for name, fn in cases.items():
        row = {"impl": name, "sequences": B, "tokens": T, "padded tokens": B * L, "sdpa kernel": kernels.get(name)}
        try:
            with torch.no_grad(), _variant(name.removeprefix("packed ")):
                ms = time_fn(fn, repeats=repeats)["median_ms"]
        except Exception as exc:  # noqa: BLE001  (a failing peer must not lose the other rows)
            rows.append(progress(dict(row, note=failed_note(exc))))
            continue
        base = ms if name == "padded sdpa" else base
        best = min(ms, best or ms) if name.startswith("padded sdpa") else best
        rows.append(progress(dict(row, ms=ms, **{"tokens/s": T / (ms * 1e-3),
                                                 "x padded sdpa": None if base is None else base / ms,
                                                 "x best padded sdpa": None if best is None else best / ms})))
    return rows


def sdpa_kernel(*args, **kwargs):
    """The name of the kernel ``F.scaled_dot_product_attention`` picks for these arguments (e.g. ``MATH`` where no
    fused kernel takes a mask with ``enable_gqa``: the padded baselines' ratios mean different things then), or None
    where this torch lacks its (private) chooser."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(*args, **kwargs)).name
    except Exception:  # noqa: BLE001  (a private API: the rows do without the name)
        return None


def _torch_varlen_case(q, k, v, cu, max_len) -> dict:
    """``torch.nn.attention.varlen.varlen_attn`` on the packed batch: with ``enable_gqa`` where this torch has it,
    else on K/V heads repeated for every query head (before the timing)."""
    import inspect

    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        return {"packed torch varlen_attn": lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len, enable_gqa=True)}
    group = q.shape[1] // k.shape[1]
    kr, vr = (x.repeat_interleave(group, dim=1) for x in (k, v))
    return {"packed torch varlen_attn (K/V repeated)": lambda: varlen_attn(q, kr, vr, cu, cu, max_len, max_len)}


# Kernel sweeps per preset: (dtype, seqlens, head dims, tokens per shape); then the packed long-tailed batch.
PRESETS = {
    "gpu": dict(sweeps=[("bfloat16", [128, 256, 512, 1024, 2048, 4096, 8192], [64, 128], 16384)], total=65536,
                repeats=10, reference=True),
    "cpu": dict(sweeps=[("float32", [128, 256, 512, 1024], [64], 4096)], total=8192, repeats=3, reference=True),
    "quick": dict(sweeps=[(None, [128, 512], [64], 2048)], total=4096, repeats=3, reference=True),
    # the Hopper speed targets (bf16, D=128, L 2k-16k), fp32 against SDPA (which `auto` should route fp32 to), and the
    # KaLM shape (packed long tail, Qwen2-0.5B heads)
    "gpu-check": dict(sweeps=[("bfloat16", [2048, 4096, 8192, 16384], [128], 32768),
                              ("float32", [512, 2048], [64, 128], 8192)], total=65536, repeats=10, reference=False),
    # the triton variants (see the module docstring) on the Hopper target shapes and the KaLM shape
    "variants": dict(sweeps=[("bfloat16", [4096, 16384], [64, 128], 32768)], total=65536, repeats=10, reference=False,
                     variants=True),
    # local attention (with --window): the Hopper target lengths at head dims 128 and 256 (Gemma 3's)
    "window": dict(sweeps=[("bfloat16", [4096, 16384], [128, 256], 32768)], total=65536, repeats=10,
                   reference=False),
    "dry": dict(sweeps=[("float32", [64], [128], 64)], total=512, repeats=1, reference=True),  # plumbing only
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu or cpu")
    parser.add_argument("--causal", action="store_true", help="causal kernel sweep (default bidirectional)")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="local attention, |i - j| < W (window=(W - 1, W - 1)); leaves the packed batch out")
    args = parser.parse_args(argv)
    if args.window is not None and args.window < 1:
        parser.error(f"--window must be a positive int, got {args.window}")
    window = None if args.window is None else (args.window - 1, args.window - 1)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    preset = PRESETS[args.preset or ("gpu" if gpu else "cpu")]
    variants = preset.get("variants", False)
    suffix = "_variants" if variants else "_window" if window else ""
    if window is None:  # the packed KaLM batch first (the shortest part, a target of its own), then the kernel sweeps
        rows = realistic_batch(device, torch.bfloat16 if gpu else torch.float32, preset["total"], preset["repeats"],
                               variants)
        write_report(f"attention_packed{suffix}", rows,
                     columns=["impl", "sequences", "tokens", "padded tokens", "sdpa kernel", "ms", "tokens/s",
                              "x padded sdpa", "x best padded sdpa", "note"],
                     meta=dict(lengths="85% 20-60, 10% 60-200, 5% 512; Hq=14 Hkv=2 D=64"))
    rows = []
    for dtype, seqlens, dims, tokens in preset["sweeps"]:
        dtype = getattr(torch, dtype or ("bfloat16" if gpu else "float32"))
        rows += kernel_sweep(device, dtype, seqlens, dims, args.causal, tokens, preset["repeats"], preset["reference"],
                             preset.get("variants", False), window)
    title = f"attention {'causal' if args.causal else 'bidirectional'}" + (f", |i - j| < {args.window}" if window
                                                                           else "")
    write_report(f"attention{suffix}", rows,
                 columns=["impl", "mode", "seqlen", "batch", "heads", "head_dim", "causal", "window", "dtype", "ms",
                          "TFLOP/s", "note"],
                 plot=dict(x="seqlen", y="TFLOP/s", series="series", logx=True, title=title))


if __name__ == "__main__":
    main()
