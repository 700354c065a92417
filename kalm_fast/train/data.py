"""Training and evaluation data: JSONL records, validated, indexed by byte offset, read on demand.

Training record (one JSON object per line, FlagEmbedding-style)::

    {"query": str, "pos": [str, ...], "neg": [str, ...], "task": str, "instruction": str (optional)}

``pos`` needs at least one text; ``neg`` may be empty or absent (then only in-batch negatives).
``task`` defaults to the file's stem. The files are scanned once to validate every line and to
remember where each record starts; records are then read back one at a time (``seek``), so memory
holds offsets, not texts.

Evaluation set: queries JSONL ``{"id"?, "query": str, "relevant": [doc_id, ...] or {doc_id: grade},
"instruction"?: str}`` and a corpus JSONL ``{"id": str, "text": str, "title"?: str}``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..prompts import format_query


def _fail(path, line_no: int, msg: str):
    raise ValueError(f"{path}:{line_no}: {msg}")


def _check_texts(path, line_no, obj, key, *, required: bool):
    value = obj.get(key)
    if value is None:
        if required:
            _fail(path, line_no, f"missing {key!r} (expected a list of strings)")
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        _fail(path, line_no, f"{key!r} must be a list of strings, got {type(value).__name__}")
    if required and not value:
        _fail(path, line_no, f"{key!r} must hold at least one text")
    return value


def parse_train_line(path, line_no: int, line: str, default_task: str) -> dict:
    """Validate one training JSONL line and return the normalized record (``pos``/``neg`` lists)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        _fail(path, line_no, f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        _fail(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        _fail(path, line_no, "'query' must be a non-empty string")
    pos = _check_texts(path, line_no, obj, "pos", required=True)
    neg = _check_texts(path, line_no, obj, "neg", required=False)
    task = obj.get("task", default_task)
    if not isinstance(task, str) or not task:
        _fail(path, line_no, "'task' must be a non-empty string")
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        _fail(path, line_no, "'instruction' must be a string")
    return dict(query=query, pos=pos, neg=neg, task=task, instruction=instruction)


@dataclass
class TrainIndex:
    """Where every record of some JSONL files starts, grouped by task. Texts stay on disk."""

    files: list
    offsets: list = field(default_factory=list)   # (file number, byte offset, line number) per record
    tasks: dict = field(default_factory=dict)      # task -> list of record ids
    num_negatives: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)


class TrainData:
    """Random access to validated training records of one or several JSONL files.

    ``TrainData(["a.jsonl", "b.jsonl"], instructions={"task": "..."})``; ``data[i]`` -> record dict with
    ``task`` and ``instruction`` filled in; ``data.tasks`` -> ``{task: [record ids]}``.
    """

    def __init__(self, files, *, instructions: Optional[dict] = None, min_negatives: int = 0):
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("data: expected at least one JSONL file")
        self.instructions = dict(instructions or {})
        self.index = TrainIndex(files=self.files)
        for file_no, path in enumerate(self.files):
            self._scan(file_no, path, min_negatives)
        if len(self.index) == 0:
            raise ValueError(f"data: no records in {[str(f) for f in self.files]}")
        self._handles: dict = {}

    def _scan(self, file_no: int, path: Path, min_negatives: int):
        if not path.is_file():
            raise ValueError(f"data: file not found: {path}")
        with open(path, "rb") as fh:
            offset, line_no = 0, 0
            for raw in fh:
                line_no += 1
                start, offset = offset, offset + len(raw)
                text = raw.decode("utf-8").strip()
                if not text:
                    continue
                rec = parse_train_line(path, line_no, text, path.stem)
                if min_negatives > 0 and not rec["neg"]:
                    _fail(path, line_no, f"no hard negatives ('neg'), but the stage asks for {min_negatives} "
                                         "per query (set hard_negatives: 0 to train with in-batch negatives only)")
                rid = len(self.index.offsets)
                self.index.offsets.append((file_no, start, line_no))
                self.index.tasks.setdefault(rec["task"], []).append(rid)
                self.index.num_negatives.append(len(rec["neg"]))

    @property
    def tasks(self) -> dict:
        return self.index.tasks

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rid: int) -> dict:
        file_no, offset, line_no = self.index.offsets[rid]
        fh = self._handles.get(file_no)
        if fh is None:
            fh = self._handles[file_no] = open(self.files[file_no], "rb")
        fh.seek(offset)
        path = self.files[file_no]
        rec = parse_train_line(path, line_no, fh.readline().decode("utf-8"), path.stem)
        if rec["instruction"] is None:
            rec["instruction"] = self.instructions.get(rec["task"])
        return rec

    def close(self):
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __getstate__(self):  # file handles do not travel to other processes
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def iter_jsonl(path) -> Iterator[tuple]:
    """``(line number, object)`` for every non-empty line of a JSONL file, with file:line on bad JSON."""
    with open(path, "r", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                _fail(path, line_no, f"invalid JSON ({exc.msg} at column {exc.colno})")


@dataclass
class EvalSet:
    """A retrieval evaluation set: queries with graded relevant doc ids, and a corpus."""

    query_ids: list
    queries: list          # query texts (instruction already applied)
    relevant: list         # per query: {doc_id: grade > 0}
    doc_ids: list
    docs: list

    def __len__(self) -> int:
        return len(self.queries)


def load_eval_set(queries_path, corpus_path, *, instruction: Optional[str] = None) -> EvalSet:
    """Read an eval set; ``instruction`` applies to queries that carry none of their own."""
    doc_ids, docs, seen = [], [], set()
    for line_no, obj in iter_jsonl(corpus_path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            _fail(corpus_path, line_no, "expected an object with 'id' and 'text' (string)")
        did = obj.get("id")
        if not isinstance(did, (str, int)):
            _fail(corpus_path, line_no, "'id' must be a string or an integer")
        did = str(did)
        if did in seen:
            _fail(corpus_path, line_no, f"duplicate document id {did!r}")
        seen.add(did)
        title = obj.get("title")
        doc_ids.append(did)
        docs.append(f"{title}\n{obj['text']}" if title else obj["text"])
    query_ids, queries, relevant = [], [], []
    for line_no, obj in iter_jsonl(queries_path):
        if not isinstance(obj, dict) or not isinstance(obj.get("query"), str):
            _fail(queries_path, line_no, "expected an object with 'query' (string) and 'relevant'")
        rel = obj.get("relevant")
        if isinstance(rel, list):
            rel = {str(r): 1.0 for r in rel}
        elif isinstance(rel, dict):
            rel = {str(k): float(v) for k, v in rel.items() if float(v) > 0}
        else:
            _fail(queries_path, line_no, "'relevant' must be a list of doc ids or a {doc_id: grade} object")
        if not rel:
            _fail(queries_path, line_no, "'relevant' is empty")
        missing = [r for r in rel if r not in seen]
        if missing:
            _fail(queries_path, line_no, f"relevant doc ids not in the corpus {corpus_path}: {missing[:5]}")
        query_ids.append(str(obj.get("id", line_no)))
        queries.append(format_query(obj["query"], obj.get("instruction") or instruction))
        relevant.append(rel)
    if not queries:
        raise ValueError(f"{queries_path}: no queries")
    return EvalSet(query_ids, queries, relevant, doc_ids, docs)


def write_jsonl(path, rows: Sequence[dict]):
    """Write ``rows`` as JSONL (used by the demo and the tests)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
