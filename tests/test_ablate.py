"""kalm-fast ablate: variants x seeds, the table and its files, choices on the validation split only, bad input."""
import json
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_utils import make_records, make_tiny_model, max_abs_diff

import kalm_fast.train.ablation as ablation_mod
import kalm_fast.train.trainer as trainer_mod
from kalm_fast.train.ablation import Ablation, ablate, format_table, paired_bootstrap_ci, plot_results
from kalm_fast.train.config import TrainStage, config_from_dict
from kalm_fast.train.data import write_jsonl

VARIANT_ORDER = ["start", "plain", "focal", "mixing", "focal_mixing", "soup"]


def _split(root, prefix, records):
    """An eval split whose doc ids start with ``prefix`` (the sentinel that tells the splits apart); the records'
    negatives are distractors in the corpus."""
    corpus = [dict(id=f"{prefix}{i}", text=r["pos"][0]) for i, r in enumerate(records)]
    corpus += [dict(id=f"{prefix}n{i}-{j}", text=t) for i, r in enumerate(records) for j, t in enumerate(r["neg"])]
    write_jsonl(root / f"{prefix}_corpus.jsonl", corpus)
    write_jsonl(root / f"{prefix}_queries.jsonl", [dict(query=r["query"], relevant=[f"{prefix}{i}"])
                                                   for i, r in enumerate(records)])
    return dict(queries=str(root / f"{prefix}_queries.jsonl"), corpus=str(root / f"{prefix}_corpus.jsonl"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    write_jsonl(root / "train.jsonl", make_records(24, negatives=3))
    return dict(root=root, model=make_tiny_model(root / "model", dropout=0.1),
                val=_split(root, "v", make_records(10, seed=5)), test=_split(root, "t", make_records(12, seed=9)))


def _raw(inputs, out, **stage):
    s = dict(name="ft", data=[str(inputs["root"] / "train.jsonl")], steps=3, batch_size=4, hard_negatives=2,
             lr=1e-3, temperature=0.05, gamma=0.5, num_synthetic=2, eval_every=2, keep_best=True)
    s.update(stage)
    return dict(model=str(inputs["model"]), output_dir=str(out), max_length=32, log_every=1,
                eval=dict(inputs["val"]), test=dict(inputs["test"]), stages=[s])


def _split_of(eval_set):
    return eval_set.doc_ids[0][0]  # "v" (validation) or "t" (test)


@pytest.fixture
def spy(monkeypatch):
    """Records every evaluation (split, per_query) and every data load, wherever it happens."""
    calls = dict(evaluations=[], train_data=0, eval_sets=[])
    real_eval, real_data, real_load = trainer_mod.evaluate_model, trainer_mod.TrainData, trainer_mod.load_eval_set

    def evaluate(model, eval_set, **kw):
        calls["evaluations"].append((_split_of(eval_set), kw.get("per_query", False)))
        return real_eval(model, eval_set, **kw)

    def train_data(*args, **kw):
        calls["train_data"] += 1
        return real_data(*args, **kw)

    def load(queries, corpus, **kw):
        calls["eval_sets"].append(str(queries))
        return real_load(queries, corpus, **kw)

    for module in (trainer_mod, ablation_mod):
        monkeypatch.setattr(module, "evaluate_model", evaluate)
    monkeypatch.setattr(trainer_mod, "load_eval_set", load)  # behind load_split, which reads both splits
    monkeypatch.setattr(trainer_mod, "TrainData", train_data)
    return calls


CELL = r"\d\.\d{4} ± \d\.\d{4}"
DIFF = r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]"


def _check_table(text, results):
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| variant"))
    assert lines[header] == ("| variant | nDCG@10 | Recall@10 | MRR@10 | Δ nDCG@10 | Δ Recall@10 | Δ MRR@10 |")
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[header + 2:header + 2 + 6]]
    assert [r[0] for r in rows] == [v["label"] for v in results["variants"]]
    assert all(re.fullmatch(r"\d\.\d{4}", c) for c in rows[0][1:4]) and rows[0][4:] == ["—"] * 3  # the start
    for r in rows[1:]:
        assert all(re.fullmatch(CELL, c) for c in r[1:4]), r
    assert rows[1][4:] == ["—"] * 3  # plain InfoNCE is the reference
    for r in rows[2:]:
        assert all(re.fullmatch(DIFF, c) for c in r[4:]), r
    assert lines[-1].startswith("Within noise (95% CI of Δ contains 0): ")


def test_ablation_choices_on_validation_only(inputs, tmp_path, spy, capsys, monkeypatch):
    out = tmp_path / "abl"
    results = ablate(config_from_dict(_raw(inputs, tmp_path / "run")), seeds=2, output_dir=out, show_progress=False)

    # one data index, each split read once
    assert spy["train_data"] == 1
    assert spy["eval_sets"] == [inputs["val"]["queries"], inputs["test"]["queries"]]
    # every choice (keep_best checkpoints, the greedy soups) saw validation only; test comes after all of them,
    # once per final model: the start, 4 variants x 2 seeds, 2 soups
    splits = [s for s, _ in spy["evaluations"]]
    assert set(splits[:splits.index("t")]) == {"v"} and set(splits[splits.index("t"):]) == {"t"}
    assert splits.count("v") >= 2 * 4 * 2  # at least the step-2 and final evaluations of every run
    assert [p for s, p in spy["evaluations"] if s == "t"] == [True] * 11

    assert [v["name"] for v in results["variants"]] == VARIANT_ORDER
    assert results["seeds"] == [0, 1] and results["test"]["num_queries"] == 12
    assert results["validation"]["num_queries"] == 10
    scores = json.loads((out / "scores.json").read_text())
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    by_name = {v["name"]: v for v in results["variants"]}
    for name in VARIANT_ORDER[1:]:
        row = by_name[name]
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for m in results["metrics"]:
            values = [r["test"][m] for r in row["runs"]]
            assert row["mean"][m] == pytest.approx(np.mean(values))
            assert row["std"][m] == pytest.approx(np.std(values, ddof=1))
            if name != "plain":
                d = row["diff_vs_plain"][m]
                assert d["mean"] == pytest.approx(row["mean"][m] - by_name["plain"]["mean"][m], abs=1e-12)
                assert d["ci_low"] <= d["ci_high"]
                assert d["within_noise"] == (d["ci_low"] <= 0 <= d["ci_high"])
    assert by_name["plain"]["diff_vs_plain"] is None
    assert by_name["focal"]["settings"] == dict(gamma=0.5, num_synthetic=0)
    assert by_name["mixing"]["settings"] == dict(gamma=0.0, num_synthetic=2)
    # the variants' loss settings reach training: with the same seed (same batches), each ends with other weights
    for seed in results["seeds"]:
        finals = [load_file(str(out / f"{v}-s{seed}/final/model.safetensors")) for v in VARIANT_ORDER[1:5]]
        for i, a in enumerate(finals):
            for b in finals[i + 1:]:
                assert max_abs_diff(a, b) > 1e-6

    # the soup of each seed is the greedy choice made from validation scores, and is what was written
    for run in by_name["soup"]["runs"]:
        seed = run["seed"]
        candidates = [f"{v}-s{seed}" for v in ("plain", "focal", "mixing", "focal_mixing")]
        val = {c: scores[c] for c in candidates}
        members, best = [max(candidates, key=lambda c: val[c])], max(val.values())
        for r in (r for r in records if r.get("stage") == f"soup-s{seed}" and "soup_candidates" in r):
            if r["score"] >= best:
                members, best = r["soup_candidates"], r["score"]
        assert run["members"] == members and scores[f"soup-s{seed}"] == pytest.approx(best)
        weights = [load_file(str(out / m / "final/model.safetensors")) for m in members]
        soup = load_file(str(out / f"soup-s{seed}/final/model.safetensors"))
        for k in soup:
            if soup[k].is_floating_point():
                torch.testing.assert_close(soup[k], sum(w[k] for w in weights) / len(weights))

    # files: JSON = the returned results, the table, the chart
    assert json.loads((out / "ablation.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "ablation.md").read_text()
    assert table == format_table(results) + "\n"
    _check_table(table, results)
    if results["files"]["png"] is not None:
        assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the CLI on the same output with --resume: training is skipped, test is scored again, same numbers;
    # without matplotlib the chart is skipped with a clear line
    import sys

    from kalm_fast.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_raw(inputs, tmp_path / "run")))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    spy["evaluations"].clear()
    capsys.readouterr()
    assert main(["ablate", str(config), "--seeds", "2", "--output-dir", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert [s for s, _ in spy["evaluations"]] == ["t"] * 11
    assert "matplotlib is not installed: skipped the bar chart" in printed
    assert not (out / "ablation.png").exists()
    assert format_table(results) in printed
    again = json.loads((out / "ablation.json").read_text())
    assert again["variants"] == json.loads(json.dumps(results["variants"]))


def test_trainer_never_reads_the_test_split(inputs, tmp_path, spy):
    """`kalm-fast train` (the demo's path): keep_best and the greedy soup evaluate on validation only."""
    raw = _raw(inputs, tmp_path / "run", steps=2, eval_every=1)
    raw["stages"] += [dict(raw["stages"][0], name="ft2", init="base", seed=1),
                      {"name": "soup", "type": "soup", "greedy": True, "from": ["ft", "ft2", "base"]}]
    trainer_mod.Trainer(config_from_dict(raw), show_progress=False).train()
    assert spy["eval_sets"] == [inputs["val"]["queries"]]
    assert {s for s, _ in spy["evaluations"]} == {"v"} and len(spy["evaluations"]) >= 6


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.1, 400)
    assert paired_bootstrap_ci(np.full(50, 0.25)) == pytest.approx((0.25, 0.25))
    low, high = paired_bootstrap_ci(noise - noise.mean())
    assert low < 0 < high
    low, high = paired_bootstrap_ci(noise + 0.1)  # a clear effect: 0.1 against a standard error of 0.005
    assert 0.08 < low < 0.1 < high < 0.12
    # the interval is about +-1.96 standard errors, and the same for the same seed
    se = noise.std() / np.sqrt(noise.size)
    assert (high - low) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.15)
    assert paired_bootstrap_ci(noise, seed=3) == paired_bootstrap_ci(noise, seed=3)
    assert paired_bootstrap_ci(noise, seed=3) != paired_bootstrap_ci(noise, seed=4)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        paired_bootstrap_ci([])


def test_row_labels_name_what_each_variant_runs():
    """The mixing row names the list-wise variant when the stage uses it; a distilling stage says so on the plain
    row (every variant distills)."""
    def labels(**stage):
        return ablation_mod._labels(TrainStage(name="ft", data=["x.jsonl"], steps=3, **stage))

    assert labels(num_synthetic=2)["mixing"] == "+ mixing (2 synthetic/query)"
    assert labels(num_synthetic=3, mix_mode="list")["mixing"] == "+ mixing (3 synthetic/query, list-wise)"
    assert labels(gamma=0.5)["plain"] == "plain InfoNCE (γ=0, no mixing)"
    assert labels(distill_weight=0.7)["plain"] == "plain InfoNCE (γ=0, no mixing), + distillation (w=0.7) in every run"


def _fake_results():
    row = dict(label="x", mean={"ndcg@10": 0.5}, std={"ndcg@10": 0.01}, diff_vs_plain=None)
    return dict(variants=[row], metrics=["ndcg@10"], stage="ft", seeds=[0, 1])


def test_plot_results(monkeypatch):
    pytest.importorskip("matplotlib")
    assert plot_results(_fake_results())[:8] == b"\x89PNG\r\n\x1a\n"
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_results(_fake_results()) is None


@pytest.mark.parametrize("change, message", [
    (dict(test=None), "needs a 'test' section"),
    (dict(eval=None), "needs an 'eval' section"),
    (dict(stage=dict(gamma=0.0)), "gamma 0.0, so '\\+ focal' would be plain InfoNCE"),
    (dict(stage=dict(num_synthetic=0)), "num_synthetic 0, so '\\+ mixing'"),
    (dict(stage=dict(hard_negatives=1)), "needs hard_negatives >= 2 and mix_top_k >= 2"),  # the config's check
    (dict(stage=dict(distill_weight=1.0)), "has distill_weight 1: its loss is the distillation term alone"),
    (dict(options=dict(seeds=0)), "seeds must be an integer >= 1, got 0"),
    (dict(options=dict(resamples=0)), "resamples must be an integer >= 1"),
    (dict(options=dict(stage="nope")), "stage 'nope' is not a training stage"),
    (dict(overlap=True), "share 10 queries"),
    (dict(test=dict(queries="missing.jsonl", corpus="c.jsonl")), "test.queries: cannot read 'missing.jsonl': it does "
                                                                 "not exist"),
])
@pytest.mark.filterwarnings("ignore:stage 'ft'. distill_weight 1 leaves out")
def test_bad_input_is_a_clear_error_before_training(inputs, tmp_path, change, message):
    raw = _raw(inputs, tmp_path / "run", **change.get("stage", {}))
    for key in ("test", "eval"):
        if key in change:
            raw[key] = change[key]
    if change.get("overlap"):  # test queries that include the validation queries
        rows = [json.loads(line) for line in open(inputs["val"]["queries"])]
        write_jsonl(tmp_path / "q.jsonl", [dict(r, relevant=["t0"]) for r in rows])
        raw["test"]["queries"] = str(tmp_path / "q.jsonl")
    with pytest.raises(ValueError, match=message):
        Ablation(config_from_dict(raw), output_dir=tmp_path / "abl", **change.get("options", {}))
    assert not (tmp_path / "abl").exists()


def test_config_rejects_test_equal_to_validation(inputs, tmp_path):
    raw = _raw(inputs, tmp_path / "run")
    raw["test"] = dict(inputs["val"])
    with pytest.raises(ValueError, match="test.queries and eval.queries are the same file"):
        config_from_dict(raw)


def test_cli_errors_name_the_argument(inputs, tmp_path, capsys):
    from kalm_fast.cli import main

    assert main(["ablate", "c.yaml", "--seeds", "0"]) == 2
    assert "argument --seeds: must be >= 1, got 0" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(dict(_raw(inputs, tmp_path / "run"), test=None)))
    assert main(["ablate", str(config)]) == 2
    assert f"kalm-fast ablate: error: {config}: ablate needs a 'test' section" in capsys.readouterr().err


@pytest.mark.parametrize("confidence, label", [(0.95, "95%"), (0.999, "99.9%"), (0.975, "97.5%")])
def test_the_table_names_the_confidence_level_as_given(confidence, label):
    results = dict(stage="ft", seeds=[0], test=dict(num_queries=3, num_docs=9), validation=dict(num_queries=2),
                   bootstrap=dict(confidence=confidence, resamples=10), metrics=["ndcg@10"],
                   variants=[dict(label="plain", mean={"ndcg@10": 0.5}, std=None, diff_vs_plain=None)])
    text = format_table(results)
    assert f"[{label} paired bootstrap CI" in text and f"Within noise ({label} CI of Δ contains 0)" in text
