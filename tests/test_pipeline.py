"""The whole KaLM-Embedding-V2 pipeline as README's "each step a command" gives it, on a tiny model: pre-train on pairs
with in-batch negatives, mine hard negatives with that model, add a teacher's scores, fine-tune twice (focal loss,
list-wise mixing, distillation) and soup the two, then evaluate. Each step reads what the previous one wrote."""
import json
import math

import yaml
from train_utils import make_records, make_tiny_model

from kalm_fast.cli import main
from kalm_fast.train.data import write_jsonl


def _run(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_pretrain_mine_score_finetune_soup_eval(tmp_path, capsys):
    base, teacher = make_tiny_model(tmp_path / "base", seed=1), make_tiny_model(tmp_path / "teacher", seed=2)
    records = make_records(48, negatives=4, seed=3)
    write_jsonl(tmp_path / "pairs.jsonl", [dict(query=r["query"], pos=r["pos"], task=r["task"]) for r in records])
    write_jsonl(tmp_path / "pool.jsonl", [dict(text=t) for r in records for t in r["neg"]])
    write_jsonl(tmp_path / "queries.jsonl", [dict(query=r["query"], relevant=[f"d{i}"]) for i, r in
                                             enumerate(records[:12])])
    write_jsonl(tmp_path / "corpus.jsonl", [dict(id=f"d{i}", text=r["pos"][0]) for i, r in enumerate(records)])
    common = dict(max_length=32, batch_size=8, steps=3, lr=1e-3, temperature=0.05)

    def config(name, model, stages):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(model=str(model), output_dir=str(tmp_path / name),
                                            max_length=common["max_length"], stages=stages)))
        return path

    stage = {k: v for k, v in common.items() if k != "max_length"}
    _run(["train", config("pre", base, [dict(name="pretrain", data=[str(tmp_path / "pairs.jsonl")],
                                             hard_negatives=0, **stage)])], capsys)
    pretrained = tmp_path / "pre/pretrain/final"

    out = _run(["mine", "--model", pretrained, "--input", tmp_path / "pairs.jsonl", "--output",
                tmp_path / "mined.jsonl", "--corpus", tmp_path / "pool.jsonl", "--range", 2, 20, "--negatives", 3,
                "--max-positive-rank", 0, "--max-negative-ratio", 1.0], capsys)
    mined = [json.loads(line) for line in open(tmp_path / "mined.jsonl")]
    assert out.startswith("mined 48 of 48 records") and len(mined) > 24 and all(1 <= len(r["neg"]) <= 3 for r in mined)

    _run(["score", "--model", teacher, "--input", tmp_path / "mined.jsonl", "--output", tmp_path / "scored.jsonl"],
         capsys)
    scored = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    assert [(r["query"], r["neg"]) for r in scored] == [(r["query"], r["neg"]) for r in mined]
    assert all(len(r["pos_scores"]) == len(r["pos"]) and len(r["neg_scores"]) == len(r["neg"]) for r in scored)

    finetune = dict(data=[str(tmp_path / "scored.jsonl")], hard_negatives=3, gamma=0.5, num_synthetic=2,
                    mix_mode="list", distill_weight=0.7, init="base", **stage)
    stages = [dict(name="ft_a", seed=1, **finetune), dict(name="ft_b", seed=2, **finetune),
              dict(name="soup", type="soup", **{"from": ["ft_a", "ft_b"]})]
    _run(["train", config("ft", pretrained, stages)], capsys)
    metrics = [json.loads(line) for line in open(tmp_path / "ft/metrics.jsonl")]
    steps = [m for m in metrics if m.get("stage") in ("ft_a", "ft_b") and "distill_kl" in m]
    assert steps and all(math.isfinite(m["loss"]) and math.isfinite(m["distill_kl"]) for m in steps)

    out = _run(["eval", "--model", tmp_path / "ft/soup/final", "--queries", tmp_path / "queries.jsonl", "--corpus",
                tmp_path / "corpus.jsonl", "--max-length", 32, "--output", tmp_path / "eval.json"], capsys)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert "ndcg@10" in out and 0 <= result["ndcg@10"] <= 1
