"""The sharded embedding directory that ``kalm-fast encode --output DIR`` writes, and its reader.

``DIR/shard-00000.safetensors``, ... hold ``embeddings [rows, dim]`` and ``row_ids [rows]``; each shard's
metadata carries the settings of its encode (``header``), its first row and row count, and the sha256 of its
rows. ``DIR/manifest.json`` (format ``kalm_fast.shards/1``) lists the settings, the row count and every shard's
rows, size and sha256. Every file is written atomically (``kalm_fast.files``).

``load_embeddings(DIR)`` checks the manifest against the files (size, sha256, row ids) and returns the rows in
input order.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from .files import atomic_write, atomic_write_text, digest, verify

FORMAT = "kalm_fast.shards/1"
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"^shard-(\d{5,})\.safetensors$")  # five digits at least: shard_path
# what a shard directory may hold besides shards and the manifest: the temp files of killed writes
TEMP_NAME = re.compile(r"^\.(shard-(\d{5,})\.safetensors|manifest\.json)\.\d+\.tmp$")


def shard_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"shard-{index:05d}.safetensors"


def rows_checksum(embeddings: np.ndarray, row_ids: np.ndarray) -> str:
    """sha256 of a shard's data (embeddings then row ids, as stored)."""
    h = hashlib.sha256(np.ascontiguousarray(embeddings).tobytes())
    h.update(np.ascontiguousarray(row_ids).tobytes())
    return h.hexdigest()


def write_shard(path: Path, embeddings: np.ndarray, start: int, header: dict) -> None:
    """One shard, atomically, with the checksum of its rows in its metadata."""
    embeddings = np.ascontiguousarray(embeddings)
    row_ids = np.arange(start, start + len(embeddings), dtype=np.int64)
    meta = {"header": json.dumps(header, sort_keys=True), "start": str(start), "rows": str(len(embeddings)),
            "sha256": rows_checksum(embeddings, row_ids)}
    atomic_write(path, lambda tmp: save_file({"embeddings": embeddings, "row_ids": row_ids}, str(tmp), metadata=meta))


def stored_header(path: Path) -> Optional[dict]:
    """The settings shard ``path`` was encoded with (its metadata only, no rows read); None if it is missing or
    unreadable."""
    try:
        with safe_open(str(path), "np") as f:
            return json.loads((f.metadata() or {})["header"])
    except Exception:  # noqa: BLE001  (missing, truncated, not safetensors, no header: not a usable shard)
        return None


def expected_rows(index: int, shard_size: int, count: int) -> tuple[int, int]:
    start = index * shard_size
    return start, min(shard_size, count - start)


def check_shard(path: Path, index: int, header: dict, manifest_entry: Optional[dict] = None) -> Optional[str]:
    """None if ``path`` is an intact shard ``index`` of the encode ``header``; else why it is damaged.

    Raises ``ValueError`` if it is an intact shard of another encode or of another position (copied or renamed):
    those are the user's files, never overwritten.
    """
    if manifest_entry is not None:
        problem = verify(path, manifest_entry)
        if problem:
            return f"{problem} recorded in {MANIFEST}"
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            embeddings, row_ids = f.get_tensor("embeddings"), f.get_tensor("row_ids")
        stored = json.loads(meta["header"])
        start, rows, checksum = int(meta["start"]), int(meta["rows"]), meta["sha256"]
    except Exception as exc:  # truncated, not safetensors, metadata missing: the file is not a usable shard
        return f"{path.name} is not a readable shard ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if rows_checksum(embeddings, row_ids) != checksum or len(row_ids) != rows:
        return f"{path.name}: its rows do not match the checksum in its header"
    if stored != header:
        diff = sorted(k for k in set(stored) | set(header) if stored.get(k) != header.get(k))
        raise ValueError(f"--output {str(path.parent)!r} holds shards of a different encode ({path.name} differs in "
                         f"{', '.join(diff)}); use a new directory")
    want_start, want_rows = expected_rows(index, header["shard_size"], header["count"])
    if (start, rows) != (want_start, want_rows) or not np.array_equal(row_ids, np.arange(start, start + rows)):
        raise ValueError(f"{path} holds rows {start}-{start + rows - 1} but shard {index} is rows {want_start}-"
                         f"{want_start + want_rows - 1} (copied or renamed?); delete it and rerun")
    return None


def read_manifest(directory: Path) -> Optional[dict]:
    """The kalm_fast manifest of ``directory`` (None if there is none); ValueError if ``manifest.json`` is another's."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kalm_fast shard manifest (format {FORMAT}); it is not overwritten: "
                         "use a new or empty directory")
    return manifest


def check_directory(directory: Path) -> None:
    """``directory`` holds nothing but kalm_fast shards, their manifest and temp files (or does not exist)."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"--output {str(directory)!r} exists and is not a directory")
    foreign = sorted(p.name for p in directory.iterdir()
                     if p.name != MANIFEST and not SHARD_NAME.match(p.name) and not TEMP_NAME.match(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"--output {str(directory)!r} is not empty and not a kalm_fast shard directory (it holds "
                         f"{shown}); use a new or empty directory")
    read_manifest(directory)


def write_manifest(directory: Path, header: dict, count: int, extra: dict) -> None:
    """``manifest.json`` (atomic): the settings, ``extra`` (e.g. the model's path), and every shard's digest."""
    entries = []
    n_shards = (count + header["shard_size"] - 1) // header["shard_size"]
    for index in range(n_shards):
        path = shard_path(directory, index)
        if not path.exists():
            raise ValueError(f"shard {path.name} is missing; rerun the same command to finish the encode")
        start, rows = expected_rows(index, header["shard_size"], count)
        entries.append(dict(file=path.name, start=start, rows=rows, **digest(path)))
    manifest = dict(format=FORMAT, **extra, header=header, count=count, dim=header["dim"], shards=entries)
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2))


def load_embeddings(path) -> np.ndarray:
    """The embeddings that ``kalm-fast encode`` wrote, ``[count, dim]`` float32 in input order.

    ``path``: a shard directory (every shard is checked against the manifest: size, sha256 and row ids; a missing
    or damaged one is a ``ValueError`` naming it), or a single ``.npy`` / ``.safetensors`` output file.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return load_file(str(path))["embeddings"]
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is neither a shard directory nor a .npy / .safetensors file")
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path} has no {MANIFEST}: the encode is unfinished (rerun it to finish)")
    out = np.empty((manifest["count"], manifest["dim"]), dtype=np.float32)
    next_row = 0
    for entry in manifest["shards"]:
        problem = verify(path / entry["file"], entry)
        if problem:
            raise ValueError(f"{path}: {problem} recorded in {MANIFEST}")
        data = load_file(str(path / entry["file"]))
        rows = np.arange(entry["start"], entry["start"] + entry["rows"])
        if entry["start"] != next_row or not np.array_equal(data["row_ids"], rows):
            raise ValueError(f"{path}: {entry['file']} does not hold rows {rows[0]}-{rows[-1]}")
        out[entry["start"]:entry["start"] + entry["rows"]] = data["embeddings"]
        next_row += entry["rows"]
    if next_row != manifest["count"]:
        raise ValueError(f"{path}: the shards hold {next_row} rows, the manifest says {manifest['count']}")
    return out
