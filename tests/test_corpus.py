"""Sharded, resumable corpus encoding: an interrupted encode resumes with every row exactly once."""
import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from kalm_fast.cli import encode as corpus
from kalm_fast.cli import main

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
    real_save = corpus._atomic_write
    calls = {"n": 0}

    def failing_write(path, write):
        calls["n"] += 1
        if calls["n"] == 4:
            write(path.with_name(f".{path.name}.99999.tmp"))  # a temp file a killed process would leave
            raise KeyboardInterrupt("killed")
        real_save(path, write)

    monkeypatch.setattr(corpus, "_atomic_write", failing_write)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        main(_args(jsonl, out))
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert not (out / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    monkeypatch.setattr(corpus, "_atomic_write", real_save)
    encoded = []
    real_encode = shared_encoder.encode
    monkeypatch.setattr(shared_encoder, "encode", lambda texts, **kw: encoded.append(len(texts)) or real_encode(texts, **kw))
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
    for rank in (1, 0):  # rank 0 last: its barrier would wait for rank 1
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(_args(jsonl, out)) == 0
        names = sorted(p.name for p in out.glob("shard-*"))
        if rank == 1:
            assert names == [f"shard-{i:05d}.safetensors" for i in (1, 3, 5)]
    _, rows, _ = _read_all(out)
    np.testing.assert_array_equal(rows, np.arange(N_TEXTS))
