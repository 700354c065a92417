"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 on this CPU-only machine (no GPU needed): at every
configuration a GPU may run, without register spills, within the shared memory of the arch, and on sm_90 the
half-precision attention dots lower to wgmma (Hopper's tensor-core instruction)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "tools" / "compile_triton_kernels.py"
# Shared memory per block: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100/H200).
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}


def compile_all(modules=()):
    """The compile tool's rows, run without TRITON_INTERPRET (the interpreter's @triton.jit cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(SCRIPT), *modules], capture_output=True, text=True, env=env,
                          timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def compiled():
    rows = compile_all()
    assert rows, "no Triton kernel was compiled"
    return rows


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    errors = [r for r in compiled if "error" in r]
    assert not errors, "\n".join(f"{r['module']}.{r.get('name')} sm_{r.get('arch')}: {r['error']}" for r in errors)
    assert {r["arch"] for r in compiled} == {80, 90}


def test_no_register_spills(compiled):
    spilled = [r for r in compiled if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
    assert not spilled, "register spills: " + "; ".join(
        f"{r['module']}.{r['name']} sm_{r['arch']}: {r['spill_stores']}B stores / {r['spill_loads']}B loads, "
        f"{r['registers']} regs" for r in spilled)


def test_shared_memory_fits(compiled):
    too_big = [r for r in compiled if r.get("shared", 0) > MAX_SHARED[r["arch"]]]
    assert not too_big, [(r["name"], r["arch"], r["shared"]) for r in too_big]


@pytest.mark.parametrize("module,kernels", [("attention", ("attn_fwd", "attn_dkdv", "attn_dq", "attn_bwd_delta")),
                                            ("mean_pool", ("sum", "finish", "bwd")),
                                            ("focal_infonce", ("fwd", "bwd_dq", "bwd_dc", "bwd_grad")),
                                            ("decoder", ("silu_mul", "silu_mul_bwd", "rope", "rope_bwd",
                                                         "add_rms_norm", "add_rms_norm_bwd"))])
def test_every_kernel_and_dtype_is_covered(compiled, module, kernels):
    names = {r["name"] for r in compiled if r["module"] == module}
    for kernel in kernels:
        for dtype in ("fp32", "bf16") if module in ("attention", "focal_infonce") else ("fp32", "fp16", "bf16"):
            assert any(kernel in n and dtype in n for n in names), (module, kernel, dtype)


def test_sm90_half_attention_uses_wgmma(compiled):
    """Every fp16/bf16 attention config whose dots have 64 rows or more lowers to wgmma on sm_90, and every kernel
    and head dim has such a config."""
    expected = [r for r in compiled if r.get("wgmma_expected")]
    assert not [r["name"] for r in expected if not r.get("wgmma")]
    for kernel in ("fwd", "dkdv", "dq"):
        for d in (64, 80, 128, 256):
            assert any(f"attn_{kernel}_" in r["name"] and f"_d{d}_" in r["name"] for r in expected), (kernel, d)


def test_every_triton_launch_passes_the_launch_options():
    """Every ``kernel[grid](...)`` launch in kalm_fast's Triton modules passes ``**LAUNCH_OPTIONS``: the compile
    options this file checks (fused multiply-adds, whose default Triton 3.10 turns off)."""
    import ast

    launches, missing = 0, []
    for path in (ROOT / "kalm_fast").rglob("*.py"):
        text = path.read_text()
        if "import triton" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                launches += 1
                if not any(k.arg is None and getattr(k.value, "id", None) == "LAUNCH_OPTIONS" for k in node.keywords):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert launches >= 15 and not missing, missing
