"""Two processes on gloo (torchrun) take the same steps as one process with the global batch, evaluate together and
resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_utils import make_records, make_tiny_model, max_abs_diff

from kalm_fast.train.config import config_from_dict
from kalm_fast.train.data import write_jsonl
from kalm_fast.train.trainer import Trainer


def _stage(data, **kw):
    return dict(dict(name="ft", data=[str(data)], steps=3, batch_size=6, hard_negatives=2, lr=1e-3, warmup_ratio=0.0,
                     temperature=0.05, false_negative_margin=0.3), **kw)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_global_batch(tmp_path, parallel):
    """With both terms of the loss: focal-InfoNCE over every rank's documents, distillation over each query's own
    (w = 0.7, V2.5's; at w = 0.5 the two terms nearly cancel in some weight's gradient, and Adam's normalized step
    turns the fp32 rounding there into a 2.4e-5 difference: each term alone agrees within 1e-6)."""
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [dict(r, pos_scores=[len(t) / 9 for t in r["pos"]], neg_scores=[len(t) / 9 for t in r["neg"]])
                       for r in make_records(30, negatives=3)])
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    single = config_from_dict(dict(model=str(model), output_dir=str(tmp_path / "one"), max_length=32,
                                   stages=[_stage(data, distill_weight=0.7)]))
    one = Trainer(single, show_progress=False).train()

    config = tmp_path / "two.yaml"
    import yaml
    config.write_text(yaml.safe_dump(dict(model=str(model), output_dir=str(tmp_path / "two"), max_length=32,
                                          parallel=parallel,
                                          stages=[_stage(data, gradcache_chunk=4, save_every=2, distill_weight=0.7)])))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kalm_fast.cli", "train", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    a = load_file(str(one / "model.safetensors"))
    b = load_file(str(tmp_path / "two/ft/final/model.safetensors"))
    assert max_abs_diff(a, load_file(str(model / "model.safetensors"))) > 1e-3  # the steps moved the weights
    assert max_abs_diff(a, b) < 2e-5
    # rank 0 alone logs and writes checkpoints
    records = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3]  # log_every=10: only the last step
    assert sum("data" in r for r in records) == 1
    assert [p.name for p in (tmp_path / "two/ft/checkpoints").iterdir()] == ["step-0000002"]
    # a crash after the checkpoint of step 2: --resume redoes step 3 (sharded optimizer state under FSDP)
    shutil.rmtree(tmp_path / "two/ft/final")
    proc = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    c = load_file(str(tmp_path / "two/ft/final/model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    records = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3]  # the redone step is logged once


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_keep_the_best_model_and_resume_uneven_shards(tmp_path, parallel):
    """Every rank takes rank 0's eval metrics, so all save the best model together (rank 0 alone saving it hung the
    others); an FSDP model is evaluated through its own forward (the packed fast path cannot read sharded weights);
    FSDP resumes the optimizer state of weights split unevenly over the ranks (65 position embeddings)."""
    data = tmp_path / "train.jsonl"
    write_jsonl(data, make_records(30, negatives=3))
    evals = make_records(8, seed=9)
    write_jsonl(tmp_path / "corpus.jsonl", [dict(id=f"d{i}", text=r["pos"][0]) for i, r in enumerate(evals)])
    write_jsonl(tmp_path / "queries.jsonl", [dict(query=r["query"], relevant=[f"d{i}"]) for i, r in enumerate(evals)])
    model = make_tiny_model(tmp_path / "model", positions=65)
    config = tmp_path / "two.yaml"
    import yaml
    config.write_text(yaml.safe_dump(dict(
        model=str(model), output_dir=str(tmp_path / "two"), max_length=32, parallel=parallel,
        eval=dict(queries=str(tmp_path / "queries.jsonl"), corpus=str(tmp_path / "corpus.jsonl")),
        stages=[_stage(data, gradcache_chunk=4, save_every=1, eval_every=1, keep_best=True)])))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kalm_fast.cli", "train", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    records = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [1, 2, 3, None]  # each step, then the final model
    scores = json.loads((tmp_path / "two/scores.json").read_text())
    best = load_file(str(tmp_path / "two/ft/final/model.safetensors"))
    # a crash after step 3's evaluation, before best/ became final/ and was scored: --resume (from the checkpoint of
    # step 2) ends with the same model and score
    os.replace(tmp_path / "two/ft/final", tmp_path / "two/ft/best")
    (tmp_path / "two/scores.json").write_text(json.dumps({k: v for k, v in scores.items() if k != "ft"}))
    proc = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    resumed = load_file(str(tmp_path / "two/ft/final/model.safetensors"))
    assert all(torch.equal(best[k], resumed[k]) for k in best)
    assert json.loads((tmp_path / "two/scores.json").read_text()) == scores
    records = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval" in r) for r in records if "loss" not in r] == [
        (None, False), (1, True), (2, True), (3, True), (None, True)]  # the data record first, step 3 redone once
