"""``kalm-fast encode`` single-file output and its errors; one real subprocess run of the console entry point."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import kalm_fast
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
    (tmp_path / ".out.npy.4242.tmp").write_bytes(b"half of a killed run's output")
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
    ("missing.jsonl", '{"text": "ok"}\n{"title": "no text"}\n',
     "missing.jsonl:2: expected a JSON object with a 'text' field"),
    ("notstr.jsonl", '{"text": 5}\n', "notstr.jsonl:1: field 'text' must be a string"),
    ("list.jsonl", '["text"]\n', "list.jsonl:1: expected a JSON object"),
    ("empty.txt", "", "holds no texts"),
    ("nope.txt", None, "cannot read --input '{dir}/nope.txt': it does not exist"),
    ("data.csv", "a,b\n", "must be a .txt or .jsonl file"),
    ("latin1.txt", b"caf\xe9\n", "latin1.txt:1: not valid UTF-8"),
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
    assert message.format(dir=tmp_path) in err[0]
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


# ---------------------------------------------------------------- silently wrong, unclear or late (issue 14)
def _one_error(capsys, prog="encode"):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kalm-fast {prog}: error: "), err
    return err[0]


@pytest.fixture
def no_encoding(monkeypatch, reuse_encoder, shared_encoder):
    """Fails the test if any text is encoded: the error must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("encoded before the error")

    monkeypatch.setattr(shared_encoder, "encode", refuse)


@pytest.mark.parametrize("suffix", [".npy", "_dir"])
def test_a_lone_carriage_return_stays_inside_its_line(tmp_path, reuse_encoder, shared_encoder, suffix):
    txt = tmp_path / "in.txt"
    txt.write_bytes(b"a\rb\nc\r\nd")
    out = tmp_path / f"out{suffix}"
    assert main(["encode", "--input", str(txt), "--output", str(out), "--shard-size", "2"]) == 0
    got = np.load(out) if suffix == ".npy" else kalm_fast.load_embeddings(out)
    np.testing.assert_allclose(got, shared_encoder.encode(["a\rb", "c", "d"]), atol=1e-6)


def test_invalid_utf8_names_file_and_line(tmp_path, capsys, no_encoding):
    txt = tmp_path / "in.txt"
    txt.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    assert main(["encode", "--input", str(txt), "--output", str(tmp_path / "o.npy")]) == 2
    assert f"{txt}:3: not valid UTF-8 (byte 0xe9 at column 4" in _one_error(capsys)


def test_deeply_nested_json_is_a_line_error(tmp_path, capsys, no_encoding):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "ok"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert main(["encode", "--input", str(path), "--output", str(tmp_path / "o_dir")]) == 2
    assert f"{path}:2: JSON nested too deeply" in _one_error(capsys)
    path.write_text('{"text": "ok"}\n{"text": "b", "n": ' + "1" * 5000 + "}\n")  # past Python's int digit limit
    assert main(["encode", "--input", str(path), "--output", str(tmp_path / "o_dir")]) == 2
    assert f"{path}:2: unreadable JSON (Exceeds the limit" in _one_error(capsys)


@pytest.mark.parametrize("extra, message", [
    (["--max-tokens-per-batch", "-5"], "argument --max-tokens-per-batch: must be >= 1, got -5"),
    (["--truncate-dim", "0"], "argument --truncate-dim: must be >= 1, got 0"),
    (["--truncate-dim", "4000"], "--truncate-dim 4000 exceeds the model's 384 dimensions"),
    (["--shard-size", "0"], "argument --shard-size: must be >= 1, got 0"),
    (["--prompt-name", "nope"], "--prompt-name 'nope' is not one of the model's prompts"),
    (["--prompt", "x", "--task", "y"], "argument --task: not allowed with argument --prompt"),
    (["--device", "cuda:99"], "argument --device: device 'cuda:99'"),
    (["--device", "banana"], "argument --device: device 'banana' is not a device name"),
    (["--text-field", "body"], "--text-field 'body' is for .jsonl input"),
    (["--task", ""], "--task must be a non-empty instruction, got ''"),
    (["--task", "  "], "--task must be a non-empty instruction, got '  '"),
])
@pytest.mark.parametrize("suffix", [".npy", "_dir"])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, capsys, no_encoding, extra, message, suffix):
    txt = _write(tmp_path / "in.txt", "hello\n")
    out = tmp_path / f"out{suffix}"
    assert main(["encode", "--input", str(txt), "--output", str(out), *extra]) == 2
    assert message in _one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("make, out, message", [
    (lambda p: (p / "out.npy").mkdir(), "out.npy", "--output '{p}/out.npy' is an existing directory"),
    (lambda p: None, "out.parquet", "--output '{p}/out.parquet': unknown suffix '.parquet'"),
    (lambda p: (p / "out.npy").write_bytes(b"kept"), "out.npy/",
     "--output '{p}/out.npy/' ends in / (sharded output) but '{p}/out.npy' is an existing file"),
])
def test_an_output_path_that_is_not_what_it_says_is_refused(tmp_path, capsys, no_encoding, make, out, message):
    make(tmp_path)
    txt = _write(tmp_path / "in.txt", "hello\n")
    assert main(["encode", "--input", str(txt), "--output", str(tmp_path) + "/" + out]) == 2
    assert message.format(p=tmp_path) in _one_error(capsys)
    assert not (tmp_path / "out.parquet").exists()
    if out == "out.npy/":
        assert (tmp_path / "out.npy").read_bytes() == b"kept"


def test_a_trailing_slash_makes_a_shard_directory_whatever_its_name(tmp_path):
    assert not corpus.output_is_single(str(tmp_path / "embeddings.npy") + "/")
    assert corpus.output_is_single(str(tmp_path / "embeddings.npy"))


def test_an_unwritable_output_directory_is_refused_before_work(tmp_path, capsys, monkeypatch, no_encoding):
    import os

    txt = _write(tmp_path / "in.txt", "hello\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    for out in (locked / "o.npy", locked / "shards"):
        assert main(["encode", "--input", str(txt), "--output", str(out)]) == 2
        assert f"cannot write in '{locked}' (permission denied)" in _one_error(capsys)


def test_too_little_free_space_is_refused_before_work(tmp_path, capsys, monkeypatch, no_encoding):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    txt = _write(tmp_path / "in.txt", "hello\n" * 100)
    for out in ("o.npy", "o_dir"):
        assert main(["encode", "--input", str(txt), "--output", str(tmp_path / out)]) == 2
        assert "needs about 0.2 MB but only 0.0 MB are free" in _one_error(capsys)


def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(tmp_path, capsys, monkeypatch, reuse_encoder):
    import errno

    def full(f, array):
        raise OSError(errno.ENOSPC, "No space left on device", str(f.name))

    monkeypatch.setattr(np, "save", full)
    txt = _write(tmp_path / "in.txt", "hello\n")
    assert main(["encode", "--input", str(txt), "--output", str(tmp_path / "o.npy")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kalm-fast encode: error: No space left on device"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_a_truncated_model_file_is_one_line_naming_it(tmp_path, capsys):
    from train_utils import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    txt = _write(tmp_path / "in.txt", "hello\n")
    assert main(["encode", "--input", str(txt), "--output", str(tmp_path / "o.npy"), "--model", str(model)]) == 2
    assert f"{weights}" in _one_error(capsys)


def test_task_builds_the_kalm_query_format(tmp_path, reuse_encoder, shared_encoder):
    from kalm_fast.prompts import kalm_query_prompt

    txt = _write(tmp_path / "in.txt", "tallest mountain\nlongest river\n")
    task = "Given a question, retrieve passages that answer it"
    assert main(["encode", "--input", str(txt), "--output", str(tmp_path / "q.npy"), "--task", task]) == 0
    want = shared_encoder.encode(["tallest mountain", "longest river"], prompt=kalm_query_prompt(task))
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), want, atol=1e-6)
    assert not np.allclose(want, shared_encoder.encode(["tallest mountain", "longest river"]), atol=1e-3)


def test_titles_join_their_text_the_same_way_in_encode_corpus_and_eval_sets(tmp_path, shared_encoder, monkeypatch):
    from kalm_fast.train.data import load_eval_set, write_jsonl

    write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "title": "Mount Everest", "text": "the tallest mountain"}])
    write_jsonl(tmp_path / "q.jsonl", [{"query": "tallest?", "relevant": ["d"]}])
    doc = load_eval_set(tmp_path / "q.jsonl", tmp_path / "c.jsonl").docs[0]
    seen = []
    monkeypatch.setattr(shared_encoder, "encode", lambda texts, **kwargs: seen.extend(texts))
    shared_encoder.encode_corpus([{"title": "Mount Everest", "text": "the tallest mountain"}])
    assert seen == [doc] == ["Mount Everest the tallest mountain"]


def test_model_options_reach_the_encoder(tmp_path):
    """--prompt-name, --prompt, --no-normalize, --truncate-dim (above the model's saved cut) and --max-length give
    what ``Encoder.encode`` gives with the same options, on a model without a Normalize module."""
    from train_utils import make_tiny_model

    from kalm_fast.encode import Encoder

    model = tmp_path / "model"
    Encoder(make_tiny_model(tmp_path / "hf"), device="cpu", prompts={"query": "query: "}, truncate_dim=16).save(model)
    txt = _write(tmp_path / "in.txt", "\n".join(TEXTS) + "\n")
    out = tmp_path / "a.npy"
    assert main(["encode", "--model", str(model), "--input", str(txt), "--output", str(out), "--device", "cpu",
                 "--prompt-name", "query", "--no-normalize", "--truncate-dim", "24", "--max-length", "8"]) == 0
    short = Encoder(model, device="cpu", max_length=8)
    want = short.encode(TEXTS, prompt_name="query", truncate_dim=24, normalize_embeddings=False)
    got = np.load(out)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == (len(TEXTS), 24) and np.abs(np.linalg.norm(got, axis=1) - 1).max() > 0.1
    assert main(["encode", "--model", str(model), "--input", str(txt), "--output", str(out), "--device", "cpu",
                 "--prompt", "x: "]) == 0
    want = Encoder(model, device="cpu").encode(TEXTS, prompt="x: ", normalize_embeddings=True)
    np.testing.assert_allclose(np.load(out), want, atol=1e-6)
    assert want.shape == (len(TEXTS), 16)
