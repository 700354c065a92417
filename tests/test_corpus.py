"""Sharded, resumable corpus encoding: an interrupted encode resumes with every row exactly once."""
import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from kalm_fast import shards
from kalm_fast.cli import encode as corpus
from kalm_fast.cli import main

_REAL_LOAD_ENCODER = corpus._load_encoder  # before the autouse fixture swaps it
N_TEXTS = 53
SHARD = 8


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "corpus.jsonl"
    lines = []
    for i in range(N_TEXTS):
        lines.append(json.dumps({"id": i, "text": f"document {i}: " + "word " * (i % 17)}))
        if i % 10 == 0:
            lines.append("")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shared_encoder():
    from kalm_fast.encode import Encoder

    return Encoder(device="cpu")


@pytest.fixture(autouse=True)
def reuse_encoder(monkeypatch, shared_encoder):
    """One model load for the whole module: the command's loader hands out the same Encoder."""
    monkeypatch.setattr(corpus, "_load_encoder", lambda args, device=None: shared_encoder)


def _read_all(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    rows, embs = [], []
    for entry in manifest["shards"]:
        data = load_file(str(directory / entry["file"]))
        assert len(data["row_ids"]) == entry["rows"]
        rows.append(data["row_ids"])
        embs.append(data["embeddings"])
    return manifest, np.concatenate(rows), np.concatenate(embs)


def _args(jsonl, out):
    return ["encode", "--input", str(jsonl), "--output", str(out), "--shard-size", str(SHARD), "--device", "cpu"]


def test_interrupted_encode_resumes_every_row_once(tmp_path, jsonl, monkeypatch, shared_encoder):
    assert main(_args(jsonl, tmp_path / "full")) == 0
    manifest, rows, full = _read_all(tmp_path / "full")
    assert manifest["count"] == N_TEXTS and manifest["dim"] == 384 and len(manifest["shards"]) == 7
    np.testing.assert_array_equal(rows, np.arange(N_TEXTS))
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines() if line]
    np.testing.assert_allclose(full, shared_encoder.encode(texts), atol=1e-5)

    # crash while writing the 4th shard: 3 finished shards stay, the 4th leaves only a temp file
    real_save = shards.atomic_write
    calls = {"n": 0}

    def failing_write(path, write):
        calls["n"] += 1
        if calls["n"] == 4:
            write(path.with_name(f".{path.name}.99999.tmp"))  # a temp file a killed process would leave
            raise KeyboardInterrupt("killed")
        real_save(path, write)

    monkeypatch.setattr(shards, "atomic_write", failing_write)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        main(_args(jsonl, out))
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert not (out / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    monkeypatch.setattr(shards, "atomic_write", real_save)
    encoded = []
    real_encode = shared_encoder.encode
    monkeypatch.setattr(shared_encoder, "encode",
                        lambda texts, **kw: encoded.append(len(texts)) or real_encode(texts, **kw))
    assert main(_args(jsonl, out)) == 0
    assert sum(encoded) == N_TEXTS - 3 * SHARD  # finished shards are not redone
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in before.items())
    assert not list(out.glob(".*.tmp"))
    manifest2, rows2, resumed = _read_all(out)
    np.testing.assert_array_equal(rows2, np.arange(N_TEXTS))
    np.testing.assert_array_equal(resumed, full)
    for entry in manifest2["shards"]:
        assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]


def test_resume_refuses_shards_of_another_encode(tmp_path, jsonl, capsys):
    out = tmp_path / "out"
    assert main(_args(jsonl, out)) == 0
    assert main(_args(jsonl, out) + ["--truncate-dim", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kalm-fast encode: error:") and "dim" in err[0]


def test_rank_split_covers_every_shard_once(tmp_path, jsonl, monkeypatch):
    """torchrun: rank r encodes shards i % world == r into one directory; rank 0 writes the manifest."""
    out = tmp_path / "split"
    monkeypatch.setattr(corpus, "_barrier", lambda world, rank: None)
    monkeypatch.setattr(corpus, "from_main", lambda info, obj: obj)  # rank 0's verdict: no process group here
    for rank in (1, 0):  # rank 0 last: its barrier would wait for rank 1
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(_args(jsonl, out)) == 0
        names = sorted(p.name for p in out.glob("shard-*"))
        if rank == 1:
            assert names == [f"shard-{i:05d}.safetensors" for i in (1, 3, 5)]
    _, rows, _ = _read_all(out)
    np.testing.assert_array_equal(rows, np.arange(N_TEXTS))


# ---------------------------------------------------------------- integrity on rerun (issue 14)
SMALL = 4


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(10)), encoding="utf-8")
    return path


def _small_args(path, out, *extra):
    return ["encode", "--input", str(path), "--output", str(out), "--shard-size", str(SMALL), "--device", "cpu",
            *extra]


def _one_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kalm-fast encode: error: "), err
    return err[0]


def test_a_damaged_shard_is_encoded_again_not_trusted(tmp_path, small, capsys):
    out = tmp_path / "out"
    assert main(_small_args(small, out)) == 0
    good = kalm_fast_load(out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte of the rows changed
    shard.write_bytes(bytes(data))
    assert main(_small_args(small, out)) == 0
    assert "shard-00001.safetensors" in capsys.readouterr().err
    np.testing.assert_array_equal(kalm_fast_load(out), good)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][1]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_a_damaged_shard_without_a_manifest_is_caught_by_its_own_checksum(tmp_path, small, capsys):
    out = tmp_path / "out"
    assert main(_small_args(small, out)) == 0
    good = kalm_fast_load(out)
    (out / "manifest.json").unlink()  # as after an interruption: only the shards' own checksums are left
    shard = out / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(_small_args(small, out)) == 0
    assert "shard-00000.safetensors: its rows do not match the checksum" in capsys.readouterr().err
    np.testing.assert_array_equal(kalm_fast_load(out), good)


def test_a_shard_copied_over_another_index_is_refused(tmp_path, small, capsys):
    out = tmp_path / "out"
    assert main(_small_args(small, out)) == 0
    (out / "manifest.json").unlink()
    (out / "shard-00001.safetensors").write_bytes((out / "shard-00000.safetensors").read_bytes())
    assert main(_small_args(small, out)) == 2
    assert "shard-00001.safetensors holds rows 0-3 but shard 1 is rows 4-7" in _one_error(capsys)


def test_other_weights_behind_the_same_model_path_are_another_encode(tmp_path, small, capsys):
    from train_utils import make_tiny_model

    model = make_tiny_model(tmp_path / "model", seed=0)
    out = tmp_path / "out"
    assert main(_small_args(small, out, "--model", str(model))) == 0  # (the module's encoder stands in for it)
    (out / "manifest.json").unlink()
    (out / "shard-00002.safetensors").unlink()  # an interrupted run
    make_tiny_model(tmp_path / "model", seed=1)  # new weights, same path
    capsys.readouterr()
    assert main(_small_args(small, out, "--model", str(model))) == 2
    assert "differs in model_sha256" in _one_error(capsys)


@pytest.mark.parametrize("content", ['{"note": "mine"}', "not json at all", '{"format": "other"}'])
def test_an_unrelated_manifest_is_never_overwritten(tmp_path, small, capsys, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    assert main(_small_args(small, out)) == 2
    assert "is not a kalm_fast shard manifest" in _one_error(capsys)
    assert (out / "manifest.json").read_text() == content and sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_a_directory_of_other_files_is_refused(tmp_path, small, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_small_args(small, out)) == 2
    assert "not empty and not a kalm_fast shard directory (it holds notes.txt)" in _one_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_lone_surrogate_is_refused_before_any_shard(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": f"t{i}"}) for i in range(9)] + ['{"text": "a\\ud800"}']
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(_small_args(path, out)) == 2
    assert "in.jsonl:10: 'text' holds '\\ud800' at character 2, a lone surrogate" in _one_error(capsys)
    assert not out.exists()


def test_a_named_pipe_is_read_once(tmp_path, small):
    import os
    import threading
    import time

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    content, stop = small.read_bytes(), threading.Event()

    def writer():
        with open(fifo, "wb") as f:
            f.write(content)
        while not stop.is_set():  # a reader that opens the pipe again gets an empty stream, not a hang
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        assert main(_small_args(fifo, tmp_path / "from-pipe")) == 0
    finally:
        stop.set()
        thread.join()
    assert main(_small_args(small, tmp_path / "from-file")) == 0
    np.testing.assert_array_equal(kalm_fast_load(tmp_path / "from-pipe"), kalm_fast_load(tmp_path / "from-file"))


def test_load_embeddings_reads_the_rows_in_order_and_checks_them(tmp_path, small, shared_encoder):
    import kalm_fast

    out = tmp_path / "out"
    assert main(_small_args(small, out)) == 0
    got = kalm_fast.load_embeddings(out)
    texts = [json.loads(line)["text"] for line in small.read_text().splitlines()]
    assert got.shape == (10, 384)
    np.testing.assert_allclose(got, shared_encoder.encode(texts), atol=1e-5)
    shard = out / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00002.safetensors does not match its sha256"):
        kalm_fast.load_embeddings(out)
    shard.unlink()
    with pytest.raises(ValueError, match="shard-00002.safetensors is missing"):
        kalm_fast.load_embeddings(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="has no manifest.json: the encode is unfinished"):
        kalm_fast.load_embeddings(out)


def kalm_fast_load(directory):
    return shards.load_embeddings(directory)


@pytest.mark.parametrize("extra, key", [
    (["--no-normalize", "--truncate-dim", "64"], "normalize"),
    (["--task", "Find the document"], "prompt"),
    (["--prompt", "passage: "], "prompt"),
    (["--max-length", "16"], "max_length"),
])
def test_a_rerun_with_other_settings_refuses_the_shards(tmp_path, small, capsys, monkeypatch, extra, key):
    """Every setting that changes the rows is part of what a shard must agree on: reusing shards encoded with other
    settings would silently mix two encodes in one output."""
    monkeypatch.setattr(corpus, "_load_encoder", _REAL_LOAD_ENCODER)  # --max-length must reach the model
    base = ["--truncate-dim", "64"] if "--truncate-dim" in extra else []
    out = tmp_path / "out"
    assert main(_small_args(small, out, *base)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(_small_args(small, out, *extra)) == 2
    assert key in _one_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "manifest.json").unlink()  # as after an interruption: each shard's own header decides
    assert main(_small_args(small, out, *extra)) == 2
    assert key in _one_error(capsys)


def test_a_truncated_shard_is_encoded_again_not_trusted(tmp_path, small, capsys):
    """A shard cut short (a disk that lost its tail, a copy that stopped) is not a finished shard."""
    out = tmp_path / "out"
    assert main(_small_args(small, out)) == 0
    good = kalm_fast_load(out)
    (out / "manifest.json").unlink()
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(_small_args(small, out)) == 0
    assert "shard-00001.safetensors is not a readable shard" in capsys.readouterr().err
    np.testing.assert_array_equal(kalm_fast_load(out), good)


def test_the_prompt_the_texts_got_decides_not_the_flags(tmp_path, small, capsys, monkeypatch, shared_encoder):
    """``--prompt ""`` (no prompt) and no flag (the model's default prompt) are two encodes, not one; the default
    prompt given by hand is the same encode (its shards are reused)."""
    monkeypatch.setattr(shared_encoder.model, "prompts", {"query": "", "document": "", "topic": "classify: "})
    monkeypatch.setattr(shared_encoder.model, "default_prompt_name", "topic")
    out = tmp_path / "out"
    assert main(_small_args(small, out)) == 0
    capsys.readouterr()
    assert main(_small_args(small, out, "--prompt", "")) == 2
    assert "holds the output of a different encode (differs in prompt)" in _one_error(capsys)
    (out / "manifest.json").unlink()  # as after an interruption: each shard's own header decides
    assert main(_small_args(small, out, "--prompt", "")) == 2
    assert main(_small_args(small, out, "--prompt", "classify: ")) == 0
    assert capsys.readouterr().out.startswith("encoded 0 of 10 texts")


def test_an_input_changed_during_the_encode_gets_no_manifest(tmp_path, small, capsys, monkeypatch):
    """The input is hashed when it is checked; a different hash once every shard is written (the file was edited
    while the model loaded or the shards were encoded) is an error, and no manifest vouches for the shards."""
    real = corpus._loaded

    def edit_then_load(args, device=None):
        with open(small, "a", encoding="utf-8") as f:
            f.write(json.dumps({"text": "a late text"}) + "\n")
        return real(args, device)

    monkeypatch.setattr(corpus, "_loaded", edit_then_load)
    out = tmp_path / "out"
    assert main(_small_args(small, out)) == 2
    assert f"--input '{small}' changed while it was encoded (its shards were removed); run again" in _one_error(capsys)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(corpus, "_loaded", real)
    assert main(_small_args(small, out)) == 0  # the rerun encodes the file as it is now
    assert len(kalm_fast_load(out)) == 11


def test_ranks_that_read_different_inputs_get_no_manifest(tmp_path, small, capsys, monkeypatch):
    """torchrun, ranks one after the other: rank 1 encodes the input, which is then edited (the same number of
    lines) before rank 0 reads it. Rank 0 finds rank 1's shards encoded from another input: they are removed, every
    rank gets the same error and no manifest vouches for the mix; the rerun encodes the input as it is."""
    monkeypatch.setattr(corpus, "_barrier", lambda world, rank: None)
    monkeypatch.setattr(corpus, "from_main", lambda info, obj: obj)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "1")
    assert main(_small_args(small, out)) == 0
    small.write_text(small.read_text().replace("text number 5", "text number V"))
    monkeypatch.setenv("RANK", "0")
    capsys.readouterr()
    assert main(_small_args(small, out)) == 2
    assert "1 of 3 shards were encoded from another input or model than the others" in _one_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors", "shard-00002.safetensors"]
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert main(_small_args(small, out)) == 0
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    whole = tmp_path / "whole"
    assert main(_small_args(small, whole)) == 0
    np.testing.assert_array_equal(kalm_fast_load(out), kalm_fast_load(whole))


def test_under_torchrun_each_rank_encodes_on_its_own_gpu(tmp_path, small, monkeypatch):
    """--device cuda (or none) is cuda:LOCAL_RANK on every rank, as in training; cuda:N is refused there."""
    import torch

    class Loaded(Exception):
        pass

    def capture(args, device=None):
        raise Loaded(device)

    monkeypatch.setattr(corpus, "_loaded", capture)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    from kalm_fast.cli import build_parser

    args = build_parser("encode").parse_args(_small_args(small, tmp_path / "out"))
    for device, want in (("cuda", "cuda:1"), (None, "cuda:1"), ("cpu", "cpu")):
        args.device = device
        with pytest.raises(Loaded) as loaded:
            corpus.encode_sharded(args, small, tmp_path / "out")
        assert loaded.value.args[0] == want
    args.device = "cuda:0"
    with pytest.raises(ValueError, match="under torchrun every rank computes on cuda:LOCAL_RANK"):
        corpus.encode_sharded(args, small, tmp_path / "out")


def test_two_ranks_under_torchrun_equal_one_process(tmp_path, small):
    """A real 2-process torchrun (gloo): each rank encodes its shards, rank 0's verdict reaches both, rank 0 writes
    the manifest; the rows equal a one-process encode's."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "kalm_fast.cli", *_small_args(small, tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert main(_small_args(small, tmp_path / "one")) == 0
    np.testing.assert_allclose(kalm_fast_load(tmp_path / "two"), kalm_fast_load(tmp_path / "one"), atol=1e-6)
