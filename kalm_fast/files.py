"""Files that are never half-written and inputs that fail at ``file:line``.

Writes: ``atomic_write(path, write)`` writes a temporary file next to ``path``, fsyncs it, renames it over ``path``
and fsyncs the directory, so after a crash ``path`` holds either the old or the new content, never a mix;
``publish_dir`` does the same for a directory built under a temporary name. Temporary names start with ``.`` and
end with ``.tmp``; ``remove_leftovers`` deletes those a killed process left. ``digest`` (size and sha256) is what
manifests record and what is checked before a file is trusted again. ``write_resumable`` writes a long output a
chunk at a time, so that a run interrupted at any point continues after its last finished chunk.

Reads: ``read_lines`` splits on ``\\n`` only (a lone ``\\r`` inside a line is text, ``\\r\\n`` is a line end) and
names the file and line of invalid UTF-8; ``parse_json_line`` does the same for invalid or too deeply nested JSON,
and ``check_unicode`` for JSON escapes that are not Unicode (lone surrogates such as ``"\\ud800"``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator


def fsync_dir(directory) -> None:
    """Make a rename or a new entry in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_name(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes through (unique per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _new_file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file: 0o666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then fsync, rename over ``path`` and fsync the directory; the temp file goes on failure. The
    file gets a new file's usual permissions, whatever ``write`` created (safetensors writes owner-only files)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sync_tree(directory) -> None:
    """fsync every file and directory under ``directory`` (before it is renamed into place)."""
    for root, _, names in os.walk(directory):
        for name in names:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def publish_dir(tmp, target) -> None:
    """Rename the finished directory ``tmp`` to ``target`` (which must not exist) durably."""
    sync_tree(tmp)
    os.replace(tmp, target)
    fsync_dir(Path(target).parent)


def remove_leftovers(directory, pattern: str = ".*.tmp") -> list:
    """Delete the temporary files and directories matching ``pattern`` a killed run left; returns their names."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for item in directory.glob(pattern):
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
        removed.append(item.name)
    return removed


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file."""
    return dict(size=os.path.getsize(path), sha256=sha256_file(path))


def verify(path, expected: dict, name: str | None = None) -> str | None:
    """Why ``path`` (called ``name`` in the message) does not match ``expected`` (``digest``'s size and sha256), or
    None when it does."""
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{name} has {size} bytes, expected {expected['size']}"
    if sha256_file(path) != expected["sha256"]:
        return f"{name} does not match its sha256"
    return None


def check_writable_dir(directory, what: str) -> None:
    """``directory`` (or, if it does not exist yet, its nearest existing parent) accepts new files."""
    directory = Path(directory).absolute()
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what}: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in {str(probe)!r} (permission denied)")


def check_free_space(directory, needed: int, what: str) -> None:
    """At least ``needed`` bytes are free on the disk of ``directory`` (or of its nearest existing parent)."""
    probe = Path(directory).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ValueError(f"{what}: needs about {needed / 1e6:.1f} MB but only {free / 1e6:.1f} MB are free on the "
                         f"disk of {str(probe)!r}")


def read_lines(path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of a UTF-8 file, streamed, without its ``\\n`` / ``\\r\\n``.

    Only ``\\n`` ends a line (a lone ``\\r`` stays in the text); a UTF-8 byte order mark is dropped; invalid UTF-8
    raises ``ValueError`` naming the file, line and column.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            yield number, decode_line(path, number, raw)


def decode_line(path, number: int, raw: bytes) -> str:
    """One line's bytes as text (a byte order mark on line 1 dropped); ValueError at ``file:line:column``."""
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                         f"{exc.start + 1}: {exc.reason})") from None


def parse_json_line(path, number: int, line: str):
    """The JSON value of one line; invalid, too deeply nested or unreadable JSON raises ``ValueError`` at
    ``file:line``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}:{number}: JSON nested too deeply") from None
    except ValueError as exc:  # valid JSON Python will not read, e.g. an integer past its 4300-digit limit
        raise ValueError(f"{path}:{number}: unreadable JSON ({exc})") from None


def check_unicode(path, number: int, key: str, text: str) -> str:
    """``text`` as it is, or ``ValueError`` if a JSON escape made it invalid Unicode (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{path}:{number}: {key!r} holds {text[exc.start]!r} at character {exc.start + 1}, a lone "
                         "surrogate escape that is not valid Unicode") from None
    return text


RESUMABLE_FORMAT = "kalm_fast.resumable/1"


def _resume_point(partial: Path, state_path: Path, settings: dict) -> tuple[int, int]:
    """``(items done, bytes of them)`` of an earlier run of ``settings``, else ``(0, 0)``."""
    try:
        state = json.loads(state_path.read_text())
        if (state.get("format") == RESUMABLE_FORMAT and state.get("settings") == settings
                and partial.stat().st_size >= state["bytes"]):
            return int(state["items"]), int(state["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 0, 0


def write_resumable(output, settings: dict, items: Iterable, count: int, render: Callable[[list], str], *,
                    chunk: int, final_check: Callable[[], None] = lambda: None, desc: str = "",
                    show_progress: bool = True) -> int:
    """Write ``render(c)`` for each chunk ``c`` of ``chunk`` items of ``items`` (``count`` of them, from the first)
    to ``output``, as ``.NAME.partial`` beside it: each chunk is fsynced, then its progress recorded in
    ``.NAME.partial.json`` (with ``settings``, a JSON-able dict of everything the output depends on). When the
    items are written, ``final_check()`` (which may raise) runs and the partial file is renamed to ``output``; with
    another number of items, a ``ValueError``. A run with the same settings continues after the last
    recorded chunk (the items before it are skipped unrendered); other settings start over. Returns how many items
    an earlier run had finished."""
    from tqdm.auto import tqdm

    output = Path(output)
    partial = output.with_name(f".{output.name}.partial")
    state_path = output.with_name(f".{output.name}.partial.json")
    done, size = _resume_point(partial, state_path, settings)
    if not done:  # a fresh start: no earlier progress record may ever describe the new partial file
        state_path.unlink(missing_ok=True)
        fsync_dir(output.parent)
    resumed_at, seen = done, 0
    with open(partial, "r+b" if done else "wb") as out, \
            tqdm(total=count, initial=done, desc=desc, disable=not show_progress) as progress:
        out.truncate(size)
        out.seek(size)

        def write(batch: list):
            nonlocal done
            out.write(render(batch).encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
            done += len(batch)
            atomic_write_text(state_path, json.dumps(dict(format=RESUMABLE_FORMAT, settings=settings, items=done,
                                                          bytes=out.tell())))
            progress.update(len(batch))

        batch = []
        for seen, item in enumerate(items, start=1):
            if seen > done:
                batch.append(item)
            if len(batch) == chunk:
                write(batch)
                batch = []
        if batch:
            write(batch)
    final_check()  # first: the caller's own words for an input that changed
    if seen != count:
        raise ValueError(f"expected {count} items, got {seen}: the input changed during the run; run again")
    os.replace(partial, output)
    fsync_dir(output.parent)
    state_path.unlink()
    return resumed_at
