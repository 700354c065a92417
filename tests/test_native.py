"""The native module kalm_fast._C: every .cu compiles for sm_80 and sm_90 without register spills,
the module imports and reports its build on a CPU-only machine, the build falls back to CPU-only,
errors are clear, and the host-side launch plans and argument packing are right.

The host-plan tests walk the kernels' launch plans (grids, splits, tiles) in Python: they check that the plans
cover every token, feature and candidate once; the kernels themselves are checked against the oracles on a GPU
(the ``cuda`` backends in each op's tests, ``make gpu-check``)."""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kalm_fast import _native
from kalm_fast._cuda import cdiv
from kalm_fast.ops.attention import _cuda as cat
from kalm_fast.ops.attention.reference import flash_attention as flash_attention_reference
from kalm_fast.ops.focal_infonce import _cuda as cfi
from kalm_fast.ops.focal_infonce import logp
from kalm_fast.ops.focal_infonce._torch import TorchEngine
from kalm_fast.ops.mean_pool import _cuda as cmp

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _find_nvcc():
    """nvcc where setup.py's ``find_nvcc`` finds it: CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates = [Path(h) / "bin" / "nvcc" for h in homes if h] + [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


NVCC = _find_nvcc()
ARCHS = (80, 90)
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")


# ---------------------------------------------------------------------------------------------- nvcc


def _ptxas_report(source: Path, arch: int, out_dir: Path) -> dict:
    """Compile one .cu for one arch with `-Xptxas -v`; per kernel: registers, spill bytes, stack frame."""
    cmd = [NVCC, "-c", str(source), "-o", str(out_dir / f"{source.stem}_{arch}.o"), "-O3", "-std=c++17",
           "-Xcompiler", "-fPIC", "-I", str(CSRC), "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = {"source": source.name, "arch": arch, "returncode": proc.returncode, "log": proc.stderr[-3000:],
              "kernels": {}}
    current = None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            current = m.group(1)
            report["kernels"][current] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            report["kernels"][current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                              spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            report["kernels"][current]["registers"] = int(m.group(1))
    return report


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = [(src, arch) for src in sorted(CSRC.glob("*.cu")) for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda job: _ptxas_report(job[0], job[1], out_dir), jobs))


def test_csrc_has_one_cu_per_op():
    """Each op with a cuda backend (``ops/<op>/_cuda.py``) has its ``csrc/<op>.cu``, and no .cu is an orphan."""
    with_cuda = {d.name for d in (ROOT / "kalm_fast" / "ops").iterdir() if (d / "_cuda.py").is_file()}
    assert with_cuda == {"attention", "focal_infonce", "mean_pool"}
    assert {p.stem for p in CSRC.glob("*.cu")} == with_cuda
    assert (CSRC / "bindings.cpp").is_file()


@requires_nvcc
def test_every_cu_compiles_for_sm80_and_sm90(ptxas_reports):
    failed = [f"{r['source']} sm_{r['arch']}:\n{r['log']}" for r in ptxas_reports if r["returncode"] != 0]
    assert not failed, "\n".join(failed)
    for r in ptxas_reports:
        assert r["kernels"], f"{r['source']} sm_{r['arch']}: ptxas reported no kernels:\n{r['log']}"
    assert {r["arch"] for r in ptxas_reports} == set(ARCHS)


@requires_nvcc
def test_no_register_spills_or_local_memory(ptxas_reports):
    bad = [f"{r['source']} sm_{r['arch']} {name}: {k}"
           for r in ptxas_reports for name, k in r["kernels"].items()
           if k.get("spill_stores", 0) or k.get("spill_loads", 0) or k.get("stack", 0)]
    assert not bad, "register spills / local memory:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------- module


def test_module_imports_and_reports_build():
    info = _native.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["archs"], list) and all(isinstance(a, int) for a in info["archs"])
    if info["cuda"]:
        assert info["archs"], info
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", info["nvcc"]), info
        assert "reason" not in info
    else:
        assert info["reason"], info
        assert info["nvcc"] is None


@pytest.mark.gpu
@requires_nvcc
def test_built_with_cuda_for_default_archs():
    info = _native.build_info()
    assert info["cuda"], f"nvcc is on PATH but kalm_fast._C was built without CUDA: {info.get('reason')}"
    assert info["archs"] == [80, 90], info
    assert info["nvcc"] in subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    assert _native.cuda_unavailable() is None


@pytest.mark.gpu
def test_import_without_driver_is_clean():
    """The module links cudart statically: it imports with or without a driver and sees the devices torch sees."""
    module = _native._load()[0]
    if not _native.build_info()["cuda"]:
        pytest.skip("module built without CUDA")
    info = module.runtime_info()
    assert info["device_count"] == torch.cuda.device_count()


def _build(tmp_path: Path, env_extra: dict) -> dict:
    """Build kalm_fast._C with setup.py into tmp_path and return its build_info()."""
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "tmp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = ("import importlib.util, json, sys, glob; p = glob.glob(sys.argv[1] + '/kalm_fast/_C*.so')[0]; "
             "s = importlib.util.spec_from_file_location('kalm_fast._C', p); m = importlib.util.module_from_spec(s); "
             "s.loader.exec_module(m); print(json.dumps(m.build_info()))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "lib")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_without_cuda_says_why(tmp_path):
    info = _build(tmp_path, {"KALM_NO_CUDA": "1"})
    assert info["cuda"] is False and info["nvcc"] is None and info["archs"] == []
    assert "KALM_NO_CUDA" in info["reason"]


def test_build_survives_a_broken_nvcc(tmp_path):
    """An nvcc that reports a version but cannot compile: the install goes on without CUDA."""
    fake = tmp_path / "cuda" / "bin"
    fake.mkdir(parents=True)
    (tmp_path / "cuda" / "lib64").mkdir()
    (tmp_path / "cuda" / "lib64" / "libcudart_static.a").write_bytes(b"")
    (fake / "nvcc").write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "Cuda compilation tools, '
                               'release 13.0, V13.0.88"; exit 0; fi\necho "nvcc: simulated failure" >&2\nexit 3\n')
    (fake / "nvcc").chmod(0o755)
    info = _build(tmp_path, {"CUDA_HOME": str(tmp_path / "cuda"), "KALM_NO_CUDA": "0"})
    assert info["cuda"] is False
    assert "nvcc failed" in info["reason"] and "simulated failure" in info["reason"], info


def test_missing_module_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_native, "_load", lambda: (None, "No module named 'kalm_fast._C'"))
    with pytest.raises(RuntimeError, match="not built.*pip install -e"):
        _native.build_info()
    with pytest.raises(RuntimeError, match="not built"):
        _native.cuda_lib()


def test_module_without_cuda_is_a_clear_error(monkeypatch):
    class NoCuda:
        @staticmethod
        def build_info():
            return {"cuda": False, "archs": [], "nvcc": None, "reason": "nvcc not found"}

    monkeypatch.setattr(_native, "_load", lambda: (NoCuda, None))
    with pytest.raises(RuntimeError, match="built without CUDA.*nvcc not found"):
        _native.cuda_lib()


# ---------------------------------------------------------------------------------------------- mean_pool plans


@pytest.mark.parametrize("esize,dim,addr,strides,expected", [
    (2, 896, 0, (512 * 896, 896), 8),   # bf16, 16-byte loads
    (4, 896, 0, (896,), 4),             # fp32
    (2, 896, 2, (896,), 1),             # address only 2-byte aligned
    (2, 900, 0, (900,), 4),             # dim 900 = 4 * 225
    (2, 64, 0, (68,), 4),               # row stride 68 is not a multiple of 8
    (2, 7, 0, (7,), 1),
    (4, 6, 8, (6,), 2),
])
def test_vector_width(esize, dim, addr, strides, expected):
    assert cmp.vector_width(esize, dim, addr, strides) == expected


def _walk_forward_plan(plan, dim, length):
    """Which (token, feature) pairs the forward's threads read, mirroring mean_pool_partial_kernel's loops."""
    seen = {}
    vec, col_threads, groups, splits = plan["vec"], plan["col_threads"], plan["groups"], plan["splits"]
    per_split = cdiv(length, splits)
    for z in range(splits):
        t_begin, t_end = z * per_split, min(length, z * per_split + per_split)
        for tid in range(plan["threads"]):
            col, group = tid % col_threads, tid // col_threads
            if group >= groups:
                continue
            for c in range(col, dim // vec, col_threads):
                t = t_begin + group
                while t + 3 * groups < t_end:
                    for u in range(4):
                        for j in range(vec):
                            key = (t + u * groups, c * vec + j)
                            seen[key] = seen.get(key, 0) + 1
                    t += 4 * groups
                while t < t_end:
                    for j in range(vec):
                        seen[(t, c * vec + j)] = seen.get((t, c * vec + j), 0) + 1
                    t += groups
    return seen


@pytest.mark.parametrize("num_seqs,length,dim,esize,sms", [
    (1, 1, 8, 2, 132), (3, 17, 24, 4, 108), (2, 129, 64, 2, 132), (64, 512, 896, 2, 132), (1, 9, 7, 2, 4),
    (5, 0, 16, 4, 132), (1, 40, 2304, 4, 2), (1, 300, 16, 2, 132),
])
def test_forward_plan_reads_every_token_feature_once(num_seqs, length, dim, esize, sms):
    plan = cmp.plan_forward(num_seqs=num_seqs, typical_len=length, dim=dim, element_size=esize, address=0,
                            strides=(length * dim, dim), sms=sms)
    assert plan["threads"] % 32 == 0 and plan["threads"] <= cmp.MAX_THREADS
    assert plan["col_threads"] * plan["groups"] <= plan["threads"]
    assert dim % plan["vec"] == 0 and plan["vec"] * esize <= 16
    assert 1 <= plan["groups"] <= max(length, 1) and 1 <= plan["splits"] <= max(length, 1)
    if length * dim <= 40 * 2304:
        seen = _walk_forward_plan(plan, dim, length)
        assert set(seen) == {(t, f) for t in range(length) for f in range(dim)}
        assert set(seen.values()) <= {1}


def test_forward_plan_fills_the_gpu():
    few = cmp.plan_forward(num_seqs=64, typical_len=512, dim=1024, element_size=2, address=0, strides=(1024,),
                           sms=132)
    assert few["vec"] == 8 and few["splits"] > 1
    assert 64 * few["splits"] * few["threads"] >= 132 * cmp.RESIDENT_THREADS_PER_SM
    many = cmp.plan_forward(num_seqs=4096, typical_len=64, dim=1024, element_size=2, address=0, strides=(1024,),
                            sms=132)
    assert many["splits"] == 1


def test_plans_reject_too_large_dim():
    with pytest.raises(ValueError, match="dim <= "):
        cmp.plan_forward(num_seqs=1, typical_len=1, dim=cmp.MAX_DIM + 1, element_size=4, address=0, strides=(),
                         sms=1)
    with pytest.raises(ValueError, match="dim <= "):
        cmp.plan_backward(max_len=1, hidden_size=cmp.MAX_DIM + 8, dim=cmp.MAX_DIM + 8, element_size=2)


@pytest.mark.parametrize("max_len,hidden,dim,esize", [
    (1, 8, 8, 2), (17, 24, 16, 4), (129, 896, 512, 2), (3, 7, 5, 2), (0, 64, 64, 2), (33, 4096, 4096, 4),
])
def test_backward_plan_writes_every_token_feature_once(max_len, hidden, dim, esize):
    plan = cmp.plan_backward(max_len=max_len, hidden_size=hidden, dim=dim, element_size=esize)
    assert plan["threads"] <= cmp.MAX_THREADS and plan["threads"] % plan["col_threads"] == 0
    assert hidden % plan["vec"] == 0 and dim % plan["vec"] == 0
    assert plan["chunks_per_seq"] * plan["tokens_per_block"] >= max_len
    rows, written = plan["threads"] // plan["col_threads"], {}
    for chunk in range(plan["chunks_per_seq"]):  # mirrors mean_pool_bwd_scatter_kernel
        t0 = chunk * plan["tokens_per_block"]
        if t0 >= max_len:
            continue
        for tid in range(plan["threads"]):
            col = tid % plan["col_threads"]
            for t in range(t0 + tid // plan["col_threads"], min(t0 + plan["tokens_per_block"], max_len), rows):
                for c in range(col, hidden // plan["vec"], plan["col_threads"]):
                    for j in range(plan["vec"]):
                        written[(t, c * plan["vec"] + j)] = written.get((t, c * plan["vec"] + j), 0) + 1
    if hidden * max_len <= 129 * 896:
        assert set(written) == {(t, f) for t in range(max_len) for f in range(hidden)}
        assert set(written.values()) <= {1}


# ---------------------------------------------------------------------------------------------- argument packing


def test_pack_rejects_unknown_fields():
    with pytest.raises(AttributeError, match="no field 'hiden'"):
        cmp.pack("MeanPoolFwdArgs", hiden=1)


def test_forward_args_padded():
    hidden = torch.randn(3, 10, 32, dtype=torch.float16)
    mask = torch.ones(3, 10, dtype=torch.bool)[:, :]
    mask_u8 = cmp._mask_u8(mask)
    out = torch.empty(3, 16, dtype=torch.float16)
    mean = torch.empty(3, 16)
    plan = cmp.forward_plan(hidden, None, 16, sms=10)
    partial = torch.empty(plan["splits"], 3, 16)
    a = cmp.forward_args(hidden, mask_u8, None, 16, True, 1e-6, out, mean, partial, plan, stream=1234)
    assert (a.dtype, a.hidden, a.cu_seqlens, a.mask, a.out, a.mean_out, a.partial) == (
        1, hidden.data_ptr(), 0, mask.data_ptr(), out.data_ptr(), mean.data_ptr(), partial.data_ptr())
    assert (a.num_seqs, a.seq_len, a.stride_b, a.stride_t, a.mask_stride_b, a.mask_stride_t) == (3, 10, 320, 32, 10, 1)
    assert (a.dim, a.normalize, a.stream, a.device) == (16, 1, 1234, 0)
    assert a.eps == pytest.approx(1e-6)
    assert a.vec == 8 and a.col_threads == 2 and a.threads % 32 == 0 and a.splits == plan["splits"]


def test_forward_args_packed_and_strided():
    base = torch.randn(9, 40, dtype=torch.bfloat16)
    hidden = base[:, 4:36]  # row stride 40, offset 4 elements (8 bytes)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    out = torch.empty(3, 32, dtype=torch.bfloat16)
    plan = cmp.forward_plan(hidden, cu, 32, sms=10)
    a = cmp.forward_args(hidden, None, cu, 32, False, 1e-12, out, None, torch.empty(1), plan, stream=0)
    assert (a.dtype, a.cu_seqlens, a.mask, a.mean_out) == (2, cu.data_ptr(), 0, 0)
    assert (a.num_seqs, a.seq_len, a.stride_b, a.stride_t) == (3, 0, 0, 40)
    assert a.vec == 4  # 8-byte aligned start


def test_mask_conversion():
    m = torch.tensor([[1, 0, 2]], dtype=torch.int64)
    assert cmp._mask_u8(m).tolist() == [[1, 0, 1]] and cmp._mask_u8(m).dtype == torch.uint8
    b = torch.tensor([[True, False]])
    assert cmp._mask_u8(b).data_ptr() == b.data_ptr()
    assert cmp._mask_u8(None) is None


def test_backward_args():
    grad_out = torch.randn(2, 8, dtype=torch.float16)
    grad_hidden = torch.empty(2, 5, 24, dtype=torch.float16)
    ge = torch.empty(2, 8)
    a = cmp.backward_args(grad_out, None, None, None, ge, grad_hidden, seq_len=5, max_len=5, dim=8,
                          normalize=False, eps=1e-12, stream=7)
    assert (a.dtype, a.grad_out, a.ge, a.grad_hidden, a.mean) == (1, grad_out.data_ptr(), ge.data_ptr(),
                                                                  grad_hidden.data_ptr(), 0)
    assert (a.num_seqs, a.seq_len, a.dim, a.hidden_size, a.stream) == (2, 5, 8, 24, 7)
    assert a.vec == 8 and a.chunks_per_seq * a.tokens_per_block >= 5


# ---------------------------------------------------------------------------------------------- attention

def test_attention_plan():
    p = cat.plan(num_seqs=3, max_seqlen=129, num_heads_q=14, head_dim=64)
    assert p["m_blocks"] == 3 and p["grid"] == (9, 14) and p["threads"] == 128
    assert cat.smem_bytes(128) == 192 * 136 * 2 <= 163 * 1024  # fits sm_80 and sm_90 (opt-in above 48 KiB)
    assert cat.plan(num_seqs=2, max_seqlen=0, num_heads_q=2, head_dim=128)["grid"] == (0, 2)
    with pytest.raises(ValueError, match="head dims"):
        cat.plan(num_seqs=1, max_seqlen=1, num_heads_q=1, head_dim=96)


def _walk_attention_plan(q, k, v, cu, max_seqlen, causal, scale):
    """csrc/attention.cu block by block in fp32: grid, key-tile count, masks, base-2 online softmax, lse."""
    T, hq, d = q.shape
    group = hq // k.shape[1]
    p = cat.plan(num_seqs=cu.numel() - 1, max_seqlen=max_seqlen, num_heads_q=hq, head_dim=d)
    out = torch.full(q.shape, float("nan"))
    lse = torch.full((hq, T), float("nan"))
    scale_log2 = scale * cat.LOG2E
    bounds = cu.tolist()
    for bx in range(p["grid"][0]):
        n, q0 = bx // p["m_blocks"], (bx % p["m_blocks"]) * cat.BLOCK_M
        start, length = bounds[n], bounds[n + 1] - bounds[n]
        if q0 >= length:
            continue
        rows = torch.arange(q0, q0 + cat.BLOCK_M)

        def tile(x, first, h):  # zero-filled [64, D] tile of sequence rows first.. (as load_tile_async)
            idx = torch.arange(first, first + 64)
            t = torch.zeros(64, d)
            ok = idx < length
            t[ok] = x[start + idx[ok], h].float()
            return t

        key_end = min(length, q0 + cat.BLOCK_M) if causal else length
        for h in range(hq):
            qt = tile(q, q0, h)
            m = torch.full((64,), float("-inf"))
            l, o = torch.zeros(64), torch.zeros(64, d)
            for j in range(cat.cdiv(key_end, cat.BLOCK_N)):
                k0 = j * cat.BLOCK_N
                keys = torch.arange(k0, k0 + cat.BLOCK_N)
                s = qt @ tile(k, k0, h // group).T
                masked = (keys[None, :] >= length) | (causal & (keys[None, :] > rows[:, None]))
                s = s.masked_fill(masked, float("-inf"))
                m_new = torch.maximum(m, s.amax(1))
                base = torch.where(m_new == float("-inf"), torch.zeros(()), m_new * scale_log2)
                alpha = torch.exp2(m * scale_log2 - base)
                pr = torch.exp2(s * scale_log2 - base[:, None])
                l = l * alpha + pr.sum(1)
                o = o * alpha[:, None] + pr @ tile(v, k0, h // group)
                m = m_new
            keep = rows < length
            out[start + rows[keep], h] = (o / l[:, None])[keep]
            lse[h, start + rows[keep]] = ((m * scale_log2 + torch.log2(l)) * math.log(2))[keep]
    return out, lse


@pytest.mark.parametrize("lengths,hq,hkv,d,causal", [([1, 17, 0, 70], 4, 2, 64, False), ([129, 5], 2, 1, 64, True),
                                                      ([65], 2, 2, 128, False)])
def test_host_plan_attention_tiles_cover_the_reference(lengths, hq, hkv, d, causal):
    torch.manual_seed(0)
    T = sum(lengths)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    q, k, v = torch.randn(T, hq, d), torch.randn(T, hkv, d), torch.randn(T, hkv, d)
    out, lse = _walk_attention_plan(q, k, v, cu, max(lengths), causal, d ** -0.5)
    ref_out, ref_lse = flash_attention_reference(q, k, v, cu, max(lengths), None, causal,
                                               softmax_scale=d ** -0.5, return_lse=True)
    torch.testing.assert_close(out, ref_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)


def test_attention_args():
    q = torch.randn(10, 4, 64, dtype=torch.bfloat16)
    k, v = torch.randn(10, 2, 64, dtype=torch.bfloat16), torch.randn(10, 2, 64, dtype=torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(4, 10)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    a = cat.forward_args(q, k, v, out, lse, cu, 7, True, 0.125, stream=5)
    assert (a.dtype, a.q, a.k, a.v, a.out, a.lse, a.cu_seqlens) == (
        2, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), cu.data_ptr())
    assert (a.num_seqs, a.total_tokens, a.num_heads_q, a.num_heads_kv, a.head_dim) == (2, 10, 4, 2, 64)
    assert (a.q_stride_t, a.q_stride_h, a.k_stride_t, a.k_stride_h, a.lse_stride_h) == (256, 64, 128, 64, 10)
    assert (a.causal, a.m_blocks, a.stream) == (1, 1, 5)
    assert a.scale_log2 == pytest.approx(0.125 * cat.LOG2E)


def test_attention_is_forward_only():
    q = torch.randn(4, 2, 64, dtype=torch.float16, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only.*backend='triton'"):
        cat.flash_attention_cuda(q, q, q, None, None, False, None, 0.125, False)


def test_aligned_copies_only_when_needed():
    from kalm_fast._cuda import aligned

    x = torch.randn(8, 64, dtype=torch.float16)
    assert aligned(x) is x
    y = x.flatten()[3:3 + 64 * 7].view(7, 64)  # contiguous but 6 bytes off
    z = aligned(y)
    assert z.data_ptr() % 16 == 0 and torch.equal(z, y)
    w = x[:, :60]  # row stride 64, but 60-element rows are fine; stride 128 bytes
    assert aligned(w) is w


# ---------------------------------------------------------------------------------------------- focal-InfoNCE


@pytest.mark.parametrize("n_cols,other,sms", [(1, 1, 132), (64, 1, 132), (65, 1, 132), (4096, 8, 132),
                                              (4096, 500, 132), (100, 3, 1), (0, 1, 4)])
def test_column_split_covers_every_column_once(n_cols, other, sms):
    per, splits = logp.split_columns(n_cols, cfi.TILE, other, sms)
    assert per % cfi.TILE == 0 and splits >= 1
    assert splits * per >= n_cols and (splits - 1) * per < max(n_cols, 1)
    assert splits * other <= max(logp.PROGRAMS_PER_SM * sms, other)


def _walk_engine_plan(q, flat, rq, rd, s_pos, inv_tau, margin, group, lse=None, gc=None, sms=4, chunk=None):
    """csrc/focal_infonce.cu's launches in fp32: forward (lse, neg) via column splits, or backward
    accumulators (dq, dd) via (row tile, feature chunk, column split) blocks, as ``CudaEngine.backward`` launches
    them for each chunk of ``chunk`` candidates (all of them when None)."""
    B, D = q.shape
    N = flat.shape[0]
    qf, ff = q.float(), flat.float()

    def block(rows_x, cols_x, r_row, r_col, r0, c_begin, c_end, transposed, doc_offset=0):
        rows = torch.arange(r0, min(r0 + cfi.TILE, rows_x.shape[0]))
        cols = torch.arange(c_begin, c_end)
        v = rows_x[rows] @ cols_x[cols].T * r_row[rows, None] * r_col[None, cols]
        query, doc = (cols[None, :], rows[:, None]) if transposed else (rows[:, None], cols[None, :])
        is_pos = doc + doc_offset == query * group
        keep = torch.ones_like(is_pos) if margin is None else (v <= s_pos[query] + margin) | is_pos
        return rows, cols, v, query, is_pos, keep

    if lse is None:
        p = cfi.forward_plan(n_rows=B, n_cols=N, sms=sms)
        lse_part = torch.full((p["col_splits"], B), float("nan"))
        neg_part = torch.full((p["col_splits"], B), float("nan"))
        for z in range(p["col_splits"]):
            c_begin, c_end = z * p["cols_per_split"], min(N, (z + 1) * p["cols_per_split"])
            for r0 in range(0, B, cfi.TILE):
                rows, _, v, _, is_pos, keep = block(qf, ff, rq, rd, r0, c_begin, c_end, False)
                lse_part[z, rows] = torch.logsumexp((v * inv_tau).masked_fill(~keep, float("-inf")), dim=1)
                neg_part[z, rows] = (v.masked_fill(~keep | is_pos, float("-inf")).amax(1) if v.shape[1]
                                     else float("-inf"))
        return torch.logsumexp(lse_part, 0), neg_part.amax(0)
    dq, dd = torch.zeros(B, D), torch.zeros(N, D)
    for c0 in range(0, N, chunk or N):
        docs, r_docs = ff[c0:c0 + (chunk or N)], rd[c0:c0 + (chunk or N)]
        for rows_x, cols_x, r_row, r_col, out, transposed in ((qf, docs, rq, r_docs, dq, False),
                                                              (docs, qf, r_docs, rq, dd[c0:c0 + len(docs)], True)):
            n_rows, n_cols = rows_x.shape[0], cols_x.shape[0]
            p = cfi.backward_plan(n_rows=n_rows, n_cols=n_cols, dim=D, sms=sms)
            for r0, d0, z in itertools.product(range(0, n_rows, cfi.TILE), range(0, D, cfi.CHUNK),
                                               range(p["col_splits"])):
                c_begin, c_end = z * p["cols_per_split"], min(n_cols, (z + 1) * p["cols_per_split"])
                rows, cols, v, query, is_pos, keep = block(rows_x, cols_x, r_row, r_col, r0, c_begin, c_end,
                                                           transposed, doc_offset=c0)
                prob = torch.exp2(v * inv_tau * cfi.LOG2E - lse[query] * cfi.LOG2E) * keep
                g = gc[query] * (is_pos.float() - prob)
                out[rows, d0:d0 + cfi.CHUNK] += (g * r_col[None, cols]) @ cols_x[cols, d0:d0 + cfi.CHUNK]
    return dq, dd


@pytest.mark.parametrize("B,group,D,margin,cos,chunk", [(3, 2, 24, None, True, None), (70, 3, 136, 0.05, True, None),
                                                        (70, 3, 136, 0.05, True, 64), (5, 1, 64, None, False, 2)])
def test_host_plan_engine_blocks_cover_the_torch_engine(B, group, D, margin, cos, chunk):
    inverse_norms = logp.inverse_norms
    torch.manual_seed(1)
    q, flat = torch.randn(B, D), torch.randn(B * group, D)
    if not cos:  # keep the logits s / temperature moderate, as for cosine
        q, flat = q / D ** 0.5, flat / D ** 0.5
    rq, rd = inverse_norms(q, cos)[0], inverse_norms(flat, cos)[0]
    s_pos = (q * flat[::group]).sum(1) * rq * rd[::group]
    inv_tau = 1 / 0.05
    lse, neg = _walk_engine_plan(q, flat, rq, rd, s_pos, inv_tau, margin, group)
    ref_lse, ref_neg = TorchEngine.forward(q, flat, rq, rd, s_pos, inv_tau, margin, group)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(neg, ref_neg, atol=1e-5, rtol=1e-5)
    gc = torch.randn(B)
    acc = [torch.zeros(B, D), torch.zeros(B * group, D)]
    TorchEngine.backward(q, flat, rq, rd, s_pos, ref_lse, gc, inv_tau, margin, group, *acc)
    got = _walk_engine_plan(q, flat, rq, rd, s_pos, inv_tau, margin, group, lse=ref_lse, gc=gc, chunk=chunk)
    for g, r in zip(got, acc):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_engine_args():
    q, flat = torch.randn(4, 32, dtype=torch.float16), torch.randn(12, 32, dtype=torch.float16)
    rq, rd, s_pos = torch.ones(4), torch.ones(12), torch.zeros(4)
    a = cfi.engine_args(q, flat, rq, rd, s_pos, 3, 20.0, 0.1, stream=9, transposed=1, col_splits=2, doc_offset=6)
    assert (a.dtype, a.rows, a.cols, a.n_rows, a.n_cols, a.dim, a.row_stride, a.col_stride) == (
        1, q.data_ptr(), flat.data_ptr(), 4, 12, 32, 32, 32)
    assert (a.r_row, a.r_col, a.s_pos, a.group, a.has_margin, a.transposed, a.col_splits, a.stream, a.doc_offset) == (
        rq.data_ptr(), rd.data_ptr(), s_pos.data_ptr(), 3, 1, 1, 2, 9, 6)
    assert a.margin == pytest.approx(0.1) and a.inv_tau_log2 == pytest.approx(20 * cfi.LOG2E, rel=1e-6)
    assert cfi.engine_args(q, flat, rq, rd, s_pos, 3, 20.0, None, stream=0).has_margin == 0
