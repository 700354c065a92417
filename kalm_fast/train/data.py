"""Training and evaluation data: JSONL records, validated, indexed by byte offset, read on demand.

Training record (one JSON object per line, FlagEmbedding-style)::

    {"query": str, "pos": [str, ...], "neg": [str, ...], "task": str, "instruction" or "prompt": str (optional)}

``pos`` needs at least one non-blank text; ``neg`` may be empty or absent (then only in-batch
negatives), but holds no blank text.
``task`` defaults to the file's stem. ``prompt`` is FlagEmbedding's name for the query instruction (it is applied in
the KaLM format). FlagEmbedding's ``pos_scores`` / ``neg_scores`` (a teacher's score of each text, one number per
``pos`` / ``neg`` entry) are checked always, used by stages that distill (``teacher_scores=True``: then every record
needs them) and else reported as unused, as ``type`` and any other key are: nothing is dropped silently. The files
are scanned once to validate every line (errors name ``file:line``), to hash them and to remember where each record
starts; records are then read back one at a time (``seek``), so memory holds offsets, not texts.

Evaluation set: queries JSONL ``{"id"?, "query": str, "relevant": [doc_id, ...] or {doc_id: grade},
"instruction"?: str}`` and a corpus JSONL ``{"id": str, "text": str, "title"?: str}`` (title and text are joined
by ``prompts.join_title``, as everywhere in kalm_fast).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..files import check_unicode, check_writable_dir, decode_line, parse_json_line, read_lines, sha256_file
from ..prompts import format_query, join_title

RECORD_KEYS = ("query", "pos", "neg", "task", "instruction", "prompt")
SCORE_KEYS = {"pos_scores": "pos", "neg_scores": "neg"}  # teacher scores: used by distilling stages only


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
    if not all(t.strip() for t in value):
        _fail(path, line_no, f"{key!r} holds an empty text at index {[bool(t.strip()) for t in value].index(False)}")
    for i, t in enumerate(value):
        check_unicode(path, line_no, f"{key}[{i}]", t)
    return value


def _check_flagembedding_keys(path, line_no, obj, texts: dict):
    """FlagEmbedding's ``type`` (a string) and teacher scores (one finite number per text)."""
    if obj.get("type") is not None and not isinstance(obj["type"], str):
        _fail(path, line_no, f"'type' must be a string, got {type(obj['type']).__name__}")
    for key, paired in SCORE_KEYS.items():
        value = obj.get(key)
        numbers = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if value is not None and not (numbers and len(value) == len(texts[paired])):
            _fail(path, line_no, f"{key!r} must be a list of {len(texts[paired])} numbers (one per {paired!r} text)")


def parse_train_line(path, line_no: int, line: str, default_task: str) -> dict:
    """Validate one training JSONL line and return the normalized record (``pos``/``neg`` lists, ``instruction``
    from ``instruction`` or ``prompt``, ``pos_scores``/``neg_scores`` or None, ``unused``: the keys it holds that
    contrastive training does not use, the scores among them)."""
    obj = parse_json_line(path, line_no, line)
    if not isinstance(obj, dict):
        _fail(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        _fail(path, line_no, "'query' must be a non-empty string")
    check_unicode(path, line_no, "query", query)
    pos = _check_texts(path, line_no, obj, "pos", required=True)
    neg = _check_texts(path, line_no, obj, "neg", required=False)
    _check_flagembedding_keys(path, line_no, obj, dict(pos=pos, neg=neg))
    task = obj.get("task", default_task)
    if not isinstance(task, str) or not task:
        _fail(path, line_no, "'task' must be a non-empty string")
    instructions = {}
    for key in ("instruction", "prompt"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            _fail(path, line_no, f"{key!r} must be a string")
        if value:
            instructions[key] = check_unicode(path, line_no, key, value)
    if len(set(instructions.values())) > 1:
        _fail(path, line_no, "'instruction' and 'prompt' differ; give the query instruction once")
    return dict(query=query, pos=pos, neg=neg, task=task, instruction=next(iter(instructions.values()), None),
                pos_scores=obj.get("pos_scores"), neg_scores=obj.get("neg_scores"),
                unused=sorted(set(obj) - set(RECORD_KEYS)))


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

    ``TrainData(["a.jsonl", "b.jsonl"], instructions={"task": "..."})``; ``teacher_scores=True``: every record
    must hold ``pos_scores`` (and ``neg_scores`` when it has negatives), which are then not reported as unused;
    ``data[i]`` -> record dict with
    ``task`` and ``instruction`` filled in; ``data.tasks`` -> ``{task: [record ids]}``; ``data.sha256`` -> ``{file:
    sha256}`` of the bytes validated; ``data.unused`` -> ``{file: [keys not used]}`` (also a warning).
    """

    def __init__(self, files, *, instructions: Optional[dict] = None, min_negatives: int = 0,
                 teacher_scores: bool = False):
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("data: expected at least one JSONL file")
        self.instructions = dict(instructions or {})
        self.index = TrainIndex(files=self.files)
        self.sha256, self.unused = {}, {}
        for file_no, path in enumerate(self.files):
            self._scan(file_no, path, min_negatives, teacher_scores)
        for path, keys in self.unused.items():
            notes = [f"{k} (teacher scores: used by stages with distill_weight > 0)" if k in SCORE_KEYS else k
                     for k in keys]
            warnings.warn(f"{path}: keys not used by kalm_fast's contrastive training: {', '.join(notes)}",
                          stacklevel=2)
        if len(self.index) == 0:
            raise ValueError(f"data: no records in {[str(f) for f in self.files]}")
        check_instruction_tasks(self.instructions, self.tasks)
        self._handles: dict = {}

    def _scan(self, file_no: int, path: Path, min_negatives: int, teacher_scores: bool):
        if not path.is_file():
            raise ValueError(f"data: file not found: {path}")
        digest, unused = hashlib.sha256(), set()
        with open(path, "rb") as fh:
            offset, line_no = 0, 0
            for raw in fh:
                line_no += 1
                digest.update(raw)
                start, offset = offset, offset + len(raw)
                text = decode_line(path, line_no, raw).strip()
                if not text:
                    continue
                rec = parse_train_line(path, line_no, text, path.stem)
                if teacher_scores:
                    missing = [k for k, texts in SCORE_KEYS.items() if rec[texts] and rec[k] is None]
                    if missing:
                        _fail(path, line_no, f"no teacher scores {missing} (one number per text), but the stage "
                                             "distills (distill_weight > 0)")
                    unused.update(k for k in rec["unused"] if k not in SCORE_KEYS)
                else:
                    unused.update(rec["unused"])
                if min_negatives > 0 and not rec["neg"]:
                    _fail(path, line_no, f"no hard negatives ('neg'), but the stage asks for {min_negatives} "
                                         "per query (set hard_negatives: 0 to train with in-batch negatives only)")
                rid = len(self.index.offsets)
                self.index.offsets.append((file_no, start, line_no))
                self.index.tasks.setdefault(rec["task"], []).append(rid)
                self.index.num_negatives.append(len(rec["neg"]))
        self.sha256[str(path)] = digest.hexdigest()
        if unused:
            self.unused[str(path)] = sorted(unused)

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
        rec = parse_train_line(path, line_no, decode_line(path, line_no, fh.readline()), path.stem)
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


def check_instruction_tasks(instructions: dict, tasks) -> None:
    """Refuse an instruction for a task that no record has (a misspelled task would leave its queries bare)."""
    unknown = sorted(set(instructions) - set(tasks))
    if unknown:
        raise ValueError(f"instructions: task(s) {unknown} are in no record of the data, whose tasks are "
                         f"{sorted(set(tasks))} (a record's task is its 'task' key, else its file's name without "
                         "its suffix)")


def iter_train_records(path) -> Iterator[tuple]:
    """``(line number, raw JSON object, normalized record)`` of every non-blank line of a training JSONL, each line
    validated as ``TrainData`` validates it, for tools that rewrite records (``kalm-fast score`` / ``mine``): the raw
    object keeps its keys and gets the record's ``task`` (the file's stem when it had none, which a rewritten file
    under another name would not give it), and must be writable as UTF-8 (no lone surrogate escape in any key)."""
    path = Path(path)
    for line_no, line in read_lines(path):
        if line.strip():
            record = parse_train_line(path, line_no, line, path.stem)
            raw = json.loads(line)
            raw.setdefault("task", record["task"])
            try:
                json.dumps(raw, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{path}:{line_no}: holds a lone surrogate escape (\\ud800-\\udfff), which "
                                 "cannot be written as UTF-8") from None
            yield line_no, raw, record


def check_records_output(output: Path, input_path: Path) -> None:
    """What a tool that rewrites the records of ``input_path`` may write to: a new or replaceable .jsonl file, not the
    input, in a writable directory (ValueError naming ``output`` otherwise)."""
    if output.suffix.lower() != ".jsonl":
        raise ValueError(f"output must be a .jsonl file, got {str(output)!r}")
    if output.is_dir():
        raise ValueError(f"output {str(output)!r} is a directory, expected a .jsonl file path")
    if output.exists() and output.resolve() == input_path.resolve():
        raise ValueError(f"output {str(output)!r} is the input: write the rewritten records to another file")
    if not output.parent.is_dir():
        raise ValueError(f"the directory of output {str(output)!r} does not exist")
    check_writable_dir(output.parent, "output")


def load_record_model(model, encoder_kwargs: dict) -> tuple:
    """``(encoder, settings, encode kwargs)`` of the model a tool that rewrites records runs: ``Encoder(model,
    **encoder_kwargs)`` (``max_tokens_per_batch`` goes to ``encode`` instead), what its embeddings depend on (the
    model's files, dtype, max length), and the ``encode`` arguments (tensors, no model prompt, no progress bar)."""
    from ..encode import Encoder
    from ..models.loading import model_fingerprint

    encoder_kwargs = dict(encoder_kwargs)
    max_tokens = encoder_kwargs.pop("max_tokens_per_batch", None)
    encoder = Encoder(model, **encoder_kwargs)
    settings = dict(model_sha256=model_fingerprint(model, encoder_kwargs.get("allow_pickle", False)),
                    dtype=str(encoder.model.dtype), max_length=encoder.max_seq_length)
    encode = dict(prompt="", convert_to_tensor=True, show_progress_bar=False, max_tokens_per_batch=max_tokens)
    return encoder, settings, encode


def input_changed(input_path: Path, done: str, redo: str) -> ValueError:
    """The error of a tool that found ``input_path`` changed while it ``done`` it ("scored"; ``redo``: "score")."""
    return ValueError(f"{input_path} changed while it was {done}; run again to {redo} it as it is now")


def unchanged_check(input_path: Path, sha256: str, done: str, redo: str):
    """The final check of a tool that rewrote ``input_path``: ``input_changed`` if the file no longer has
    ``sha256``."""
    def check():
        if sha256_file(input_path) != sha256:
            raise input_changed(input_path, done, redo)
    return check


def iter_jsonl(path) -> Iterator[tuple]:
    """``(line number, object)`` for every non-empty line of a JSONL file, with file:line on bad input."""
    for line_no, line in read_lines(path):
        if line.strip():
            yield line_no, parse_json_line(path, line_no, line)


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
        if title is not None and not isinstance(title, str):
            _fail(corpus_path, line_no, "'title' must be a string")
        doc_ids.append(did)
        docs.append(check_unicode(corpus_path, line_no, "text", join_title(title, obj["text"])))
    query_ids, queries, relevant = [], [], []
    for line_no, obj in iter_jsonl(queries_path):
        if not isinstance(obj, dict) or not isinstance(obj.get("query"), str):
            _fail(queries_path, line_no, "expected an object with 'query' (string) and 'relevant'")
        rel = obj.get("relevant")
        if isinstance(rel, list):
            rel = {str(r): 1.0 for r in rel}
        elif isinstance(rel, dict):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in rel.values()):
                _fail(queries_path, line_no, "'relevant' grades must be numbers")
            rel = {str(k): float(v) for k, v in rel.items() if v > 0}
        else:
            _fail(queries_path, line_no, "'relevant' must be a list of doc ids or a {doc_id: grade} object")
        if not rel:
            _fail(queries_path, line_no, "'relevant' is empty")
        missing = [r for r in rel if r not in seen]
        if missing:
            _fail(queries_path, line_no, f"relevant doc ids not in the corpus {corpus_path}: {missing[:5]}")
        own = obj.get("instruction")
        if own is not None and not isinstance(own, str):
            _fail(queries_path, line_no, "'instruction' must be a string")
        check_unicode(queries_path, line_no, "query", format_query(obj["query"], own))
        query_ids.append(str(obj.get("id", line_no)))
        queries.append(format_query(obj["query"], own or instruction))
        relevant.append(rel)
    if not queries:
        raise ValueError(f"{queries_path}: no queries")
    return EvalSet(query_ids, queries, relevant, doc_ids, docs)


def write_jsonl(path, rows: Sequence[dict]):
    """Write ``rows`` as JSONL (used by the demo and the tests)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
