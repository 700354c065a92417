"""Durable writes (temp file, fsync, rename, fsync of the directory) and line-exact reading (issue 14)."""
import json
import os

import numpy as np
import pytest

from kalm_fast import files, shards


def _record_syscalls(monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return events


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = _record_syscalls(monkeypatch)
    target = tmp_path / "out.json"
    files.atomic_write_text(target, "{}")
    tmp = files.temp_name(target).name
    assert events == [("fsync", tmp), ("rename", tmp, "out.json"), ("fsync", tmp_path.name)]
    assert target.read_text() == "{}"


def test_publish_dir_fsyncs_every_file_and_directory_before_the_rename(tmp_path, monkeypatch):
    tmp = tmp_path / ".model.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.bin").write_bytes(b"a")
    (tmp / "sub/b.bin").write_bytes(b"b")
    events = _record_syscalls(monkeypatch)
    files.publish_dir(tmp, tmp_path / "model")
    rename = events.index(("rename", ".model.tmp", "model"))
    assert {("fsync", "a.bin"), ("fsync", "b.bin"), ("fsync", "sub"), ("fsync", ".model.tmp")} <= set(events[:rename])
    assert events[rename + 1:] == [("fsync", tmp_path.name)]


def test_a_crash_before_the_rename_keeps_the_old_content_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """What scores.json, manifest.json, run.json and the eval metrics are written with."""
    target = tmp_path / "scores.json"
    target.write_text('{"a": 1}')

    def crash(path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(files, "fsync_file", crash)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write_text(target, '{"a": 1, "b": 2}')
    assert target.read_text() == '{"a": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def test_the_trainer_and_the_shard_manifest_write_atomically(tmp_path, monkeypatch):
    from kalm_fast.train.config import config_from_dict
    from kalm_fast.train.trainer import Trainer

    trainer = Trainer(config_from_dict(dict(output_dir=str(tmp_path), stages=[dict(name="s", data="x", steps=1)])))
    trainer._record_score("a", 0.5)
    header = dict(shard_size=2, count=2, dim=3)
    shards.write_shard(shards.shard_path(tmp_path, 0), np.ones((2, 3), np.float32), 0, header)
    shards.write_manifest(tmp_path, header, 2, {})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(files, "fsync_file", lambda path: (_ for _ in ()).throw(OSError(28, "full", str(path))))
    with pytest.raises(OSError):
        trainer._record_score("b", 0.7)
    with pytest.raises(OSError):
        shards.write_manifest(tmp_path, dict(header, dim=3), 2, {"note": "new"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads(before["scores.json"]) == {"a": 0.5}


def test_read_lines_splits_on_newline_only(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfa\rb\r\nc\n\nd")
    assert list(files.read_lines(path)) == [(1, "a\rb"), (2, "c"), (3, ""), (4, "d")]


def test_remove_leftovers(tmp_path):
    (tmp_path / ".x.1.tmp").write_text("")
    (tmp_path / ".d.tmp").mkdir()
    (tmp_path / "keep.json").write_text("")
    assert sorted(files.remove_leftovers(tmp_path)) == [".d.tmp", ".x.1.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_shard_directories_past_99999_shards_are_still_recognized(tmp_path):
    """``shard_path`` writes six digits from shard 100000 on; resuming must still recognize those files."""
    for index in (99_999, 100_000):
        shards.shard_path(tmp_path, index).write_bytes(b"")
    (tmp_path / ".shard-100000.safetensors.123.tmp").write_bytes(b"")
    shards.check_directory(tmp_path)
    (tmp_path / "shard-1.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="shard-1.safetensors"):
        shards.check_directory(tmp_path)


def test_atomic_writes_get_a_new_files_usual_permissions(tmp_path):
    """safetensors creates owner-only files; what kalm_fast writes is readable as any file the user creates."""
    plain = tmp_path / "plain"
    plain.write_text("x")
    target = tmp_path / "out.safetensors"
    files.atomic_write(target, lambda tmp: (tmp.write_bytes(b"x"), os.chmod(tmp, 0o600)))
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    old = os.umask(0o077)
    try:
        files.atomic_write(target, lambda tmp: tmp.write_bytes(b"y"))
        assert target.stat().st_mode & 0o777 == 0o600  # a stricter umask is honoured
    finally:
        os.umask(old)


def test_load_embeddings_refuses_a_shard_that_holds_other_rows(tmp_path):
    """A manifest written over a shard copied to another index (so its size and sha256 match) must still not put
    rows 0-3 where rows 4-7 belong: each shard's row ids are checked too."""
    header = dict(shard_size=4, count=10, dim=3)
    rows = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    for index in range(3):
        shards.write_shard(shards.shard_path(tmp_path, index), rows[4 * index:4 * index + 4], 4 * index, header)
    shards.write_manifest(tmp_path, header, 10, {})
    np.testing.assert_array_equal(shards.load_embeddings(tmp_path), rows)
    shards.shard_path(tmp_path, 1).write_bytes(shards.shard_path(tmp_path, 0).read_bytes())
    shards.write_manifest(tmp_path, header, 10, {})
    with pytest.raises(ValueError, match="shard-00001.safetensors does not hold rows 4-7"):
        shards.load_embeddings(tmp_path)
