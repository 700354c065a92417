"""The attention kernels compile ahead of time for sm_90 (no GPU needed): the dots lower to wgmma and ptxas reports
no register spills. Runs the compiler in a subprocess without TRITON_INTERPRET (the interpreter's @triton.jit
functions cannot be compiled)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from kalm_fast.kernels.attention import aot_specs

prefixes = tuple(sys.argv[1:])
ptxas = get_ptxas(90).path
results = {}
for spec in aot_specs():
    if not spec["name"].startswith(prefixes) or 90 not in spec.get("archs", (80, 90)):
        continue
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"], attrs=spec.get("attrs"))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    results[spec["name"]] = dict(wgmma="wgmma.mma_async" in ptx, spills=spills)
print(json.dumps(results))
"""

# name prefixes of the aot_specs() entries checked (their sm_90 variants): forward and both backward kernels
KERNELS = ["attn_fwd_fp16_d64", "attn_bwd_dkdv_fp16_d64", "attn_bwd_dq_fp16_d64",
           "attn_fwd_bf16_d80", "attn_bwd_dkdv_bf16_d80", "attn_bwd_dq_bf16_d80"]


def test_sm90_uses_wgmma_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *KERNELS], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for prefix in KERNELS:
        assert any(name.startswith(prefix) for name in results), f"no sm_90 spec named {prefix}*"
    for name, r in results.items():
        assert r["wgmma"], f"{name}: no wgmma in the sm_90 PTX"
        assert r["spills"] == 0, f"{name}: {r['spills']} bytes of register spills on sm_90"
