"""``make gpu-check`` cannot rot between GPU runs: its dry mode runs every stage's plumbing here, on the CPU."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu_check.py"
PROBE = os.environ.get("KALM_GPU_CHECK_PROBE") == "1"
FAULT_PROBE = os.environ.get("KALM_GPU_CHECK_FAULT_PROBE") == "1"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_passes_every_stage_in_at_most_eight_files(tmp_path):
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)  # emptied first (not removed: OUT may be a mount point)
    (out / "old" / "x.log").write_text("old")
    (out / "old.md").write_text("old")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "KALM_BENCH_OUT")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out), "--budget", "900"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [s["stage"] for s in summary["stages"]]
    assert names == ["env", "build", "tests", "tests-native", "bench-attention", "bench-encode", "bench-mean-pool",
                     "bench-contrastive", "bench-train-step"]
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["gpu-check.tar.gz", "summary.json", "summary.md"]
    text = (out / "summary.md").read_text()
    assert "PASSED" in text and "## tests" in text
    import tarfile

    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu-check/tests.log" in names and any(n.startswith("gpu-check/bench/attention-") for n in names)
    collected = (out / "summary.md").read_text()
    assert "tests collected" in collected  # the GPU tests were found (not run) in the dry mode


def test_the_gpu_tests_command_lines_are_accepted_without_pytest_benchmark(tmp_path):
    """What --dry cannot run: the test stages' own commands (xdist workers stealing work, pyproject's addopts, which
    name pytest-benchmark's option, left out) parse and collect the gpu tests, here with pytest-benchmark off as on
    a machine that lacks it: those of the CUDA C++ backends in their own stage, the others in the first."""
    gpu_check = _load_script()
    collected = {}
    for stage in gpu_check.stages(dry=False, workers=2):
        if stage.name.startswith("tests"):
            command = [str(c).format(work=tmp_path) for c in stage.command if c != "-v"] + [
                "-p", "no:benchmark", "--collect-only", "-q"]  # -q alone: one line per test
            proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ, **stage.env), capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert "--dist" in stage.command and "worksteal" in stage.command
            collected[stage.name] = set(re.findall(r"^tests/\S+::\S+", proc.stdout, re.M))
    assert set(collected) == {"tests", "tests-native"}
    assert collected["tests"] and collected["tests-native"] and not collected["tests"] & collected["tests-native"]
    assert all("cuda" in test for test in collected["tests-native"])
    assert not any("[cuda" in test or "-cuda" in test for test in collected["tests"])


def test_a_build_without_cuda_fails_loudly(monkeypatch, capsys):
    module = _load_script()
    import kalm_fast._native as native

    monkeypatch.setattr(module.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(a, 0))
    monkeypatch.setattr(native, "build_info", lambda: {"cuda": False, "archs": [], "reason": "nvcc not found"})
    assert module.build(dry=False) == 1
    out = capsys.readouterr().out
    assert "BUILD FAILED" in out and "WITHOUT CUDA" in out


def test_a_stage_over_its_limit_times_out_and_a_late_one_is_skipped(tmp_path):
    module = _load_script()
    import time

    slow = module.Stage("slow", 1, [sys.executable, "-c", "import time; time.sleep(5)"])
    row = module.run_stage(slow, tmp_path, time.monotonic() + 60)
    assert row["status"].startswith("timeout")
    row = module.run_stage(slow, tmp_path, time.monotonic() + 0.5)
    assert row["status"] == "skipped"


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended


def test_a_stage_over_its_limit_is_interrupted_then_killed_with_its_children(tmp_path):
    """At its limit a stage gets SIGINT and a grace period to print what it has (pytest: the failures so far); then
    its whole process group goes, workers included (none may hold the GPU during the next stage)."""
    module = _load_script()
    import time

    pid_file = tmp_path / "worker.pid"
    script = f"""if True:
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(worker.pid))
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted:", "3 passed", flush=True)  # (the log's first line holds this script's text)
            time.sleep(60)  # and then hangs: killed at the limit"""
    started = time.monotonic()
    row = module.run_stage(module.Stage("tests", 4, [sys.executable, "-c", script]), tmp_path, started + 60)
    assert row["status"] == "timeout after 4 s"
    assert time.monotonic() - started < 10
    assert "interrupted: 3 passed" in (tmp_path / "tests.log").read_text()
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker)


def test_a_benchmark_stopped_early_does_not_fail_the_run_and_keeps_its_rows(tmp_path, monkeypatch):
    """A benchmark cut by the budget or over its own limit is reported with the rows it printed; a failing benchmark
    or a required stage that did not finish fails the run."""
    module = _load_script()
    import time

    monkeypatch.setattr(module, "MIN_STAGE_SECONDS", 1)
    measure = "import json, time; print('row', json.dumps(dict(ms=1.5)), flush=True); time.sleep(5)"
    bench = module.Stage("bench", 50, [sys.executable, "-c", measure], required=False)
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    row = module.run_stage(bench, work, time.monotonic() + 1.5)  # 1 s left: started, then cut
    assert row["status"] == "cut at the budget after 1 s"
    over = module.run_stage(module.Stage("over", 1, bench.command, required=False), work, time.monotonic() + 60)
    assert over["status"] == "timeout after 1 s"
    broken = module.run_stage(module.Stage("broken", 50, [sys.executable, "-c", "raise SystemExit(3)"],
                                           required=False), work, time.monotonic() + 60)
    required = module.run_stage(module.Stage("tests", 50, bench.command), work, time.monotonic() + 1.5)
    assert module.summarize([row, over], work, out, True, time.monotonic()) == 0
    summary = (out / "summary.md").read_text()
    assert "## over: timeout after 1 s, the rows measured so far" in summary and 'row {"ms": 1.5}' in summary
    assert summary.startswith("# make gpu-check --dry: PASSED (benchmarks not finished: bench, over) in ")
    assert json.loads((out / "summary.json").read_text())["incomplete"] == ["bench", "over"]
    assert module.summarize([row, broken], work, out, True, time.monotonic()) == 1
    assert module.summarize([required], work, out, True, time.monotonic()) == 1


def test_a_skipped_gpu_test_fails_under_gpu_check():
    """conftest turns the skip of a test marked ``gpu`` into a failure when KALM_GPU_CHECK=1."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "probe"]
    base = dict(os.environ, KALM_GPU_CHECK_PROBE="1")
    checked = subprocess.run(cmd, cwd=ROOT, env=dict(base, KALM_GPU_CHECK="1"), capture_output=True, text=True)
    assert checked.returncode == 1 and "a GPU test was skipped under make gpu-check" in checked.stdout
    plain = subprocess.run(cmd, cwd=ROOT, env=dict(base, KALM_GPU_CHECK="0"), capture_output=True, text=True)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout


if PROBE:  # only inside test_a_skipped_gpu_test_fails_under_gpu_check
    @pytest.mark.gpu
    def test_probe_gpu_test_that_skips():
        pytest.skip("a GPU test that cannot run here")


def test_a_cuda_fault_ends_its_worker_and_the_rest_run_in_a_fresh_one(tmp_path):
    """Under make gpu-check a test whose CUDA error loses its process's context (an illegal address) ends its xdist
    worker, named once in the faults file: the tests after it run in a fresh worker instead of failing the same way;
    an ordinary failure does not end its worker."""
    faults = tmp_path / "faults.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-n", "1",
           str(Path(__file__)), "-k", "faulting_"]
    env = dict(os.environ, KALM_GPU_CHECK_FAULT_PROBE="1", KALM_GPU_CHECK="1", KALM_GPU_CHECK_FAULTS=str(faults))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "crashed while running" in proc.stdout and "test_faulting_1_illegal_address" in proc.stdout
    assert "2 failed, 1 passed" in proc.stdout, proc.stdout[-3000:]
    assert faults.read_text().splitlines() == [
        "tests/test_gpu_check.py::test_faulting_1_illegal_address: CUDA error: an illegal memory access was "
        "encountered"]


if FAULT_PROBE:  # only inside test_a_cuda_fault_ends_its_worker_and_the_rest_run_in_a_fresh_one
    def test_faulting_1_illegal_address():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    def test_faulting_2_ordinary_failure():
        assert os.getpid() == -1  # an ordinary failure: its worker carries on

    def test_faulting_3_after_the_fault():
        pass


def test_an_on_request_stage_runs_only_when_named(tmp_path):
    module = _load_script()
    on_request = [s.name for s in module.stages(dry=True, workers=1) if s.on_request]
    assert on_request == ["bench-attention-variants", "bench-attention-window", "bench-encode-budgets",
                          "bench-train-step-1024", "sanitize-native"]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "KALM_BENCH_OUT")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out), "--budget", "600", "--only",
                           "env", *on_request], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["env", *on_request]
    assert all(s["status"] == "ok" for s in stages), stages
    summary = (out / "summary.md").read_text()
    assert "### encode-budgets" in summary and "### train_step_1024" in summary and "## sanitize-native" in summary


def test_import_results_copies_only_the_gpu_reports(tmp_path):
    import io
    import tarfile

    module = _load_script()
    run, results = tmp_path / "out", tmp_path / "results"
    run.mkdir()
    results.mkdir()
    with tarfile.open(run / "gpu-check.tar.gz", "w:gz") as tar:
        for name in ("gpu-check/bench/attention-nvidia-h200.json", "gpu-check/bench/attention-nvidia-h200.md",
                     "gpu-check/bench/mean_pool-cpu.md", "gpu-check/tests.log"):
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    (run / "summary.md").write_text("# make gpu-check: PASSED")
    (run / "summary.json").write_text(json.dumps({"dry": True}))
    assert module.import_results(run, results) == 0
    assert sorted(p.name for p in results.iterdir()) == ["attention-nvidia-h200.json", "attention-nvidia-h200.md"]
    (run / "summary.json").write_text(json.dumps({"dry": False}))
    assert module.import_results(run, results) == 0
    assert sorted(p.name for p in results.iterdir()) == ["attention-nvidia-h200.json", "attention-nvidia-h200.md",
                                                         "gpu-check-summary.md"]
    assert (results / "attention-nvidia-h200.md").read_text() == "gpu-check/bench/attention-nvidia-h200.md"
    assert module.import_results(tmp_path / "missing", results) == 1


def test_reports_record_the_kernel_settings_they_ran_under(monkeypatch, tmp_path):
    """A benchmark's JSON and markdown name the ``KALM_*`` settings set when it ran (and only those)."""
    from benchmarks import harness
    from kalm_fast import _registry

    for name in _registry.KERNEL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KALM_ATTENTION_DQ", "atomic")
    monkeypatch.setenv("KALM_FUSED_DECODER", "1")
    monkeypatch.setenv("KALM_SOMETHING_ELSE", "x")
    path = harness.write_report("toy", [dict(a=1)], columns=["a"], out_dir=tmp_path)
    assert json.loads(path.read_text())["meta"]["settings"] == {"KALM_ATTENTION_DQ": "atomic",
                                                                "KALM_FUSED_DECODER": "1"}
    header = path.with_suffix(".md").read_text().splitlines()[0]
    assert header.endswith(", KALM_ATTENTION_DQ=atomic, KALM_FUSED_DECODER=1)"), header


def test_kernel_settings_name_every_setting_the_package_reads():
    """``KERNEL_SETTINGS`` (what reports and run.json record) holds every ``KALM_*`` name in kalm_fast's sources."""
    import re

    from kalm_fast import _registry

    names = {m for path in (ROOT / "kalm_fast").rglob("*.py") for m in re.findall(r"KALM_[A-Z_]+", path.read_text())}
    assert names == set(_registry.KERNEL_SETTINGS)



def test_max_batch_probe_keeps_the_last_batch_that_fit(monkeypatch, tmp_path):
    """``benchmarks.train_step --max-batch`` doubles B until a step runs out of memory and reports the B before."""
    import argparse

    import torch

    from benchmarks import train_step

    def fake_step(model, optimizer, backend, texts, chunk, device, st=None, synthetic=0):
        def step():
            if len(texts[0]) > limits[backend]:
                raise torch.OutOfMemoryError("fake")
        return step

    limits = {"auto": 40, "reference": 5}  # the warm-up step (B = 4) fits in both
    monkeypatch.setattr(train_step, "make_step", fake_step)
    monkeypatch.setattr(train_step.torch.cuda, "empty_cache", lambda: None)
    args = argparse.Namespace(backends=list(limits), negatives=1, synthetic=0, max_batch_gib=1.0, max_batch_start=8,
                              max_batch_cap=64, max_batch_len=4, max_batch_chunk=8)
    model = train_step.build_model(dict(train_step.TOY, num_hidden_layers=1), torch.device("cpu"))
    rows = train_step.largest_batches(model, args, torch.device("cpu"), tmp_path)
    assert [(r["backend"], r.get("batch"), r["chunk"] if "chunk" in r else None) for r in rows] == [
        ("auto: largest B", 32, 8), ("reference: largest B", None, None)]
    assert "B = 64 ran out of memory" in rows[0]["note"] and "B = 8 ran out of memory" in rows[1]["note"]


def test_train_step_fused_decoder_row(monkeypatch, tmp_path):
    """``benchmarks.train_step``'s ``auto (fused decoder)`` row runs the ``auto`` loss with KALM_FUSED_DECODER=1 for
    the step only; ``auto`` runs without it."""
    import os

    import torch

    from benchmarks import train_step

    seen = []
    monkeypatch.delenv("KALM_FUSED_DECODER", raising=False)
    monkeypatch.setattr(train_step, "run_step", lambda model, optimizer, loss_fn, *rest: seen.append(
        (loss_fn.options["backend"], os.environ.get("KALM_FUSED_DECODER"))))
    for backend in ("auto", f"auto{train_step.FUSED}"):
        train_step.make_step(None, None, backend, ([], []), 4, torch.device("cpu"))()
    assert seen == [("auto", None), ("auto", "1")] and "KALM_FUSED_DECODER" not in os.environ


def test_a_mistyped_stage_name_is_refused_before_anything_runs(tmp_path, capsys):
    module = _load_script()
    with pytest.raises(SystemExit) as exit_:
        module.main(["--dry", "--out", str(tmp_path / "out"), "--only", "build", "bench-atention"])
    assert exit_.value.code == 2
    assert "--only: unknown stage(s) bench-atention; the stages are env, build, tests" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_tarball_past_what_the_device_hands_back_keeps_each_files_end(tmp_path, monkeypatch):
    import tarfile

    module = _load_script()
    monkeypatch.setattr(module, "MAX_FILE_BYTES", 1 << 20)
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "tests.log").write_bytes(os.urandom(3 << 20) + b"the end of the log")  # random: gzip cannot shrink it
    (work / "bench" / "a.md").write_text("a table")
    module._pack(work, tmp_path / "gpu-check.tar.gz")
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as tar:
        log = tar.extractfile("gpu-check/tests.log").read()
        assert tar.extractfile("gpu-check/bench/a.md").read() == b"a table"
    assert len(log) == 1 << 20 and log.endswith(b"the end of the log")


def test_an_encode_implementation_that_fails_is_a_row_not_a_lost_report():
    """benchmarks.encode: a peer that fails its warm-up and an implementation that fails in a timed round are left
    out of the timings with their errors (rows of their own), and the others are still timed."""
    import numpy as np
    import torch

    from benchmarks import encode

    calls = {"n": 0}

    def ok(texts):
        return np.ones((len(texts), 2), np.float32)

    def no_export(texts):
        raise RuntimeError("no export")

    def dies_later(texts):
        calls["n"] += 1
        if calls["n"] > 1:  # the warm-up passes, the first timed round fails
            raise RuntimeError("died")
        return ok(texts)

    impls = {"kalm_fast float32": ok, "onnxruntime": no_export, "sentence-transformers": dies_later}
    times, outs, failed = encode.measure(impls, ["a", "b"], torch.device("cpu"), rounds=2)
    assert set(times) == set(outs) == {"kalm_fast float32"} and len(times["kalm_fast float32"]) == 2
    assert failed == {"onnxruntime": "failed: RuntimeError: no export",
                      "sentence-transformers": "failed in a timed round: RuntimeError: died"}
