"""What ``compile_triton_kernels.py`` compiles ahead of time: every Triton kernel of kalm_fast at the configurations a
GPU runs, as ``triton.compile`` specs (``name``, ``module``, ``fn``, ``signature``, ``constexprs``, ``attrs``,
``num_warps``, ``num_stages``, ``archs``; ``wgmma_expected`` where Hopper's tensor-core instruction must appear).

Attention: every entry of its config table (``ops/attention/_triton.py``) for its arch, for fp16/bf16 and fp32, at
head dims 64, 80, 128 and 256, with the kernels' variants (TMA loads in fwd and dq, atomic dQ, the band of causal
attention and local windows, and soft-capped scores at Gemma 2's head dims 128 and 256, TMA and atomic dQ
included). Mean pooling, focal-InfoNCE and the decoders' SiLU-multiply, RoPE and residual-add RMSNorm (forward and
backward): their fixed configurations per dtype.
"""
from __future__ import annotations

import itertools

import torch
import triton

from kalm_fast.models import decoder_kernels
from kalm_fast.ops.attention import _triton as attention
from kalm_fast.ops.focal_infonce import _triton as focal
from kalm_fast.ops.mean_pool import _triton as mean_pool

ARCHS = {80: "sm80", 90: "sm90"}


def _aligned(fn, signature, also=()):
    """ASTSource attrs marking pointers, strides and the ints named in ``also`` 16-divisible, as the JIT specializes
    real launches (contiguous tensors with D % 8 == 0 and torch's aligned allocations); without them the loads are
    not vectorized/pipelined."""
    return {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
            if t.startswith("*") or a.startswith("stride") or a in also}


def _strides(*names):
    return {f"stride_{n}": "i32" for n in names}


def attention_specs() -> list:
    specs = []
    for dtype, d in (("bf16", 64), ("fp16", 80), ("bf16", 128), ("fp16", 256), ("fp32", 64), ("fp32", 80),
                     ("fp32", 128), ("fp32", 256)):
        width, ptr = ("fp32" if dtype == "fp32" else "half"), f"*{dtype}"
        block_d = triton.next_power_of_2(d)
        const = dict(GROUP=7, HEAD_DIM=d, BLOCK_D=block_d, BANDED=False, SOFTCAP=False,
                     PRECISION="ieee" if dtype == "fp32" else "tf32")
        fwd = dict({a: ptr for a in "QKVO"}, LSE="*fp32", WORK="*i32", CU_SEQLENS="*i32", qk_scale="fp32",
                   cap_scale="fp32", window_left="i32", window_right="i32", seqlen_bucket="i32",
                   **_strides("qt", "qh", "kt", "kh", "vt", "vh", "ot", "oh", "lh"))
        bwd = dict({a: ptr for a in ("Q", "K", "V", "DO")}, LSE="*fp32", DELTA="*fp32")
        dkdv = dict(bwd, DK=ptr, DV=ptr, DQ_ACC="*fp32", WORK="*i32", CU_SEQLENS="*i32", qk_scale="fp32",
                    cap_scale="fp32", sm_scale="fp32", window_left="i32", window_right="i32", seqlen_bucket="i32",
                    **_strides("qt", "qh", "kt", "kh", "vt", "vh", "dot", "doh", "lh", "dkt", "dkh", "dvt", "dvh",
                               "dqt", "dqh"))
        dq = dict(bwd, DQ=ptr, WORK="*i32", CU_SEQLENS="*i32", qk_scale="fp32", cap_scale="fp32", sm_scale="fp32",
                  window_left="i32", window_right="i32", seqlen_bucket="i32",
                  **_strides("qt", "qh", "kt", "kh", "vt", "vh", "dot", "doh", "lh", "dqt", "dqh"))
        # the variants: fwd and dq with K/V through tensor descriptors (KALM_ATTENTION_TMA=1: sm_90, fp16/bf16), dQ
        # by its own kernel (the default) or added atomically by dkdv (KALM_ATTENTION_DQ=atomic); BANDED (causal or a
        # local window: Gemma 3's head dim 256 among them) in half precision; SOFTCAP (Gemma 2: head dims 256 and 128,
        # local and global layers) in half precision, with the TMA and atomic-dQ variants too
        banded = ARCHS if dtype != "fp32" else {}
        capped = ARCHS if dtype != "fp32" and d in (128, 256) else {}
        capped_tma = {90: "sm90"} if capped else {}
        for name, fn, sig, extra, archs in (
                ("fwd", attention._attn_fwd, fwd, {"USE_TMA": False, "SOFTCAP": True}, capped),
                ("fwd", attention._attn_fwd, fwd, {"USE_TMA": False, "SOFTCAP": True, "BANDED": True}, capped),
                ("dkdv", attention._attn_bwd_dkdv, dkdv, {"ATOMIC_DQ": False, "SOFTCAP": True}, capped),
                ("dkdv", attention._attn_bwd_dkdv, dkdv, {"ATOMIC_DQ": False, "SOFTCAP": True, "BANDED": True}, capped),
                ("dq", attention._attn_bwd_dq, dq, {"USE_TMA": False, "SOFTCAP": True}, capped),
                ("dq", attention._attn_bwd_dq, dq, {"USE_TMA": False, "SOFTCAP": True, "BANDED": True}, capped),
                ("fwd", attention._attn_fwd, fwd, {"USE_TMA": True, "SOFTCAP": True}, capped_tma),
                ("dkdv", attention._attn_bwd_dkdv, dkdv, {"ATOMIC_DQ": True, "SOFTCAP": True}, capped),
                ("dq", attention._attn_bwd_dq, dq, {"USE_TMA": True, "SOFTCAP": True}, capped_tma),
                ("fwd", attention._attn_fwd, fwd, {"USE_TMA": False}, ARCHS),
                ("fwd", attention._attn_fwd, fwd, {"USE_TMA": False, "BANDED": True}, banded),
                ("dkdv", attention._attn_bwd_dkdv, dkdv, {"ATOMIC_DQ": False, "BANDED": True}, banded),
                ("dq", attention._attn_bwd_dq, dq, {"USE_TMA": False, "BANDED": True}, banded),
                ("fwd", attention._attn_fwd, fwd, {"USE_TMA": True}, {90: "sm90"} if dtype != "fp32" else {}),
                ("dkdv", attention._attn_bwd_dkdv, dkdv, {"ATOMIC_DQ": False}, ARCHS),
                ("dkdv", attention._attn_bwd_dkdv, dkdv, {"ATOMIC_DQ": True}, ARCHS),
                ("dq", attention._attn_bwd_dq, dq, {"USE_TMA": False}, ARCHS),
                ("dq", attention._attn_bwd_dq, dq, {"USE_TMA": True}, {90: "sm90"} if dtype != "fp32" else {})):
            for arch, arch_class in archs.items():
                for bm, bn, warps, stages in attention.gpu_configs(name, arch_class, width, block_d,
                                                                   extra.get("ATOMIC_DQ", False),
                                                                   extra.get("BANDED", False),
                                                                   extra.get("SOFTCAP", False)):
                    constexprs = dict(const, **extra, BLOCK_M=bm, BLOCK_N=bn)
                    # the dots' M dimension: query rows (fwd, dq) or keys (dkdv); wgmma needs 64 of them
                    dot_m = bn if name == "dkdv" else bm
                    tag = f"{name}{'_atomic' if extra.get('ATOMIC_DQ') else ''}{'_tma' if extra.get('USE_TMA') else ''}"
                    tag += ("_banded" if extra.get("BANDED") else "") + ("_softcap" if extra.get("SOFTCAP") else "")
                    tag += f"_{dtype}_d{d}"
                    specs.append(dict(module="attention", name=f"attn_{tag}_{bm}x{bn}w{warps}s{stages}",
                                      fn=fn, archs=(arch,), constexprs=constexprs,
                                      signature=dict(sig, **{c: "constexpr" for c in constexprs}),
                                      attrs=_aligned(fn, sig), num_warps=warps, num_stages=stages,
                                      wgmma_expected=arch == 90 and dtype != "fp32" and dot_m >= 64))
        sig = dict(O=ptr, DO=ptr, DELTA="*fp32", T="i32", **_strides("ot", "oh", "dot", "doh", "dh"))
        constexprs = dict(HEAD_DIM=d, BLOCK_D=block_d,
                          BLOCK_T=attention.delta_block(torch.float32 if dtype == "fp32" else torch.bfloat16, block_d))
        specs.append(dict(module="attention", name=f"attn_bwd_delta_{dtype}_d{d}", fn=attention._bwd_delta,
                          signature=dict(sig, **{c: "constexpr" for c in constexprs}), constexprs=constexprs,
                          attrs=_aligned(attention._bwd_delta, sig), num_warps=4, num_stages=1))
    return specs


def mean_pool_specs() -> list:
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        for packed in (True, False):
            specs.append(dict(
                module="mean_pool", name=f"mean_pool_sum_{dtype}_{'packed' if packed else 'padded'}",
                fn=mean_pool._mean_pool_sum_kernel,
                signature={"hidden_ptr": f"*{dtype}", "mask_ptr": "*u8", "cu_ptr": "*i32", "part_ptr": "*fp32",
                           "weight_ptr": "*fp32", "L": "i32", "DIM": "i32", "rows_per_split": "i32",
                           "stride_hb": "i64", "stride_ht": "i64", "stride_mb": "i32",
                           "IS_PACKED": "constexpr", "HAS_MASK": "constexpr", "BLOCK_T": "constexpr",
                           "BLOCK_H": "constexpr"},
                constexprs={"IS_PACKED": packed, "HAS_MASK": not packed, "BLOCK_T": 32, "BLOCK_H": 128},
                num_warps=4, num_stages=2))
        for block_h, warps in ((1024, 4), (4096, 8)):
            specs.append(dict(
                module="mean_pool", name=f"mean_pool_finish_{dtype}_h{block_h}", fn=mean_pool._mean_pool_finish_kernel,
                signature={"part_ptr": "*fp32", "weight_ptr": "*fp32", "out_ptr": f"*{dtype}", "mean_ptr": "*fp32",
                           "count_ptr": "*fp32", "DIM": "i32", "SPLITS": "i32", "stride_ob": "i32", "eps": "fp32",
                           "NORMALIZE": "constexpr", "SAVE_MEAN": "constexpr", "BLOCK_H": "constexpr"},
                constexprs={"NORMALIZE": True, "SAVE_MEAN": True, "BLOCK_H": block_h}, num_warps=warps, num_stages=2))
        specs.append(dict(
            module="mean_pool", name=f"mean_pool_bwd_{dtype}", fn=mean_pool._mean_pool_bwd_kernel,
            signature={"grad_out_ptr": f"*{dtype}", "mean_ptr": "*fp32", "count_ptr": "*fp32", "mask_ptr": "*u8",
                       "cu_ptr": "*i32", "grad_hidden_ptr": f"*{dtype}", "L": "i32", "H": "i32", "DIM": "i32",
                       "stride_gb": "i32", "stride_mb": "i32", "stride_dhb": "i64", "stride_dht": "i64", "eps": "fp32",
                       "IS_PACKED": "constexpr", "HAS_MASK": "constexpr", "NORMALIZE": "constexpr",
                       "BLOCK_T": "constexpr", "BLOCK_H": "constexpr"},
            constexprs={"IS_PACKED": True, "HAS_MASK": False, "NORMALIZE": True, "BLOCK_T": 4, "BLOCK_H": 1024},
            num_warps=4, num_stages=2))
    for spec in specs:  # contiguous rows of 16-byte multiples, as the encode shapes launch them
        spec["attrs"] = _aligned(spec["fn"], spec["signature"])
    return specs


def focal_infonce_specs() -> list:
    """Every kernel at every GPU config of each arch for bf16 (with and without the margin; fp16 compiles alike) and
    fp32."""
    specs = []
    for dtype, has_margin in (("bf16", False), ("bf16", True), ("fp32", False)):
        ptr, width = f"*{dtype}", "fp32" if dtype == "fp32" else "half"
        common = dict(Q=ptr, C=ptr, RQ="*fp32", RC="*fp32", SPOS="*fp32")
        ints = dict(B="i32", N="i32", D="i32", group="i32", stride_q="i32", stride_c="i32")
        grads = dict(LSE="*fp32", GC="*fp32", GSCALE="*fp32")
        fused = {arch: [focal.FUSED_BWD_CONFIGS[width]] for arch in ARCHS}
        tuned = {kernel: {arch: focal.gpu_configs(kernel, width, arch // 10) for arch in ARCHS}
                 for kernel in ("fwd", "grad")}
        kernels = (("fwd", focal._fwd_kernel, dict(LSE="*fp32", NEG="*fp32"), dict(cols_per_split="i32"),
                    tuned["fwd"]),
                   ("bwd_grad", focal._bwd_grad_kernel, dict(LSE="*fp32", GC="*fp32", G=ptr),
                    dict(c_hi="i32", stride_g="i32", c_lo="i32"), tuned["grad"]),
                   ("bwd_dq", focal._bwd_dq_kernel, dict(grads, DQ="*fp32"),
                    dict(c_base="i32", c_end="i32", cols_per_split="i32"), fused),
                   ("bwd_dc", focal._bwd_dc_kernel, dict(grads, DC="*fp32"),
                    dict(c_base="i32", c_end="i32", stride_dc="i32"), fused))
        for name, fn, outputs, extra, arch_configs in kernels:
            signature = dict(common, **outputs, **ints, **extra, scale_log2="fp32", margin="fp32")
            if "N" not in fn.arg_names:  # the backward kernels take a column range in N's place
                del signature["N"]
            for config in dict.fromkeys(c for configs in arch_configs.values() for c in configs):
                archs = tuple(arch for arch, configs in arch_configs.items() if config in configs)
                bm, bn, bk = config[:3]
                warps, stages = config[-2:]
                constexprs = dict(HAS_MARGIN=has_margin, UPCAST=dtype == "fp32",
                                  PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                if len(config) == 6:
                    constexprs["BLOCK_DO"] = config[3]
                attrs = _aligned(fn, signature, also=("D",))  # KaLM's D = 896 is a multiple of 16
                tag = f"{dtype}{'_margin' if has_margin else ''}_{bm}x{bn}x{bk}w{warps}s{stages}"
                specs.append(dict(module="focal_infonce", name=f"focal_infonce_{name}_{tag}", fn=fn, archs=archs,
                                  signature=dict(signature, **{c: "constexpr" for c in constexprs}),
                                  constexprs=constexprs, attrs=attrs, num_warps=warps, num_stages=stages))
    return specs


def decoder_specs() -> list:
    """The decoder kernels per dtype: SiLU-multiply forward and backward; RoPE at Qwen2-0.5B's head dim 64 (14 query
    heads: one 16-head block) and 128, forward and backward, cos/sin in x's dtype (a model run in that dtype) and,
    for fp16/bf16 x, in fp32 (transformers' rotary angles under autocast, what training hands over)."""
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        ptr = f"*{dtype}"
        angles = [dtype] if dtype == "fp32" else [dtype, "fp32"]
        specs.append(dict(
            module="decoder", name=f"decoder_silu_mul_{dtype}", fn=decoder_kernels._silu_mul_kernel,
            signature={"GATE": ptr, "UP": ptr, "OUT": ptr, "I": "i32", "stride_g": "i32", "stride_u": "i32",
                       "stride_o": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": decoder_kernels.SILU_MUL_BLOCK}, num_warps=4, num_stages=2))
        specs.append(dict(
            module="decoder", name=f"decoder_silu_mul_bwd_{dtype}", fn=decoder_kernels._silu_mul_bwd_kernel,
            signature={"DOUT": ptr, "GATE": ptr, "UP": ptr, "DGATE": ptr, "DUP": ptr, "I": "i32", "stride_d": "i32",
                       "stride_g": "i32", "stride_u": "i32", "stride_dg": "i32", "stride_du": "i32",
                       "BLOCK": "constexpr"},
            constexprs={"BLOCK": decoder_kernels.SILU_MUL_BLOCK}, num_warps=4, num_stages=2))
        for head_dim, inverse, angle in itertools.product((64, 128), (False, True), angles):
            specs.append(dict(
                module="decoder",
                name=f"decoder_rope{'_bwd' if inverse else ''}_{dtype}_d{head_dim}"
                     f"{'_fp32_angles' if angle != dtype else ''}",
                fn=decoder_kernels._rope_kernel,
                signature={"X": ptr, "OUT": ptr, "COS": f"*{angle}", "SIN": f"*{angle}", "H": "i32",
                           "stride_xt": "i32", "stride_xh": "i32", "stride_ot": "i32", "stride_oh": "i32",
                           "stride_ct": "i32", "stride_st": "i32", "HALF": "constexpr", "BLOCK_H": "constexpr",
                           "BLOCK_HALF": "constexpr", "INVERSE": "constexpr"},
                constexprs={"HALF": head_dim // 2, "BLOCK_H": 16, "BLOCK_HALF": head_dim // 2, "INVERSE": inverse},
                num_warps=4, num_stages=2))
    specs += _add_rms_norm_specs()
    for spec in specs:  # Qwen2-0.5B's intermediate size 4864 is a multiple of 16, as JIT launches specialize it
        spec.setdefault("attrs", _aligned(spec["fn"], spec["signature"], also=("I",)))
    return specs


def _add_rms_norm_specs() -> list:
    """The residual-add RMSNorm forward and backward at hidden 896 (Qwen2-0.5B: a 1024-wide block) and 3584 (Qwen2-7B:
    4096), for a model run in one dtype and for autocast's mix (fp32 residual stream and weight, a half-precision
    attention output and normed output)."""
    specs = []
    mixes = [(d, d, d, d) for d in ("fp32", "fp16", "bf16")] + [("fp32", h, "fp32", h) for h in ("fp16", "bf16")]
    for (res, delta, weight, out), hidden in itertools.product(mixes, (896, 3584)):
        total = "fp32" if "fp32" in (res, delta) else res
        tag = f"{res}_{delta}" if res != delta else res
        block = triton.next_power_of_2(hidden)
        forward = {"RES": f"*{res}", "DELTA": f"*{delta}", "W": f"*{weight}", "SUM": f"*{total}", "OUT": f"*{out}",
                   "RSTD": "*fp32", "H": "i32", "eps": "fp32", **_strides("r", "d", "s", "o"), "BLOCK": "constexpr"}
        backward = {"DOUT": f"*{out}", "DSUM": f"*{total}", "SUM": f"*{total}", "W": f"*{weight}", "RSTD": "*fp32",
                    "DRES": f"*{res}", "DDELTA": f"*{delta}", "DW_PART": "*fp32", "T": "i32", "H": "i32",
                    **_strides("do", "ds", "s", "dr", "dd"), "ROWS": "i32", "BLOCK": "constexpr"}
        for name, fn, signature, constexprs, is_backward in (
                ("add_rms_norm", decoder_kernels._add_rms_norm_kernel, forward, {"BLOCK": block}, False),
                ("add_rms_norm_bwd", decoder_kernels._add_rms_norm_bwd_kernel, backward,
                 {"BLOCK": block}, True)):
            specs.append(dict(module="decoder", name=f"decoder_{name}_{tag}_h{hidden}", fn=fn, signature=signature,
                              constexprs=constexprs, attrs=_aligned(fn, signature, also=("H",)),
                              num_warps=decoder_kernels._norm_warps(block, is_backward), num_stages=2))
    return specs


def all_specs() -> list:
    return attention_specs() + mean_pool_specs() + focal_infonce_specs() + decoder_specs()
