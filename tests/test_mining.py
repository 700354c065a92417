"""Hard-negative mining (``kalm-fast mine``): negatives from the ranks asked for, never a positive or the query,
the KaLM positive-rank filter, seeded draws, records kept, an interrupted run continued."""
import json
import random

import pytest
import torch
from train_utils import make_records, make_tiny_model

from kalm_fast import Encoder, files
from kalm_fast.cli import main
from kalm_fast.prompts import format_query
from kalm_fast.train import mining
from kalm_fast.train.data import TrainData, write_jsonl
from kalm_fast.train.mining import mine_file


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("miner"), seed=4)


def _rows():
    rows = make_records(30, negatives=2, seed=2)
    rows[0]["instruction"] = "Find the passage"
    rows[1]["neg_scores"] = [0.1, 0.2]             # scored the old negatives: removed
    rows[2]["meta"] = {"source": "x"}              # kept
    rows[3]["pos"].append(rows[3]["query"])        # the query itself is a positive
    del rows[4]["task"]                            # gets the input's stem
    return rows


def _corpus(path):
    path.write_text("".join(json.dumps(dict(text=r["pos"][0], title="T")) + "\n"
                            for r in make_records(40, negatives=1, seed=7)))
    return path


def _expected(model, rows, corpus_texts, *, num_negatives, lo, hi, max_positive_rank, seed, instructions,
              max_negative_ratio=None):
    """The mined records by brute force: every score, a full sort; and how many candidates the ratio left out."""
    encoder = Encoder(model)
    pool = list(dict.fromkeys([t for r in rows for t in r["pos"] + r["neg"]] + corpus_texts))
    emb = encoder.encode(pool, normalize_embeddings=True, convert_to_tensor=True, prompt="")
    out, line_no, ratio_filtered = [], 0, 0
    for r in rows:
        line_no += 1
        task = r.get("task", "train")
        query = format_query(r["query"], r.get("instruction") or instructions.get(task))
        q = encoder.encode(query, normalize_embeddings=True, convert_to_tensor=True, prompt="")
        scores = emb @ q
        order = torch.argsort(scores, descending=True).tolist()
        positives = {pool.index(t) for t in r["pos"]}
        if max_positive_rank is not None and not positives & set(order[:max_positive_rank]):
            continue
        candidates = [i for i in order[lo:hi] if i not in positives and pool[i] != r["query"]]
        if max_negative_ratio is not None:
            limit = max_negative_ratio * min(scores[p] for p in positives)
            ratio_filtered += sum(scores[i] > limit for i in candidates)
            candidates = [i for i in candidates if scores[i] <= limit]
        if not candidates:
            continue
        chosen = random.Random(f"{seed}:{line_no}").sample(candidates, min(num_negatives, len(candidates)))
        record = {k: v for k, v in r.items() if k != "neg_scores"}
        record.update(task=task, neg=[pool[i] for i in chosen])
        out.append(record)
    return (out, ratio_filtered) if max_negative_ratio is not None else out


@pytest.mark.parametrize("max_positive_rank", [3, 12, None])  # 12: past the range, a longer search
def test_mined_negatives_are_the_seeded_draws_from_the_ranks_asked_for(model, tmp_path, monkeypatch,
                                                                      max_positive_rank):
    monkeypatch.setattr(mining, "SEARCH_SCORES", 1000)  # several queries' searches, several pool blocks
    monkeypatch.setattr(mining, "POOL_BLOCK", 50)
    write_jsonl(tmp_path / "train.jsonl", _rows())
    corpus = _corpus(tmp_path / "corpus.jsonl")
    options = dict(num_negatives=3, rank_range=(2, 9), max_positive_rank=max_positive_rank, seed=5,
                   instructions={"beta": "Match"})
    result = mine_file(model, tmp_path / "train.jsonl", tmp_path / "mined.jsonl", corpus=corpus, chunk_records=7,
                       show_progress=False, **options)
    corpus_texts = [f"T {json.loads(line)['text']}" for line in corpus.read_text().splitlines()]
    want = _expected(model, _rows(), corpus_texts, num_negatives=3, lo=2, hi=9, max_positive_rank=max_positive_rank,
                     seed=5, instructions={"beta": "Match"})
    got = [json.loads(line) for line in open(tmp_path / "mined.jsonl")]
    assert got == want
    assert result["written"] == len(got) and result["records"] == 30 and result["resumed_at"] == 0
    assert result["pool"] == len(set(t for r in _rows() for t in r["pos"] + r["neg"]) | set(corpus_texts))
    dropped = result["dropped_positive_rank"]
    assert (dropped > 0) == (max_positive_rank is not None) and len(got) + dropped + result[
        "dropped_no_candidates"] == 30
    for r in got:
        assert len(r["neg"]) == 3 and not set(r["neg"]) & set(r["pos"]) and r["query"] not in r["neg"]
    assert not any("neg_scores" in r for r in got)
    assert any(t.startswith("T ") for r in got for t in r["neg"])  # the corpus joins the candidates
    with pytest.warns(UserWarning, match="not used by kalm_fast's contrastive training: meta$"):
        data = TrainData(tmp_path / "mined.jsonl", min_negatives=3)  # what a fine-tuning stage reads
    assert len(data) == len(got)


def test_the_negative_ratio_leaves_out_candidates_scoring_near_the_lowest_positive(model, tmp_path):
    """max_negative_ratio r: a candidate scoring above r x the lowest score of the record's positives is never
    drawn (brute force: every score); at the ratio chosen some candidates go and some stay."""
    write_jsonl(tmp_path / "train.jsonl", _rows())
    options = dict(num_negatives=3, max_positive_rank=None, seed=1, instructions={})
    results = {}
    for ratio in (1.0, 0.99, 0.98):  # the tiny model scores everything alike: positives 0.95-1.02 x the others
        result = mine_file(model, tmp_path / "train.jsonl", tmp_path / f"m{ratio}.jsonl", max_negative_ratio=ratio,
                           rank_range=(2, 12), show_progress=False, **options)
        want, filtered = _expected(model, _rows(), [], lo=2, hi=12, max_negative_ratio=ratio, **options)
        assert [json.loads(line) for line in open(tmp_path / f"m{ratio}.jsonl")] == want
        assert result["ratio_filtered"] == filtered and result["written"] == len(want)
        results[ratio] = (int(filtered), len(want))
    assert 0 < results[1.0][0] < results[0.99][0] < results[0.98][0] and min(n for _, n in results.values()) > 0
    assert mine_file(model, tmp_path / "train.jsonl", tmp_path / "off.jsonl", rank_range=(2, 12), show_progress=False,
                     **options)["ratio_filtered"] == 0


def test_too_few_candidates_give_fewer_negatives_or_drop_the_record(model, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _rows()[:6])
    result = mine_file(model, tmp_path / "train.jsonl", tmp_path / "a.jsonl", num_negatives=7, rank_range=(1, 4),
                       max_positive_rank=None, show_progress=False)
    got = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert result["fewer_negatives"] == len(got) == 6 and all(1 <= len(r["neg"]) <= 3 for r in got)
    # the one candidate of rank 0 is a kept record's positive: none left
    result = mine_file(model, tmp_path / "train.jsonl", tmp_path / "b.jsonl", rank_range=(0, 1),
                       max_positive_rank=1, show_progress=False)
    assert result["dropped_no_candidates"] > 0 and result["written"] == 0
    assert result["dropped_no_candidates"] + result["dropped_positive_rank"] == 6
    assert (tmp_path / "b.jsonl").read_text() == ""


def test_the_positive_rank_filter_keeps_exactly_the_records_with_a_positive_in_the_first_n(model, tmp_path):
    rows = _rows()
    write_jsonl(tmp_path / "train.jsonl", rows)
    encoder = Encoder(model)
    pool = list(dict.fromkeys(t for r in rows for t in r["pos"] + r["neg"]))
    emb = encoder.encode(pool, normalize_embeddings=True, convert_to_tensor=True, prompt="")
    best = []  # 0-based rank of each record's best positive
    for r in rows:
        q = encoder.encode(format_query(r["query"], r.get("instruction")), normalize_embeddings=True,
                           convert_to_tensor=True, prompt="")
        order = torch.argsort(emb @ q, descending=True).tolist()
        best.append(min(order.index(pool.index(t)) for t in r["pos"]))
    n = sorted(b for b in best if b > 0)[len([b for b in best if b > 0]) // 2]  # a rank some record has exactly
    result = mine_file(model, tmp_path / "train.jsonl", tmp_path / "m.jsonl", rank_range=(0, 10),
                       max_positive_rank=n, show_progress=False)
    kept = [json.loads(line)["query"] for line in open(tmp_path / "m.jsonl")]
    assert kept == [r["query"] for r, b in zip(rows, best) if b < n] and result["dropped_positive_rank"] == sum(
        b >= n for b in best) > 0


def test_the_query_itself_is_never_its_negative(model, tmp_path):
    rows = _rows()
    rows[5]["query"] = rows[6]["pos"][0]  # the query's own text is a candidate (another record's positive)
    write_jsonl(tmp_path / "train.jsonl", rows)
    mine_file(model, tmp_path / "train.jsonl", tmp_path / "m.jsonl", num_negatives=5, rank_range=(0, 5),
              max_positive_rank=None, show_progress=False)
    mined = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert mined[5]["query"] == rows[6]["pos"][0] and rows[6]["pos"][0] not in mined[5]["neg"]
    assert len(mined[5]["neg"]) == 4  # the 5 best but the query's own text (ranked first, cosine 1)


def test_no_positive_of_any_record_of_the_same_query_is_a_negative(model, tmp_path):
    """FlagEmbedding-style data repeats a query with each of its positives; none of them may become its negative."""
    rows = _rows()[:10]
    for i in (1, 2, 3):
        rows[i] = dict(rows[0], pos=[rows[i]["pos"][0]], neg=rows[i]["neg"])
    write_jsonl(tmp_path / "train.jsonl", rows)
    mine_file(model, tmp_path / "train.jsonl", tmp_path / "m.jsonl", num_negatives=20, rank_range=(0, 25),
              max_positive_rank=None, show_progress=False)
    mined = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    positives = {t for r in rows[:4] for t in r["pos"]}
    assert all(not positives & set(r["neg"]) for r in mined[:4]) and len(mined[0]["neg"]) > 10
    assert any(positives & set(r["neg"]) for r in mined[4:])  # other queries may draw them


def test_blank_corpus_texts_are_no_candidates(model, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _rows()[:4])
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n{"text": "   "}\n{"text": "a real text"}\n')
    result = mine_file(model, tmp_path / "train.jsonl", tmp_path / "m.jsonl", corpus=tmp_path / "c.jsonl",
                       rank_range=(0, 30), max_positive_rank=None, show_progress=False)
    assert result["pool"] == len({t for r in _rows()[:4] for t in r["pos"] + r["neg"]}) + 1
    with pytest.warns(UserWarning, match="meta$"):
        assert TrainData(tmp_path / "m.jsonl", min_negatives=1)  # no blank negative


def test_an_input_that_changes_while_it_is_mined_gives_an_error_and_no_output(model, tmp_path, monkeypatch):
    rows = _rows()
    write_jsonl(tmp_path / "train.jsonl", rows)
    real = mining._pool_embeddings

    def edit_the_input(*args):  # after the scan: a new positive the pool does not hold
        write_jsonl(tmp_path / "train.jsonl", [dict(rows[0], query="new", pos=["a brand new positive"])] + rows[1:])
        return real(*args)

    monkeypatch.setattr(mining, "_pool_embeddings", edit_the_input)
    with pytest.raises(ValueError, match=r"train.jsonl changed while it was mined; run again"):
        mine_file(model, tmp_path / "train.jsonl", tmp_path / "m.jsonl", rank_range=(1, 8), max_positive_rank=None,
                  show_progress=False)
    assert not (tmp_path / "m.jsonl").exists()


def test_cached_pool_blocks_of_another_model_are_not_used(model, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", _rows())
    other = make_tiny_model(tmp_path / "other", seed=9)
    options = dict(rank_range=(1, 8), max_positive_rank=None, show_progress=False)
    mine_file(other, tmp_path / "train.jsonl", tmp_path / "fresh.jsonl", **options)
    monkeypatch.setattr(mining, "write_resumable", lambda *a, **k: (_ for _ in ()).throw(Interrupted))
    with pytest.raises(Interrupted):  # leaves the pool of `model` cached beside m.jsonl
        mine_file(model, tmp_path / "train.jsonl", tmp_path / "m.jsonl", **options)
    monkeypatch.undo()
    assert (tmp_path / ".m.jsonl.pool/block-00000.safetensors").is_file()
    mine_file(other, tmp_path / "train.jsonl", tmp_path / "m.jsonl", **options)
    assert (tmp_path / "m.jsonl").read_bytes() == (tmp_path / "fresh.jsonl").read_bytes()


class Interrupted(Exception):
    pass


def test_an_interrupted_run_continues_without_encoding_the_pool_again(model, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", _rows())
    options = dict(rank_range=(1, 8), max_positive_rank=4, chunk_records=6, show_progress=False)
    mine_file(model, tmp_path / "train.jsonl", tmp_path / "whole.jsonl", **options)
    real_record, records = files.atomic_write_text, []

    def stop_at_third_chunk(path, text):
        if ".cut.jsonl.partial" in str(path):
            records.append(1)
            if len(records) == 3:
                raise Interrupted
        return real_record(path, text)

    monkeypatch.setattr(files, "atomic_write_text", stop_at_third_chunk)
    with pytest.raises(Interrupted):
        mine_file(model, tmp_path / "train.jsonl", tmp_path / "cut.jsonl", **options)
    monkeypatch.setattr(files, "atomic_write_text", real_record)
    assert (tmp_path / ".cut.jsonl.pool/block-00000.safetensors").is_file() and not (tmp_path / "cut.jsonl").exists()
    encoded = []
    real_encode = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, texts, **kw: encoded.append(len(texts)) or
                        real_encode(self, texts, **kw))
    result = mine_file(model, tmp_path / "train.jsonl", tmp_path / "cut.jsonl", **options)
    assert result["resumed_at"] == 12 and encoded == [6, 6, 6]  # only the queries of the chunks after the second
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jsonl", "train.jsonl", "whole.jsonl"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_negatives=0), "num_negatives must be an integer >= 1, got 0"),
    (dict(rank_range=(5, 5)), r"rank_range\[1\] must be an integer >= 6, got 5"),
    (dict(rank_range=(-1, 5)), r"rank_range\[0\] must be an integer >= 0, got -1"),
    (dict(max_positive_rank=0), "max_positive_rank must be an integer >= 1 or None, got 0"),
    (dict(max_negative_ratio=0), r"max_negative_ratio must be a number in \(0, 1\] or None, got 0"),
    (dict(max_negative_ratio=1.5), r"max_negative_ratio must be a number in \(0, 1\] or None, got 1.5"),
    (dict(corpus="c.csv"), "corpus must be a .txt or .jsonl file"),
    (dict(output="o.txt"), "output must be a .jsonl file"),
    (dict(output="train.jsonl"), "is the input: write the rewritten records to another file"),
    (dict(corpus="bad.jsonl"), r"bad.jsonl:2: expected an object with a 'text' string"),
    (dict(rank_range=(1000, 1100)), r"rank_range 1000-1100 starts past the \d+ candidates \(the records' texts\)"),
    (dict(instructions={"alpah": "x"}), r"instructions: task\(s\) \['alpah'\] are in no record of the data"),
])
def test_bad_arguments_are_refused_before_the_model_loads(model, tmp_path, monkeypatch, kwargs, message):
    write_jsonl(tmp_path / "train.jsonl", _rows()[:3])
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"title": "b"}\n')
    monkeypatch.setattr("kalm_fast.encode.Encoder.__init__", lambda *a, **k: pytest.fail("the model loaded"))
    kwargs = dict(kwargs)
    output = tmp_path / kwargs.pop("output", "o.jsonl")
    if "corpus" in kwargs:
        kwargs["corpus"] = tmp_path / kwargs["corpus"]
    with pytest.raises(ValueError, match=message):
        mine_file(model, tmp_path / "train.jsonl", output, **kwargs)


def test_cli(model, tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", _rows())
    (tmp_path / "corpus.txt").write_text("one more text\nand another\n")
    argv = ["mine", "--model", str(model), "--input", str(tmp_path / "train.jsonl"), "--output",
            str(tmp_path / "m.jsonl"), "--corpus", str(tmp_path / "corpus.txt"), "--negatives", "2", "--range", "1",
            "6", "--max-positive-rank", "0", "--seed", "3", "--instruction", "beta=Match"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("mined 30 of 30 records against ") and "no positive in the first" not in out
    mine_file(model, tmp_path / "train.jsonl", tmp_path / "api.jsonl", corpus=tmp_path / "corpus.txt",
              num_negatives=2, rank_range=(1, 6), max_positive_rank=None, seed=3, instructions={"beta": "Match"},
              show_progress=False)
    assert (tmp_path / "m.jsonl").read_bytes() == (tmp_path / "api.jsonl").read_bytes()
    assert main(argv[:-6] + ["--range", "6", "6"]) == 2
    assert capsys.readouterr().err.strip() == "kalm-fast mine: error: --range 6 6: HI must be greater than LO"
    argv[6] = str(tmp_path / "ratio.jsonl")
    assert main(argv + ["--max-negative-ratio", "0.99"]) == 0
    assert "candidates above 0.99 x the lowest positive score left out" in capsys.readouterr().out
    for bad, why in (("1.5", "must be in (0, 1], got 1.5"), ("nan", "must be in (0, 1], got nan"),
                     ("most", "expected a number in (0, 1], got 'most'")):
        assert main(argv + ["--max-negative-ratio", bad]) == 2
        assert capsys.readouterr().err.strip() == f"kalm-fast mine: error: argument --max-negative-ratio: {why}"


@pytest.mark.parametrize("command", ["mine", "score"])
def test_the_record_tools_refuse_torchrun(model, tmp_path, capsys, monkeypatch, command):
    """One process writes one file: several torchrun ranks would race on it."""
    write_jsonl(tmp_path / "train.jsonl", _rows()[:2])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([command, "--model", str(model), "--input", str(tmp_path / "train.jsonl"), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == (f"kalm-fast {command}: error: kalm-fast {command} runs in one process "
                                               "(it writes one file); run it without torchrun")
