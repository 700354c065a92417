"""Every ``kalm-fast`` subcommand answers bad input with one line ``kalm-fast CMD: error: ...`` and exit code 2,
before any work; ``--version``; the demo from what a wheel installs (issue 16 item 5, issue 14)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from train_utils import make_tiny_model

import kalm_fast
from kalm_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _one_error(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kalm-fast {command}: error: "), err
    return err[0]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kalm-fast {kalm_fast.__version__}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "q.jsonl").write_text(json.dumps({"query": "a", "relevant": ["d1"]}) + "\n")
    (root / "c.jsonl").write_text(json.dumps({"id": "d1", "text": "one"}) + "\n")
    for i in range(2):
        save_file({"w": torch.full((2, 2), float(i))}, str(root / f"ck{i}.safetensors"))
    save_file({"w": torch.tensor([[1.0, float("nan")], [0.0, 0.0]])}, str(root / "nan.safetensors"))
    (root / "busy").mkdir()
    (root / "busy/x").write_text("x")
    (root / "bad.yaml").write_text("stages:\n  - {name: s, data: x.jsonl, steps: 2, max_grad_norm: -1}\n")
    (root / "nodata.yaml").write_text(f"output_dir: {root}/out\nstages:\n  - {{name: s, data: {root}/missing.jsonl, "
                                      "steps: 2}\n")
    return root


@pytest.mark.parametrize("command, argv, message", [
    ("encode", ["encode", "--input", "x.txt", "--output", "o.npy", "--bogus"], "unrecognized arguments: --bogus"),
    ("eval", ["eval", "--queries", "{d}/q.jsonl", "--corpus", "{d}/c.jsonl", "--k", "0"],
     "argument --k: must be >= 1, got 0"),
    ("eval", ["eval", "--queries", "{d}/nope.jsonl", "--corpus", "{d}/c.jsonl"],
     "cannot read --queries '{d}/nope.jsonl': it does not exist"),
    ("eval", ["eval", "--queries", "{d}/q.jsonl", "--corpus", "{d}/c.jsonl", "--device", "cuda:99"],
     "argument --device: device 'cuda:99'"),
    ("eval", ["eval", "--queries", "{d}/q.jsonl", "--corpus", "{d}/c.jsonl", "--output", "{d}/busy"],
     "--output '{d}/busy' is a directory"),
    ("soup", ["soup", "{d}/ck0.safetensors", "{d}/ck1.safetensors", "--weights", "1", "--output", "{d}/s.safetensors"],
     "--weights has 1 value(s) for 2 checkpoints"),
    ("soup", ["soup", "{d}/ck0.safetensors", "{d}/nan.safetensors", "--output", "{d}/s.safetensors"],
     "tensor 'w' of {d}/nan.safetensors holds NaN or inf values"),
    ("soup", ["soup", "{d}/ck0.safetensors", "{d}/ck1.safetensors", "--output", "{d}/s.parquet"],
     "output must be a .safetensors file path"),
    ("train", ["train", "{d}/missing.yaml"], "cannot read config '{d}/missing.yaml': it does not exist"),
    ("ablate", ["ablate", "{d}/missing.yaml"], "cannot read config '{d}/missing.yaml': it does not exist"),
    ("train", ["train", "{d}/bad.yaml"], "bad.yaml: stages[0] ('s'): 'max_grad_norm' must be > 0 (or null), got -1.0"),
    ("train", ["train", "{d}/nodata.yaml"], "stage 's': data: file not found: {d}/missing.jsonl"),
    ("demo", ["demo", "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
    ("demo", ["demo", "--corpus", "{d}/none.txt"], "cannot read --corpus '{d}/none.txt': it does not exist"),
    ("demo", ["demo", "--device", "cuda:99"], "argument --device: device 'cuda:99'"),
    ("bench", ["bench", "nonsense"], "unknown benchmark(s) nonsense; expected some of"),
    ("score", ["score", "--model", "{d}", "--input", "{d}/q.jsonl", "--output", "{d}/o.jsonl", "--instruction",
               "retrieval"], "argument --instruction: expected TASK=INSTRUCTION, got 'retrieval'"),
    ("score", ["score", "--model", "{d}", "--input", "{d}/q.jsonl", "--output", "{d}/o.jsonl"],
     "q.jsonl:1: missing 'pos'"),
    ("score", ["score", "--model", "{d}", "--input", "{d}/none.jsonl", "--output", "{d}/o.jsonl"],
     "cannot read --input '{d}/none.jsonl': it does not exist"),
    ("score", ["score", "--input", "{d}/q.jsonl", "--output", "{d}/o.jsonl"],
     "the following arguments are required: --model"),
    ("mine", ["mine", "--model", "{d}", "--input", "{d}/q.jsonl", "--output", "{d}/o.jsonl", "--range", "9"],
     "argument --range: expected 2 arguments"),
    ("mine", ["mine", "--model", "{d}", "--input", "{d}/q.jsonl", "--output", "{d}/o.jsonl", "--corpus",
              "{d}/none.txt"], "cannot read --corpus '{d}/none.txt': it does not exist"),
    ("mine", ["mine", "--model", "{d}", "--input", "{d}/q.jsonl", "--output", "{d}/o.jsonl"],
     "q.jsonl:1: missing 'pos'"),
])
def test_bad_input_is_one_line_and_exit_2(files, capsys, command, argv, message):
    assert main([a.format(d=files) for a in argv]) == 2
    assert message.format(d=files) in _one_error(capsys, command)
    assert not (files / "s.safetensors").exists()


def test_train_on_a_previous_run_and_soup_into_a_busy_directory(files, tmp_path, capsys):
    model = make_tiny_model(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "pos": [f"p{i}"]}) + "\n"
                                              for i in range(4)))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {model}\noutput_dir: {tmp_path / 'out'}\nmax_length: 16\nstages:\n"
                      f"  - {{name: s, data: {tmp_path / 'd.jsonl'}, steps: 1, batch_size: 2, hard_negatives: 0}}\n")
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    assert "holds a previous run (stages s); pass --resume" in _one_error(capsys, "train")
    assert main(["soup", str(tmp_path / "out/s/final"), str(model), "--output", str(files / "busy")]) == 2
    assert "output directory" in _one_error(capsys, "soup") and (files / "busy/x").read_text() == "x"


def test_demo_runs_from_what_a_wheel_installs(tmp_path):
    """``setup.py build_py`` lays out the package as a wheel holds it (package data included); the demo runs there,
    away from the checkout."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(site)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    for native in (ROOT / "kalm_fast").glob("_C*.so"):  # the wheel's compiled module, built here already
        shutil.copy(native, site / "kalm_fast" / native.name)
    model = make_tiny_model(tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "kalm_fast.cli", "demo", "--model", str(model), "--top-k", "1",
                           "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "encoded 295 texts" in done.stdout and done.stdout.count("query: ") == 8
    assert str(ROOT) not in done.stdout + done.stderr


@pytest.mark.parametrize("only, codes, rc", [(["attention", "encode"], [-11, 0], 1),
                                             (["attention", "encode"], [0, 0], 0), ([], [-9], 1), ([], [0], 0)])
def test_bench_exits_1_when_a_benchmark_fails_or_is_killed(monkeypatch, only, codes, rc):
    """A benchmark killed by a signal (a negative return code) fails the command as one that exits 1 does."""
    from types import SimpleNamespace

    from kalm_fast.cli import bench

    calls = iter(codes)
    monkeypatch.setattr(bench.subprocess, "call", lambda *args, **kwargs: next(calls))
    assert bench.run(SimpleNamespace(only=only)) == rc
