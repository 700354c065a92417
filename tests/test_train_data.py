"""Training data validation, task-homogeneous deterministic sampling, resumable position, configs."""
import json
import re
import warnings

import pytest

from kalm_fast.prompts import format_query, join_title
from kalm_fast.train.config import config_from_dict, load_config
from kalm_fast.train.data import TrainData, load_eval_set, write_jsonl
from kalm_fast.train.sampler import TaskBatchSampler, build_example


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "task": "t"})


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"pos": ["p"]}), "'query' must be a non-empty string"),
    (json.dumps({"query": "q"}), "missing 'pos'"),
    (json.dumps({"query": "q", "pos": []}), "'pos' must hold at least one text"),
    (json.dumps({"query": "q", "pos": [1]}), "'pos' must be a list of strings"),
    (json.dumps({"query": "q", "pos": ["p"], "neg": "n", "task": 3}), "'task' must be a non-empty string"),
    (json.dumps({"query": "q", "pos": ["p"], "instruction": 5}), "'instruction' must be a string"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "train.jsonl", [GOOD, "", line])
    with pytest.raises(ValueError, match=rf"train.jsonl:3: .*{message}"):
        TrainData(path)


def test_missing_negatives_when_asked_for(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, json.dumps({"query": "q", "pos": ["p"]})])
    assert len(TrainData(path, min_negatives=0)) == 2
    with pytest.raises(ValueError, match=r"d.jsonl:2: no hard negatives"):
        TrainData(path, min_negatives=7)


def test_records_read_back_from_offsets(tmp_path):
    rows = [{"query": f"q{i} é", "pos": [f"p{i}"], "neg": [f"n{i}"], "task": "ab"[i % 2]} for i in range(7)]
    rows[3]["instruction"] = "own"
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    data = TrainData([path], instructions={"a": "find it"})
    assert data.tasks == {"a": [0, 2, 4, 6], "b": [1, 3, 5]}
    assert data[4]["query"] == "q4 é" and data[4]["instruction"] == "find it"
    assert data[3]["instruction"] == "own" and data[5]["instruction"] is None
    assert [data[i]["pos"] for i in range(7)] == [[f"p{i}"] for i in range(7)]
    data.close()
    with pytest.raises(ValueError, match=r"instructions: task\(s\) \['alpah'\] are in no record of the data, whose "
                                         r"tasks are \['a', 'b'\]"):
        TrainData([path], instructions={"a": "find it", "alpah": "a typo"})


def test_task_defaults_to_file_stem(tmp_path):
    path = _write(tmp_path / "mytask.jsonl", [json.dumps({"query": "q", "pos": ["p"]})])
    assert list(TrainData(path).tasks) == ["mytask"]


def test_query_format():
    assert format_query("how?", "Retrieve docs") == "Instruct: Retrieve docs \n Query: how?"
    assert format_query("how?", None) == "how?"


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_task_homogeneous_and_deterministic():
    tasks = {"a": list(range(0, 10)), "b": list(range(10, 17)), "c": [17]}
    s1 = TaskBatchSampler(tasks, 3, seed=5)
    batches = _take(s1, 12)
    assert s1.batches_per_epoch() == 5  # 3 from a, 2 from b, none from c (too few records)
    for task, ids, _ in batches:
        assert len(ids) == 3 and all(i in tasks[task] for i in ids)
    epoch0 = [ids for _, ids, e in batches if e == 0]
    flat = [i for ids in epoch0 for i in ids]
    assert len(flat) == len(set(flat)) == 15  # no record twice within an epoch
    assert batches == _take(TaskBatchSampler(tasks, 3, seed=5), 12)
    assert batches != _take(TaskBatchSampler(tasks, 3, seed=6), 12)
    assert [e for _, _, e in batches] == [0] * 5 + [1] * 5 + [2] * 2
    assert [ids for _, ids, e in batches if e == 1] != epoch0  # reshuffled each epoch


def test_sampler_resumes_exactly():
    tasks = {"a": list(range(20)), "b": list(range(20, 32))}
    full = _take(TaskBatchSampler(tasks, 4, seed=1), 14)
    s = TaskBatchSampler(tasks, 4, seed=1)
    first = _take(s, 6)
    state = json.loads(json.dumps(s.state_dict()))
    resumed = TaskBatchSampler(tasks, 4, seed=1)
    resumed.load_state_dict(state)
    assert first + _take(resumed, 8) == full
    with pytest.raises(ValueError, match="seed"):
        TaskBatchSampler(tasks, 4, seed=2).load_state_dict(state)


def test_sampler_task_weights():
    tasks = {"a": list(range(12)), "b": list(range(12, 24))}
    s = TaskBatchSampler(tasks, 2, seed=0, task_weights={"a": 2.0, "b": 0.5})
    batches = _take(s, s.batches_per_epoch())
    counts = {t: sum(1 for b in batches if b[0] == t) for t in tasks}
    assert counts == {"a": 12, "b": 3}
    with pytest.raises(ValueError, match="not in the data"):
        TaskBatchSampler(tasks, 2, task_weights={"zzz": 1.0})
    with pytest.raises(ValueError, match="no task has batch_size=50"):
        TaskBatchSampler(tasks, 50)
    # a zero weight drops a task; weights that leave no batch at all are named as the cause
    assert {b[0] for b in _take(TaskBatchSampler(tasks, 2, task_weights={"a": 0}), 6)} == {"b"}
    for weights in ({"a": 0, "b": 0}, {"a": 0, "b": 0, "c": 5.0}):
        with pytest.raises(ValueError, match=r"task_weights \{.*\} leave no batch in an epoch"):
            TaskBatchSampler({**tasks, "c": [99]}, 2, task_weights=weights)
    # a small positive weight rounds to at least one batch per epoch: the task is never dropped silently
    s = TaskBatchSampler(tasks, 2, task_weights={"a": 0.05, "b": 0})
    assert s.batches_per_epoch() == 1 and _take(s, 1)[0][0] == "a"


def test_build_example_negatives():
    rec = dict(query="q", pos=["p1", "p2"], neg=[f"n{i}" for i in range(10)], task="t", instruction="do")
    q, docs, scores = build_example(rec, 3, num_negatives=7, seed=0, epoch=0)
    assert q == "Instruct: do \n Query: q" and docs[0] in rec["pos"] and len(docs) == 8 and scores is None
    assert len(set(docs[1:])) == 7 and set(docs[1:]) <= set(rec["neg"])
    assert (q, docs, None) == build_example(rec, 3, num_negatives=7, seed=0, epoch=0)
    assert docs != build_example(rec, 3, num_negatives=7, seed=0, epoch=1)[1]
    few = dict(rec, neg=["x", "y"])
    assert set(build_example(few, 0, num_negatives=5, seed=0, epoch=0)[1][1:]) <= {"x", "y"}
    no_negatives = build_example(rec, 0, num_negatives=0, seed=0, epoch=0)[1]
    assert len(no_negatives) == 1 and no_negatives[0] in rec["pos"]


def test_eval_set(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"id": "d1", "text": "one"}, {"id": 2, "text": "two", "title": "T"}])
    queries = tmp_path / "q.jsonl"
    write_jsonl(queries, [{"query": "a", "relevant": ["d1"]}, {"query": "b", "relevant": {"2": 2, "d1": 0}}])
    ev = load_eval_set(queries, corpus, instruction="find")
    assert ev.queries == ["Instruct: find \n Query: a", "Instruct: find \n Query: b"]
    assert ev.relevant == [{"d1": 1.0}, {"2": 2.0}] and ev.docs == ["one", join_title("T", "two")] == ["one", "T two"]
    write_jsonl(queries, [{"query": "a", "relevant": ["d1"]}, {"query": "b", "relevant": ["nope"]}])
    with pytest.raises(ValueError, match=r"q.jsonl:2: relevant doc ids not in the corpus"):
        load_eval_set(queries, corpus)
    write_jsonl(corpus, [{"id": "d1", "text": "one"}, {"id": "d1", "text": "two"}])
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: duplicate document id"):
        load_eval_set(queries, corpus)


def test_config_validation(tmp_path):
    stage = dict(name="s", data=["x.jsonl"], steps=3)
    cfg = config_from_dict(dict(stages=[stage, dict(name="soup", type="soup", **{"from": ["s", "base"]})]))
    assert cfg.stages[0].hard_negatives == 7 and cfg.stages[1].from_ == ["s", "base"]
    with pytest.raises(ValueError, match=r"stages\[0\] \('s'\): unknown key\(s\) \['stepz'\]"):
        config_from_dict(dict(stages=[dict(stage, stepz=1)]))
    with pytest.raises(ValueError, match="exactly one of 'steps' or 'epochs'"):
        config_from_dict(dict(stages=[dict(stage, epochs=1)]))
    with pytest.raises(ValueError, match="refers to 'later'"):
        config_from_dict(dict(stages=[dict(stage, init="later")]))
    with pytest.raises(ValueError, match="refers to 'previous'"):
        config_from_dict(dict(stages=[stage, dict(name="soup", type="soup", **{"from": ["previous"]})]))
    with pytest.raises(ValueError, match="greedy, which needs an 'eval' section"):
        config_from_dict(dict(stages=[stage, dict(name="soup", type="soup", greedy=True, **{"from": ["s"]})]))
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nstages:\n  - {name: s, data: x.jsonl, epochs: 1, lr: 2.0e-5}\n")
    loaded = load_config(path)
    assert loaded.stages[0].data == ["x.jsonl"] and loaded.stages[0].lr == 2e-5


def test_distillation_and_mixing_settings_that_do_nothing_are_warned_of():
    stage = dict(name="s", data=["x.jsonl"], steps=3)
    with pytest.warns(UserWarning, match="stage 's': distill_temperature / teacher_temperature are set but "
                                         "distill_weight is 0"):
        config_from_dict(dict(stages=[dict(stage, teacher_temperature=1.0)]))
    with pytest.warns(UserWarning, match="distill_weight 1 leaves out the focal-InfoNCE term, which alone uses the 2 "
                                         "synthetic negatives"):
        config_from_dict(dict(stages=[dict(stage, distill_weight=1, num_synthetic=2)]))
    for mixing in (dict(mix_top_k=3), dict(mix_alpha=0.5), dict(mix_mode="list")):
        with pytest.warns(UserWarning, match="stage 's': mix_top_k / mix_alpha / mix_mode are set but num_synthetic "
                                             "is 0, so nothing is mixed"):
            config_from_dict(dict(stages=[dict(stage, **mixing)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict(dict(stages=[dict(stage, distill_weight=0.7, num_synthetic=2, teacher_temperature=1.0)]))


def test_example_configs_load():
    from pathlib import Path
    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("change, message", [
    (dict(max_grad_norm=-1), "'max_grad_norm' must be > 0 (or null), got -1.0"),
    (dict(steps=None, epochs=0), "'epochs' must be > 0, got 0.0"),
    (dict(batch_size=4.5), "'batch_size' must be a whole number, got 4.5"),
    (dict(batch_size=True), "'batch_size' must be a whole number, got True"),
    (dict(weight_decay=-0.1), "'weight_decay' must be >= 0, got -0.1"),
    (dict(lr="fast"), "'lr' must be a number, got 'fast'"),
    (dict(lr=0), "'lr' must be > 0, got 0.0"),
    (dict(lr=float("nan")), "'lr' must be a number, got nan"),
    (dict(temperature=0), "temperature"),
    (dict(steps="10"), "'steps' must be a whole number, got '10'"),
    (dict(data=[]), "'data' must be a non-empty list of JSONL paths"),
    (dict(data=[3]), "'data[0]' must be a string, got 3"),
    (dict(instructions={"t": 5}), "'instructions.t' must be a string, got 5"),
    (dict(task_weights={"t": -1}), "'task_weights' must be weights >= 0"),
    (dict(in_batch_negatives="yes"), "'in_batch_negatives' must be true or false, got 'yes'"),
    (dict(num_synthetic=2, hard_negatives=1), "it needs hard_negatives >= 2 and mix_top_k >= 2 (got 1 and None)"),
    (dict(mix_mode="listwise"), "mix_mode must be 'pair' or 'list', got 'listwise'"),
    (dict(matryoshka_dims=[16, 0]), "'matryoshka_dims' must be a non-empty list of ints >= 1"),
    (dict(matryoshka_dims=[16], matryoshka_weights=[1, 1]), "'matryoshka_weights' must be one weight >= 0 per"),
    (dict(matryoshka_dims=[16, 8], matryoshka_weights=[0, 0]), "one weight >= 0 per matryoshka_dims entry, not all 0"),
    (dict(save_every=0), "'save_every' must be >= 1 (or null), got 0"),
    (dict(keep_checkpoints=0), "'keep_checkpoints' must be >= 1, got 0"),
    (dict(keep_best=True), "'keep_best' needs 'eval_every'"),
    (dict(hard_negatives=0, in_batch_negatives=False), "'hard_negatives' 0 with in_batch_negatives False and "
                                                       "batch_size 32 leaves each query only its positive"),
    (dict(hard_negatives=0, batch_size=1), "'hard_negatives' 0 with in_batch_negatives True and batch_size 1"),
    (dict(data=["x.jsonl", "y.jsonl", "./x.jsonl"]), "'data' lists the file"),
    (dict(distill_weight=1.5), "distill_weight must be in [0, 1], got 1.5"),
    (dict(distill_weight="much"), "'distill_weight' must be a number, got 'much'"),
    (dict(distill_temperature=0), "distill_temperature must be > 0, got 0.0"),
    (dict(teacher_temperature=-1), "teacher_temperature must be > 0 (or None: distill_temperature), got -1.0"),
    (dict(distill_weight=0.5, hard_negatives=0), "it needs hard_negatives >= 1 (with none, the KL term is always 0)"),
])
def test_every_stage_value_is_checked_naming_its_key(change, message):
    stage = dict(dict(name="s", data=["x.jsonl"], steps=3), **change)
    with pytest.raises(ValueError) as error:
        config_from_dict(dict(stages=[stage]))
    assert str(error.value).startswith("stages[0] ('s'): ") and message in str(error.value), str(error.value)


@pytest.mark.parametrize("change, message", [
    (dict(log_every=0), "'log_every' must be >= 1, got 0"),
    (dict(max_length=0), "'max_length' must be >= 1, got 0"),
    (dict(seed=1.5), "'seed' must be a whole number, got 1.5"),
    (dict(dtype="float8"), "'dtype' must be one of"),
    (dict(dtype="float16"), "'dtype' must be float32 or bfloat16 (float16 weights turn NaN under AdamW"),
    (dict(dtype="fp16"), "'dtype' must be float32 or bfloat16"),
    (dict(eval=dict(queries="q", corpus="c", metric="ndcg@7")), "eval: 'metric' must be one of"),
    (dict(eval=dict(queries="q", corpus="c", batch_size=0)), "eval: 'batch_size' must be >= 1"),
    (dict(eval=dict(queries="q")), "eval: missing key(s) ['corpus']"),
    (dict(stages="s"), "'stages' must be a list of stages"),
])
def test_every_global_value_is_checked_naming_its_key(change, message):
    raw = dict(dict(stages=[dict(name="s", data=["x.jsonl"], steps=3)]), **change)
    with pytest.raises(ValueError) as error:
        config_from_dict(raw)
    assert message in str(error.value), str(error.value)


def test_bfloat16_weights_warn_that_small_updates_are_lost():
    raw = dict(stages=[dict(name="s", data=["x.jsonl"], steps=3)])
    with pytest.warns(UserWarning, match="AdamW updates smaller than half a bf16 unit are lost"):
        config_from_dict(dict(raw, dtype="bfloat16"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict(dict(raw, dtype="float32"))
        config_from_dict(raw)


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", ".", "..", ".hidden", "", "a\0b", "run.json",
                                  "metrics.jsonl"])
@pytest.mark.parametrize("kind", ["train", "soup"])
def test_a_stage_name_must_be_one_plain_directory_name(name, kind):
    """A stage's name is its directory under output_dir: nothing that leaves it, hides among temporaries or is
    one of the run's own files."""
    train = dict(name="s", data=["x.jsonl"], steps=3)
    stages = [dict(train, name=name)] if kind == "train" else [train, {"name": name, "type": "soup", "from": ["s"]}]
    with pytest.raises(ValueError, match=r"'name' must be a plain directory name \(not empty, no '/'"):
        config_from_dict(dict(stages=stages))


def test_a_data_file_listed_twice_is_refused_by_its_resolved_path(tmp_path):
    (tmp_path / "d.jsonl").write_text(GOOD + "\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "d.jsonl")
    stage = dict(name="s", data=[str(tmp_path / "d.jsonl"), str(tmp_path / "link.jsonl")], steps=3)
    message = f"stages[0] ('s'): 'data' lists the file {(tmp_path / 'd.jsonl').resolve()} twice"
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict(dict(stages=[stage]))
    once = config_from_dict(dict(stages=[dict(stage, data=[str(tmp_path / "d.jsonl")])]))
    assert once.stages[0].data == [str(tmp_path / "d.jsonl")]


def test_soup_stage_values_are_checked():
    train = dict(name="s", data=["x.jsonl"], steps=3)
    with pytest.raises(ValueError, match=r"stages\[1\] \('soup'\): 'weights' must be one weight >= 0 per 'from'"):
        config_from_dict(dict(stages=[train, dict(name="soup", type="soup", weights=[1], **{"from": ["s", "base"]})]))
    with pytest.raises(ValueError, match="'from' must be a non-empty list"):
        config_from_dict(dict(stages=[train, dict(name="soup", type="soup")]))


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as the string "1e-3": taken as the number it means."""
    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  - {name: s, data: x.jsonl, steps: 2, lr: 1e-3, weight_decay: 0, "
                    "max_grad_norm: 5e-1}\n")
    stage = load_config(path).stages[0]
    assert stage.lr == 1e-3 and isinstance(stage.lr, float) and stage.max_grad_norm == 0.5
    assert stage.weight_decay == 0.0


def test_unreadable_yaml_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stages: [\n")
    with pytest.raises(ValueError, match=r"c.yaml: not a readable YAML config"):
        load_config(path)


def test_flagembedding_prompt_is_the_query_instruction(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"query": "q", "pos": ["p"], "prompt": "Find the answer"}),
                                         json.dumps({"query": "q2", "pos": ["p"], "prompt": "x", "instruction": "x"})])
    data = TrainData(path, instructions={"d": "task default"})
    assert data[0]["instruction"] == "Find the answer" and data[1]["instruction"] == "x"
    query, _, _ = build_example(data[0], 0, num_negatives=0, seed=0, epoch=0)
    assert query == format_query("q", "Find the answer")
    _write(path, [json.dumps({"query": "q", "pos": ["p"], "prompt": "a", "instruction": "b"})])
    with pytest.raises(ValueError, match="d.jsonl:1: 'instruction' and 'prompt' differ"):
        TrainData(path)


def test_flagembedding_scores_and_type_are_checked_and_reported_not_dropped_silently(tmp_path):
    row = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "pos_scores": [0.9], "neg_scores": [0.1, 0.2],
           "type": "normal", "id": 7}
    path = _write(tmp_path / "d.jsonl", [json.dumps(row)])
    with pytest.warns(UserWarning, match=r"d.jsonl: keys not used by kalm_fast's contrastive training: id, "
                                         r"neg_scores \(teacher scores: used by stages with distill_weight > 0\)"):
        data = TrainData(path)
    assert data.unused == {str(path): ["id", "neg_scores", "pos_scores", "type"]}
    with pytest.warns(UserWarning, match=r"training: id, type$"):  # a distilling stage uses the scores
        assert TrainData(path, teacher_scores=True).unused == {str(path): ["id", "type"]}
    _write(path, [json.dumps(dict(row, neg_scores=[0.1]))])
    with pytest.raises(ValueError, match=r"d.jsonl:1: 'neg_scores' must be a list of 2 numbers"):
        TrainData(path)


def test_a_distilling_stage_needs_the_teacher_scores_of_every_text(tmp_path):
    rows = [{"query": "q", "pos": ["p"], "neg": ["n1"], "pos_scores": [0.9], "neg_scores": [0.1]},
            {"query": "q2", "pos": ["p"], "pos_scores": [0.9]},  # no negatives: no neg_scores needed
            {"query": "q3", "pos": ["p"], "neg": ["n1", "n2"], "pos_scores": [0.9]}]
    path = _write(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    with pytest.warns(UserWarning, match="keys not used"):
        assert len(TrainData(path)) == 3  # contrastive stages do not need them
    with pytest.raises(ValueError, match=r"d.jsonl:3: no teacher scores \['neg_scores'\] \(one number per text\), "
                                         r"but the stage distills"):
        TrainData(path, teacher_scores=True)
    _write(path, [json.dumps({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [1.0]})])
    with pytest.raises(ValueError, match=r"d.jsonl:1: no teacher scores \['pos_scores'\]"):
        TrainData(path, teacher_scores=True)


def test_build_example_gives_the_teacher_scores_of_the_chosen_texts():
    pos, neg = ["p0", "p1", "p2"], [f"n{i}" for i in range(6)]
    rec = dict(query="q", pos=pos, neg=neg, task="t", instruction=None,
               pos_scores=[0.0, 1.0, 2.0], neg_scores=[10.0 + i for i in range(6)])

    def score(text):
        return float(text[1:]) + (10 if text[0] == "n" else 0)

    chosen_pos = set()
    for rid in range(30):
        for m in (0, 2, 6, 9):  # 9 > 6 negatives: drawn with replacement
            _, docs, scores = build_example(rec, rid, num_negatives=m, seed=1, epoch=rid % 3)
            assert len(docs) == len(scores) == 1 + m and scores == [score(t) for t in docs]
            chosen_pos.add(docs[0])
    assert chosen_pos == set(pos)
    without = dict(rec, pos_scores=None, neg_scores=None)
    assert build_example(without, 0, num_negatives=2, seed=1, epoch=0)[2] is None
    # the draws are those of a record without scores (runs resume the same)
    assert build_example(without, 5, num_negatives=4, seed=1, epoch=2)[1] == build_example(
        rec, 5, num_negatives=4, seed=1, epoch=2)[1]


@pytest.mark.parametrize("raw, message", [
    (b'{"query": "q", "pos": ""}', "'pos' holds an empty text at index 0"),
    (b'{"query": "q", "pos": ["ok", "  "]}', "'pos' holds an empty text at index 1"),
    (b'{"query": "q", "pos": ["ok"], "neg": ["n", ""]}', "'neg' holds an empty text at index 1"),
    (b'{"query": "q", "pos": ["caf\xe9"]}', "not valid UTF-8 \\(byte 0xe9 at column 28"),
    (b'{"query": "q", "pos": ["a\\ud800"]}', "'pos\\[0\\]' holds '\\\\ud800' at character 2, a lone surrogate"),
    (b'{"query": "q", "pos": ' + b"[" * 100000 + b"]" * 100000 + b"}", "JSON nested too deeply"),
])
def test_bad_texts_name_file_and_line(tmp_path, raw, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + raw + b"\n")
    with pytest.raises(ValueError, match=rf"train.jsonl:2: {message}"):
        TrainData(path)


def test_eval_files_name_file_and_line(tmp_path):
    corpus, queries = tmp_path / "corpus.jsonl", tmp_path / "q.jsonl"
    corpus.write_bytes(b'{"id": "d1", "text": "one"}\n{"id": "d2", "text": "tw\xff"}\n')
    write_jsonl(queries, [{"query": "a", "relevant": ["d1"]}])
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: not valid UTF-8"):
        load_eval_set(queries, corpus)
    write_jsonl(corpus, [{"id": "d1", "text": "one"}])
    write_jsonl(queries, [{"query": "a", "relevant": {"d1": "high"}}])
    with pytest.raises(ValueError, match=r"q.jsonl:1: 'relevant' grades must be numbers"):
        load_eval_set(queries, corpus)


# ---------------------------------------------------------------- pinned by mutation testing


@pytest.mark.parametrize("line, message", [
    (json.dumps({"query": "  ", "pos": ["p"]}), "'query' must be a non-empty string"),
    (json.dumps({"query": "q", "pos": ["p"], "task": ""}), "'task' must be a non-empty string"),
    (json.dumps({"query": "q", "pos": ["p"], "type": 3}), "'type' must be a string, got int"),
    ('{"query": "q", "pos": ["p"], "pos_scores": [NaN]}', "'pos_scores' must be a list of 1 numbers"),
    (json.dumps({"query": "q", "pos": ["p"], "pos_scores": [True]}), "'pos_scores' must be a list of 1 numbers"),
])
def test_more_bad_records_name_file_and_line(tmp_path, line, message):
    """A blank query, an empty task, a non-string FlagEmbedding ``type`` and non-finite or boolean teacher scores
    (Python's json reads NaN) are refused, not trained on."""
    path = _write(tmp_path / "train.jsonl", [GOOD, line])
    with pytest.raises(ValueError, match=rf"train.jsonl:2: {message}"):
        TrainData(path)


def test_empty_negatives_list_and_empty_instruction_are_accepted(tmp_path):
    """``neg: []`` means in-batch negatives only (like no ``neg``); ``instruction: ""`` is no instruction of its own,
    so the task's default instruction applies."""
    path = _write(tmp_path / "t.jsonl", [json.dumps({"query": "q", "pos": ["p"], "neg": [], "instruction": ""})])
    data = TrainData(path, instructions={"t": "task default"})
    assert data[0]["neg"] == [] and data[0]["instruction"] == "task default"


def test_one_hard_negative_asked_for_needs_one_in_every_record(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, json.dumps({"query": "q", "pos": ["p"]})])
    with pytest.raises(ValueError, match=r"d.jsonl:2: no hard negatives \('neg'\), but the stage asks for 1"):
        TrainData(path, min_negatives=1)


def test_sha256_is_of_the_file_bytes(tmp_path):
    """What ``--resume`` compares to find changed data: the sha256 of every byte, blank lines included."""
    import hashlib

    path = _write(tmp_path / "d.jsonl", [GOOD, "", GOOD])
    assert TrainData(path).sha256 == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}


def test_missing_file_and_no_records_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data: file not found: .*nope.jsonl"):
        TrainData(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"data: no records in .*blank.jsonl"):
        TrainData(_write(tmp_path / "blank.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match="expected at least one JSONL file"):
        TrainData([])


def test_eval_set_own_instruction_wins_and_bad_entries_are_refused(tmp_path):
    corpus, queries = tmp_path / "corpus.jsonl", tmp_path / "q.jsonl"
    write_jsonl(corpus, [{"id": "d1", "text": "one"}])
    write_jsonl(queries, [{"query": "a", "relevant": ["d1"], "instruction": "own"}, {"query": "b", "relevant": ["d1"]}])
    ev = load_eval_set(queries, corpus, instruction="default")
    assert ev.queries == [format_query("a", "own"), format_query("b", "default")]
    for row, message in [({"query": "a", "relevant": []}, "'relevant' is empty"),
                         ({"query": "a", "relevant": {"d1": 0}}, "'relevant' is empty"),
                         ({"query": "a", "relevant": {"d1": float("nan")}}, "'relevant' grades must be numbers"),
                         ({"query": "a", "relevant": {"d1": True}}, "'relevant' grades must be numbers"),
                         ({"query": "a", "relevant": ["d1"], "instruction": 3}, "'instruction' must be a string")]:
        write_jsonl(queries, [{"query": "ok", "relevant": ["d1"]}, row])
        with pytest.raises(ValueError, match=rf"q.jsonl:2: {re.escape(message)}"):
            load_eval_set(queries, corpus)
    write_jsonl(queries, [])
    with pytest.raises(ValueError, match="q.jsonl: no queries"):
        load_eval_set(queries, corpus)
    write_jsonl(queries, [{"query": "a", "relevant": ["d1"]}])
    write_jsonl(corpus, [{"id": "d1", "text": "one"}, {"id": "d2"}])
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: expected an object with 'id' and 'text'"):
        load_eval_set(queries, corpus)


def test_sampler_refuses_bad_batch_size_and_negative_weights():
    tasks = {"a": list(range(8))}
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TaskBatchSampler(tasks, 0)
    with pytest.raises(ValueError, match="task_weights must be >= 0"):
        TaskBatchSampler({**tasks, "b": list(range(8, 16))}, 2, task_weights={"b": -1.0})


def test_sampler_weight_above_one_repeats_every_batch_evenly():
    """Weight 2: each of the task's batches twice per epoch (not one batch over and over)."""
    s = TaskBatchSampler({"a": list(range(12))}, 2, seed=3, task_weights={"a": 2.0})
    batches = [tuple(ids) for _, ids, _ in _take(s, s.batches_per_epoch())]
    assert len(batches) == 12 and all(batches.count(b) == 2 for b in batches)
    assert sorted(i for b in set(batches) for i in b) == list(range(12))


def test_sampler_mixes_tasks_within_an_epoch_and_ignores_task_order():
    """All batches of an epoch are shuffled together (not task by task), and the order is a function of (seed,
    epoch) only: listing the tasks in another order changes nothing."""
    tasks = {"a": list(range(20)), "b": list(range(20, 40))}
    batches = _take(TaskBatchSampler(tasks, 2, seed=0), 20)
    order = [t for t, _, _ in batches]
    assert order != sorted(order) and order != sorted(order, reverse=True)
    assert batches == _take(TaskBatchSampler(dict(reversed(list(tasks.items()))), 2, seed=0), 20)


def test_sampler_state_refuses_another_batch_size():
    s = TaskBatchSampler({"a": list(range(8))}, 2, seed=1)
    with pytest.raises(ValueError, match="batch_size=2; this run has seed=1, batch_size=4"):
        TaskBatchSampler({"a": list(range(8))}, 4, seed=1).load_state_dict(s.state_dict())


def test_sampler_coverage():
    s = TaskBatchSampler({"big": list(range(10)), "even": list(range(10, 18)), "tiny": [99]}, 4)
    assert s.coverage() == dict(tasks_smaller_than_a_batch={"tiny": 1}, left_out_per_epoch={"big": 2})


def test_build_example_draws_depend_on_record_and_epoch():
    """Exactly M negatives available: all of them, none twice. The positive and the negatives are drawn anew per
    record id and per epoch (not always the first positive, not the same draw for every record)."""
    rec = dict(query="q", pos=["p1", "p2", "p3"], neg=[f"n{i}" for i in range(5)], task="t", instruction=None)
    for rid in range(10):
        assert sorted(build_example(rec, rid, num_negatives=5, seed=0, epoch=0)[1][1:]) == sorted(rec["neg"])
    draws = [build_example(rec, rid, num_negatives=2, seed=0, epoch=0)[1] for rid in range(20)]
    assert {d[0] for d in draws} == set(rec["pos"]) and len({tuple(d) for d in draws}) > 5
    epochs = [build_example(rec, 0, num_negatives=2, seed=0, epoch=e)[1] for e in range(20)]
    assert {d[0] for d in epochs} == set(rec["pos"])
    with pytest.raises(ValueError, match=r"record 4 \('q'\) has no hard negatives but 2 are asked for"):
        build_example(dict(rec, neg=[]), 4, num_negatives=2, seed=0, epoch=0)
