"""Compile every Triton kernel of kalm_fast ahead of time for sm_80 and sm_90 (no GPU needed) and report spills.

Run WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives an InterpretedFunction that
``triton.compile`` cannot take). The specs come from ``aot_specs.py``; arguments keep the specs of those modules
(``attention``, ``mean_pool``, ``focal_infonce``). Prints one JSON object per compiled spec:
``{"module", "name", "arch", "spill_stores", "spill_loads", "registers", "wgmma", "shared", "seconds"}``, or
``"error"``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from kalm_fast._cuda import LAUNCH_OPTIONS  # the compile options of kalm_fast's own launches

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aot_specs import ARCHS, all_specs  # noqa: E402


def ptxas_report(ptx: str, arch: int) -> dict:
    """Run ptxas -v on the PTX triton generated and read registers and spills from its report."""
    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", text))
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", text)), default=0)
    return {"spill_stores": stores, "spill_loads": loads, "registers": regs}


def compile_spec(spec: dict, arch: int) -> dict:
    """One spec compiled for ``arch``: its report row (``error`` where it did not compile)."""
    row = {"module": spec["module"], "name": spec["name"], "arch": arch,
           "wgmma_expected": spec.get("wgmma_expected", False)}
    started = time.perf_counter()
    try:
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec.get("constexprs", {}),
                        attrs=spec.get("attrs"))
        options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 2), **LAUNCH_OPTIONS}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        row.update(ptxas_report(ptx, arch))
        row["wgmma"] = "wgmma.mma_async" in ptx
        row["shared"] = compiled.metadata.shared
    except Exception as exc:  # reported, the test fails on it
        row["error"] = f"{type(exc).__name__}: {exc}"[:3000]
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(only: list[str]) -> int:
    for spec in all_specs():
        if only and spec["module"] not in only:
            continue
        for arch in spec.get("archs", ARCHS):
            print(json.dumps(compile_spec(spec, arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
