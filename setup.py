"""Builds kalm_fast._C: csrc/bindings.cpp with pybind11, plus csrc/*.cu compiled by nvcc when it is found.

Metadata lives in pyproject.toml; this file only adds the native extension. It never imports torch
(build isolation) and never fails for lack of a GPU or of nvcc: without a working nvcc the module is
built without CUDA and ``kalm_fast._native.build_info()["reason"]`` says why.

Environment:
  KALM_CUDA_ARCHS  compute capabilities to build, e.g. "80;90" (default) or "8.0;9.0;12.0"
  KALM_NO_CUDA=1   skip CUDA entirely
  CUDA_HOME        where to look for nvcc first (then PATH, then /usr/local/cuda)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90"


def parse_archs(text: str) -> list[int]:
    """ "80;90" / "8.0,9.0" / "90" -> [80, 90]."""
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        if not re.fullmatch(r"\d+(\.\d)?", item):
            raise ValueError(f"KALM_CUDA_ARCHS entries must look like 80 or 8.0, got {item!r}")
        archs.append(int(item.replace(".", "")) if "." in item else int(item))
    return sorted(set(archs))


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version(nvcc: str) -> str:
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    if not match:
        raise RuntimeError(f"cannot read the version from `{nvcc} --version`: {out.strip()[-200:]}")
    return match.group(1)


def cuda_home(nvcc: str) -> Path:
    """The toolkit root: CUDA_HOME, else what `nvcc -v --dryrun` reports (nvcc may be a wrapper script)."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            return Path(os.environ[env])
    dry = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"#\$ TOP=(\S+)", dry.stderr + dry.stdout)
    if match:
        return Path(match.group(1))
    return Path(nvcc).resolve().parent.parent


def find_cudart_static(home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub / "libcudart_static.a").is_file():
            return home / sub
    raise RuntimeError(f"libcudart_static.a not found under {home}")


def gencode_flags(archs: list[int]) -> list[str]:
    """SASS for every arch plus PTX of the newest, so later GPUs can JIT it."""
    flags = []
    for arch in archs:
        code = f"[sm_{arch},compute_{arch}]" if arch == archs[-1] else f"sm_{arch}"
        flags += ["-gencode", f"arch=compute_{arch},code={code}"]
    return flags


def nvcc_command(nvcc: str, source: Path, obj: Path, archs: list[int]) -> list[str]:
    return [nvcc, "-c", str(source), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
            "-I", str(CSRC), *gencode_flags(archs)]


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc (in parallel) and links them with static cudart; falls back to CPU-only."""

    def build_extensions(self):
        ext = self.extensions[0]
        base_macros = list(ext.define_macros)
        cuda, reason = self._try_cuda(ext)
        if cuda:
            try:
                super().build_extensions()
                return
            except Exception as exc:  # link failure: keep installing, without CUDA
                reason = f"linking the CUDA objects failed: {str(exc)[-300:]}"
        ext.define_macros = base_macros + [("KALM_BUILD_REASON", c_string(reason))]
        ext.extra_objects, ext.library_dirs, ext.libraries = [], [], []
        print(f"kalm_fast: building kalm_fast._C WITHOUT CUDA: {reason}", file=sys.stderr)
        super().build_extensions()

    def _try_cuda(self, ext) -> tuple[bool, str]:
        if os.environ.get("KALM_NO_CUDA", "0") not in ("", "0"):
            return False, "KALM_NO_CUDA is set"
        nvcc = find_nvcc()
        if nvcc is None:
            return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        try:
            archs = parse_archs(os.environ.get("KALM_CUDA_ARCHS", DEFAULT_ARCHS))
            if not archs:
                return False, "KALM_CUDA_ARCHS is empty"
            version = nvcc_version(nvcc)
            libdir = find_cudart_static(cuda_home(nvcc))
            objects = self._compile_cu(nvcc, archs)
        except Exception as exc:
            return False, f"nvcc failed: {str(exc)[-500:]}"
        ext.extra_objects = [str(o) for o in objects]
        ext.library_dirs = [str(libdir)]
        ext.libraries = ["cudart_static", "rt", "pthread", "dl"]
        ext.include_dirs = list(ext.include_dirs) + [str(cuda_home(nvcc) / "include")]
        ext.define_macros = list(ext.define_macros) + [
            ("KALM_WITH_CUDA", "1"),
            ("KALM_CUDA_ARCHS", c_string(",".join(map(str, archs)))),
            ("KALM_NVCC_VERSION", c_string(version)),
        ]
        print(f"kalm_fast: CUDA build with nvcc {version} for sm_{archs}", file=sys.stderr)
        return True, ""

    def _compile_cu(self, nvcc: str, archs: list[int]) -> list[Path]:
        sources = sorted(CSRC.glob("*.cu"))
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        jobs = [(src, out_dir / (src.stem + ".o")) for src in sources]

        def run(job):
            src, obj = job
            proc = subprocess.run(nvcc_command(nvcc, src, obj, archs), capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{src.name}: {proc.stderr.strip()[-1500:]}")
            return obj

        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            return list(pool.map(run, jobs))


def c_string(text: str) -> str:
    """A macro value that is a C string literal (no shell involved, so only C escaping matters)."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).replace("\\", "/").replace('"', "'")
    return f'"{cleaned}"'


setup(
    # depends: a changed .cu / .cuh / header rebuilds the extension (else an in-place rebuild keeps the old kernels)
    ext_modules=[Pybind11Extension("kalm_fast._C", ["csrc/bindings.cpp"], include_dirs=["csrc"], cxx_std=17,
                                   depends=sorted(p.relative_to(ROOT).as_posix() for p in CSRC.iterdir()
                                                  if p.is_file()))],
    cmdclass={"build_ext": BuildExt},
)
