"""Teacher scores for distillation (``kalm-fast score``): each pair scored with the teacher's similarity, the records
kept, an interrupted run continued after its last finished chunk."""
import json

import pytest
import torch
from train_utils import make_records, make_tiny_model

from kalm_fast import Encoder, files
from kalm_fast.cli import main
from kalm_fast.prompts import format_query
from kalm_fast.train import teacher_scores
from kalm_fast.train.data import TrainData, write_jsonl
from kalm_fast.train.teacher_scores import score_file


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("teacher"), seed=3)


def _rows():
    rows = make_records(11, negatives=3)
    rows[0]["instruction"] = "Find the passage"    # its own instruction wins over the task's
    rows[1]["pos_scores"] = [9.0, 9.0]             # replaced
    rows[2]["neg"] = []                            # no negatives: an empty neg_scores
    rows[3]["meta"] = {"source": "x", "n": [1, 2]}  # other keys are kept as they are
    return rows


def test_scores_are_the_teachers_similarity_of_the_trainers_query_and_each_text(teacher, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _rows())
    result = score_file(teacher, tmp_path / "train.jsonl", tmp_path / "scored.jsonl", instructions={"alpha": "Match"},
                        chunk_records=4, show_progress=False)
    assert result["records"] == 11 and result["resumed_at"] == 0
    encoder = Encoder(teacher)
    out = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    assert len(out) == 11 and result["pairs"] == sum(len(r["pos"]) + len(r["neg"]) for r in out)
    for row, scored in zip(_rows(), out):
        assert {k: v for k, v in scored.items() if not k.endswith("_scores")} == {
            k: v for k, v in row.items() if not k.endswith("_scores")}
        instruction = row.get("instruction") or {"alpha": "Match"}.get(row["task"])
        q = encoder.encode(format_query(row["query"], instruction), convert_to_tensor=True)
        want = encoder.similarity(q, encoder.encode(row["pos"] + row["neg"], convert_to_tensor=True))[0]
        got = torch.tensor(scored["pos_scores"] + scored["neg_scores"])
        assert len(scored["pos_scores"]) == len(row["pos"]) and len(scored["neg_scores"]) == len(row["neg"])
        torch.testing.assert_close(got, want.float(), atol=2e-6, rtol=0)
    assert out[0]["pos_scores"] != out[1]["pos_scores"] != [9.0, 9.0]
    # what a distilling stage reads: every text has its score, and the scores are not reported unused
    with pytest.warns(UserWarning, match="keys not used by kalm_fast's contrastive training: meta$"):
        data = TrainData(tmp_path / "scored.jsonl", teacher_scores=True)
    assert len(data) == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.jsonl", "train.jsonl"]  # no partial files left


class Interrupted(Exception):
    pass


def test_an_interrupted_run_continues_after_its_last_finished_chunk(teacher, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", _rows())
    score_file(teacher, tmp_path / "train.jsonl", tmp_path / "whole.jsonl", chunk_records=3, show_progress=False)
    real, calls = teacher_scores._score_chunk, []

    def fail_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return real(*args)

    monkeypatch.setattr(teacher_scores, "_score_chunk", fail_third)
    with pytest.raises(Interrupted):
        score_file(teacher, tmp_path / "train.jsonl", tmp_path / "cut.jsonl", chunk_records=3, show_progress=False)
    monkeypatch.setattr(teacher_scores, "_score_chunk", real)
    assert not (tmp_path / "cut.jsonl").exists()
    state = json.loads((tmp_path / ".cut.jsonl.partial.json").read_text())
    assert state["items"] == 6 and (tmp_path / ".cut.jsonl.partial").stat().st_size == state["bytes"]
    # a write cut short after the last saved progress is dropped on resume
    with open(tmp_path / ".cut.jsonl.partial", "ab") as f:
        f.write(b'{"query": "half a li' + b"x" * 100_000)  # longer than what the resumed run writes
    result = score_file(teacher, tmp_path / "train.jsonl", tmp_path / "cut.jsonl", chunk_records=3,
                        show_progress=False)
    assert result["resumed_at"] == 6 and result["pairs"] == sum(len(r["pos"]) + len(r["neg"]) for r in _rows()[6:])
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jsonl", "train.jsonl", "whole.jsonl"]


def test_another_setting_or_input_starts_over(teacher, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", _rows())
    real = teacher_scores._score_chunk
    monkeypatch.setattr(teacher_scores, "_score_chunk", lambda *a: (_ for _ in ()).throw(Interrupted)
                        if (tmp_path / ".o.jsonl.partial.json").exists() else real(*a))
    with pytest.raises(Interrupted):
        score_file(teacher, tmp_path / "train.jsonl", tmp_path / "o.jsonl", chunk_records=4, show_progress=False)
    monkeypatch.setattr(teacher_scores, "_score_chunk", real)
    result = score_file(teacher, tmp_path / "train.jsonl", tmp_path / "o.jsonl", chunk_records=4,
                        instructions={"beta": "Other"}, show_progress=False)
    assert result["resumed_at"] == 0 and len((tmp_path / "o.jsonl").read_text().splitlines()) == 11


def test_a_fresh_start_never_resumes_on_the_progress_record_of_another_run(teacher, tmp_path, monkeypatch):
    """Run A stops after 2 chunks; run B (other settings) starts over on the same output and dies after writing its
    first chunk but before recording it; run A's settings again must not continue on B's bytes."""
    write_jsonl(tmp_path / "train.jsonl", _rows())
    score_file(teacher, tmp_path / "train.jsonl", tmp_path / "whole.jsonl", chunk_records=3, show_progress=False)
    real_chunk, real_record = teacher_scores._score_chunk, files.atomic_write_text
    chunks = []
    monkeypatch.setattr(teacher_scores, "_score_chunk",
                        lambda *a: (_ for _ in ()).throw(Interrupted) if chunks.append(1) or len(chunks) == 3
                        else real_chunk(*a))
    with pytest.raises(Interrupted):  # run A
        score_file(teacher, tmp_path / "train.jsonl", tmp_path / "o.jsonl", chunk_records=3, show_progress=False)
    monkeypatch.setattr(teacher_scores, "_score_chunk", real_chunk)
    monkeypatch.setattr(files, "atomic_write_text", lambda *a: (_ for _ in ()).throw(Interrupted))
    with pytest.raises(Interrupted):  # run B
        score_file(teacher, tmp_path / "train.jsonl", tmp_path / "o.jsonl", chunk_records=11,
                   instructions={"beta": "Other"}, show_progress=False)
    monkeypatch.setattr(files, "atomic_write_text", real_record)
    result = score_file(teacher, tmp_path / "train.jsonl", tmp_path / "o.jsonl", chunk_records=3, show_progress=False)
    assert result["resumed_at"] == 0
    assert (tmp_path / "o.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_records_without_a_task_keep_the_task_they_were_scored_under(teacher, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "task"} for r in _rows()]
    write_jsonl(tmp_path / "train.jsonl", rows)
    score_file(teacher, tmp_path / "train.jsonl", tmp_path / "scored.jsonl", instructions={"train": "Match"},
               show_progress=False)
    out = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    assert all(r["task"] == "train" for r in out)  # not "scored", the stem a stage reading it would give them
    with pytest.warns(UserWarning, match="not used by kalm_fast's contrastive training: meta$"):
        data = TrainData(tmp_path / "scored.jsonl", teacher_scores=True, instructions={"train": "Match"})
    assert list(data.tasks) == ["train"] and data[4]["instruction"] == "Match"


@pytest.mark.parametrize("change, message", [
    ("append", r"train.jsonl changed while it was scored; run again to score it as it is now"),
    ("edit", r"train.jsonl changed while it was scored; run again to score it as it is now"),
])
def test_an_input_that_changes_while_it_is_scored_gives_no_output(teacher, tmp_path, monkeypatch, change, message):
    write_jsonl(tmp_path / "train.jsonl", _rows())
    real = teacher_scores._score_chunk

    def change_the_input(*args):
        if change == "append":
            with open(tmp_path / "train.jsonl", "a") as f:
                f.write(json.dumps({"query": "late", "pos": ["p"]}) + "\n")
        else:  # one letter of the first query edited in place: the same records, the same line offsets
            with open(tmp_path / "train.jsonl", "r+b") as f:
                f.seek(len('{"query": "'))
                f.write(b"Z")
        return real(*args)

    monkeypatch.setattr(teacher_scores, "_score_chunk", change_the_input)
    with pytest.raises(ValueError, match=message):
        score_file(teacher, tmp_path / "train.jsonl", tmp_path / "o.jsonl", chunk_records=4, show_progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_input_is_refused_before_the_teacher_loads(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr("kalm_fast.encode.Encoder.__init__", lambda *a, **k: pytest.fail("the teacher loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n" + json.dumps({"query": "q", "pos": []}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'pos' must hold at least one text"):
        score_file(teacher, bad, tmp_path / "o.jsonl")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    with pytest.raises(ValueError, match=r"instructions: task\(s\) \['alpah'\] are in no record of the data, "
                                         r"whose tasks are \['good'\]"):
        score_file(teacher, good, tmp_path / "o.jsonl", instructions={"alpah": "x"})
    good.unlink()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no records"):
        score_file(teacher, tmp_path / "empty.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match=r"output must be a .jsonl file, got"):
        score_file(teacher, bad, tmp_path / "o.json")
    with pytest.raises(ValueError, match=r"is the input: write the rewritten records to another file"):
        score_file(teacher, bad, bad)
    with pytest.raises(ValueError, match=r"the directory of output .* does not exist"):
        score_file(teacher, bad, tmp_path / "nowhere/o.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"output .*dir.jsonl' is a directory, expected a .jsonl file path"):
        score_file(teacher, bad, tmp_path / "dir.jsonl")
    (tmp_path / "surrogate.jsonl").write_text('{"query": "q", "pos": ["p"], "meta": "\\ud800"}\n')
    with pytest.raises(ValueError, match=r"surrogate.jsonl:1: holds a lone surrogate escape"):
        score_file(teacher, tmp_path / "surrogate.jsonl", tmp_path / "o.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "dir.jsonl", "empty.jsonl", "surrogate.jsonl"]


def test_cli(teacher, tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", _rows())
    argv = ["score", "--model", str(teacher), "--input", str(tmp_path / "train.jsonl"), "--output",
            str(tmp_path / "s.jsonl"), "--instruction", "alpha=Match", "--chunk-records", "5"]
    assert main(argv) == 0
    pairs = sum(len(r["pos"]) + len(r["neg"]) for r in _rows())
    assert capsys.readouterr().out.startswith(f"scored 11 records: {pairs} pairs in ")
    score_file(teacher, tmp_path / "train.jsonl", tmp_path / "api.jsonl", instructions={"alpha": "Match"},
               chunk_records=5, show_progress=False)
    assert (tmp_path / "s.jsonl").read_bytes() == (tmp_path / "api.jsonl").read_bytes()
    assert main(argv + ["--instruction", "alpha=Again"]) == 2
    assert capsys.readouterr().err.strip() == "kalm-fast score: error: --instruction names a task twice"
