"""``kalm-fast encode`` single-file output and its errors; one real subprocess run of the console entry point."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from kalm_fast.cli import encode as corpus
from kalm_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["first line", "second line, a bit longer", "", "日本語の行", "last"]


@pytest.fixture(scope="module")
def shared_encoder():
    from kalm_fast.encode import Encoder

    return Encoder(device="cpu")


@pytest.fixture
def reuse_encoder(monkeypatch, shared_encoder):
    monkeypatch.setattr(corpus, "_load_encoder", lambda args, device=None: shared_encoder)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_to_npy_and_jsonl_to_safetensors(tmp_path, reuse_encoder, shared_encoder, capsys):
    want = shared_encoder.encode(TEXTS)
    txt = _write(tmp_path / "in.txt", "\n".join(TEXTS) + "\n")
    assert main(["encode", "--input", str(txt), "--output", str(tmp_path / "out.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-6)
    assert "texts/s" in capsys.readouterr().out
    jsonl = _write(tmp_path / "in.jsonl", "\n".join(json.dumps({"body": t}) for t in TEXTS))
    out = tmp_path / "out.safetensors"
    assert main(["encode", "--input", str(jsonl), "--output", str(out), "--text-field", "body",
                 "--truncate-dim", "32"]) == 0
    got = load_file(str(out))["embeddings"]
    assert got.shape == (len(TEXTS), 32)
    want = shared_encoder.encode(TEXTS, truncate_dim=32, normalize_embeddings=True)  # the CLI normalizes by default
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "in.txt", "out.npy", "out.safetensors"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:3: invalid JSON"),
    ("missing.jsonl", '{"text": "ok"}\n{"title": "no text"}\n', "missing.jsonl:2: expected a JSON object with a 'text' field"),
    ("notstr.jsonl", '{"text": 5}\n', "notstr.jsonl:1: field 'text' must be a string"),
    ("list.jsonl", '["text"]\n', "list.jsonl:1: expected a JSON object"),
    ("empty.txt", "", "holds no texts"),
    ("nope.txt", None, "cannot read --input"),
    ("data.csv", "a,b\n", "must be a .txt or .jsonl file"),
    ("latin1.txt", b"caf\xe9\n", "not valid UTF-8"),
])
@pytest.mark.parametrize("suffix", [".npy", ".safetensors", "_dir"])
def test_bad_input_is_one_line_error_and_no_output(tmp_path, capsys, reuse_encoder, name, content, message, suffix):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        _write(path, content)
    out = tmp_path / f"out{suffix}"
    assert main(["encode", "--input", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kalm-fast encode: error: "), err
    assert message in err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_model_is_one_line_error(tmp_path, capsys):
    txt = _write(tmp_path / "in.txt", "hello\n")
    assert main(["encode", "--input", str(txt), "--output", str(tmp_path / "o.npy"), "--model",
                 str(tmp_path / "missing-model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load --model" in err[0]
    assert not (tmp_path / "o.npy").exists()


def test_real_subprocess_offline(tmp_path, shared_encoder):
    txt = _write(tmp_path / "in.txt", "\n".join(TEXTS) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "kalm_fast.cli", "encode", "--input", str(txt), "--output", str(tmp_path / "o.npy")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "texts/s" in done.stdout
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), shared_encoder.encode(TEXTS), atol=1e-5)
    bad = _write(tmp_path / "bad.jsonl", '{"text": "a"}\nnot json\n')
    done = subprocess.run(cmd[:5] + [str(bad), "--output", str(tmp_path / "b.npy")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("kalm-fast encode: error: ")
    assert "bad.jsonl:2" in done.stderr and not (tmp_path / "b.npy").exists()
