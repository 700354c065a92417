"""The trainer: exact resume after an interruption, stages, soups, evaluation-driven choices, the CLI."""
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import make_records, make_tiny_model, max_abs_diff

from kalm_fast.train import trainer as trainer_module
from kalm_fast.train.config import config_from_dict
from kalm_fast.train.data import write_jsonl
from kalm_fast.train.losses import FocalInfoNCELoss
from kalm_fast.train.trainer import Trainer, lr_lambda


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_jsonl(root / "train.jsonl", make_records(24, negatives=3))
    corpus = [dict(id=f"d{i}", text=r["pos"][0]) for i, r in enumerate(make_records(12, seed=9))]
    write_jsonl(root / "corpus.jsonl", corpus)
    write_jsonl(root / "queries.jsonl", [dict(query=r["query"], relevant=[f"d{i}"])
                                         for i, r in enumerate(make_records(12, seed=9))])
    return dict(root=root, model=make_tiny_model(root / "model", dropout=0.1))


def _config(inputs, out, evaluated=False, log_every=1, **stage):
    s = dict(name="ft", data=[str(inputs["root"] / "train.jsonl")], steps=5, batch_size=4, hard_negatives=2,
             lr=1e-3, warmup_ratio=0.2, temperature=0.05, num_synthetic=2, gradcache_chunk=5, save_every=2)
    s.update(stage)
    split = dict(queries=str(inputs["root"] / "queries.jsonl"), corpus=str(inputs["root"] / "corpus.jsonl"))
    return config_from_dict(dict(model=str(inputs["model"]), output_dir=str(out), max_length=32, log_every=log_every,
                                 stages=[s], **(dict(eval=split) if evaluated else {})))


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_resume_gives_the_weights_of_an_uninterrupted_run(inputs, tmp_path):
    full = Trainer(_config(inputs, tmp_path / "full"), show_progress=False).train()

    def stop_at_3(stage, step):
        if step == 3:  # the checkpoint of step 2 exists; step 3 is lost and must be redone
            raise Interrupted

    cfg = _config(inputs, tmp_path / "cut")
    with pytest.raises(Interrupted):
        Trainer(cfg, on_step=stop_at_3, show_progress=False).train()
    assert [p.name for p in (tmp_path / "cut/ft/checkpoints").iterdir()] == ["step-0000002"]
    with pytest.raises(ValueError, match="pass --resume"):
        Trainer(cfg, show_progress=False).train()
    resumed = Trainer(cfg, resume=True, show_progress=False).train()
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), max_abs_diff(a, b)
    assert max_abs_diff(a, _weights(inputs["model"])) > 1e-3  # training did change the weights
    records = [json.loads(line) for line in open(tmp_path / "cut/metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]  # step 3 redone, logged once
    assert all(datetime.fromisoformat(r["time"]).tzinfo is not None for r in records)
    assert [r["data"]["records"] for r in records if "data" in r] == [24]
    assert [r["step"] for r in records] == [None, 1, 2, 3, 4, 5]  # the stage's data record first, in order
    # a finished run resumes to a no-op
    assert Trainer(cfg, resume=True, show_progress=False).train() == resumed


def _logged(out):
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def test_a_resumed_runs_log_lines_equal_an_uninterrupted_runs(inputs, tmp_path):
    """A log line every 3 steps, a checkpoint every 2: the losses of steps 1-2 since the last line travel in the
    checkpoint, so the line of step 3 after a resume averages the same three; each line's lr is its step's."""
    Trainer(_config(inputs, tmp_path / "full", log_every=3, steps=6), show_progress=False).train()
    cfg = _config(inputs, tmp_path / "cut", log_every=3, steps=6)

    def stop_at_3(stage, step):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        Trainer(cfg, on_step=stop_at_3, show_progress=False).train()
    Trainer(cfg, resume=True, show_progress=False).train()
    assert _logged(tmp_path / "cut") == _logged(tmp_path / "full")
    assert [step for step, _, _ in _logged(tmp_path / "full")] == [3, 6]
    # linear decay after 1 warmup step: step 6 runs at 1/5 of the peak (0 is the rate after the last step)
    assert _logged(tmp_path / "full")[-1][2] == pytest.approx(1e-3 * lr_lambda(6, 1, "linear")(5))


def test_a_stage_trained_anew_is_scored_anew(inputs, tmp_path):
    """A finished stage deleted and trained again (no --resume: nothing left to continue) gets its new model's score,
    not the cached score of the model that is gone; a finished stage whose score was never recorded gets it on
    --resume."""
    out = tmp_path / "run"
    Trainer(_config(inputs, out, evaluated=True, steps=1, save_every=None, lr=1e-6), show_progress=False).train()
    shutil.rmtree(out / "ft")
    Trainer(_config(inputs, out, evaluated=True, steps=3, save_every=None), show_progress=False).train()
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval" in r]
    assert len(evals) == 1
    assert json.loads((out / "scores.json").read_text()) == {"ft": evals[0]["eval"]["ndcg@10"]}
    # killed after the final model was saved, before its score was: --resume scores it
    (out / "scores.json").unlink()
    Trainer(_config(inputs, out, evaluated=True, steps=3, save_every=None), resume=True, show_progress=False).train()
    assert json.loads((out / "scores.json").read_text()) == {"ft": evals[0]["eval"]["ndcg@10"]}


def test_keep_best_after_a_resume_keeps_the_best_scoring_model(inputs, tmp_path, monkeypatch):
    """keep_best: the stage's final model is its best-scoring evaluation's, also when that evaluation came before an
    interruption. The metric here falls as training moves the weights away from the base model: step 1 is best."""
    from kalm_fast.models import EmbeddingModel

    base = {n: p.detach() for n, p in EmbeddingModel.from_pretrained(str(inputs["model"]), max_length=32)
            .named_parameters()}
    evaluated = []  # (score, weights), in the order of the evaluations

    def distance_metric(model, eval_set, batch_size):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        evaluated.append((-sum(float((w - base[n]).abs().sum()) for n, w in weights.items()), weights))
        return {"ndcg@10": evaluated[-1][0]}

    def stop_at_3(stage, step):
        if step == 3:  # after step 3's evaluation; the checkpoint of step 2 holds best = step 1's score
            raise Interrupted

    monkeypatch.setattr(trainer_module, "evaluate_model", distance_metric)
    cfg = _config(inputs, tmp_path / "run", evaluated=True, eval_every=1, keep_best=True)
    with pytest.raises(Interrupted):
        Trainer(cfg, on_step=stop_at_3, show_progress=False).train()
    step_1 = evaluated[0]
    final = Trainer(cfg, resume=True, show_progress=False).train()

    records = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    steps = [r["step"] for r in records if "eval" in r]
    scores = [r["eval"]["ndcg@10"] for r in records if "eval" in r]
    assert steps == [1, 2, 3, 4, 5, None]  # each step once (step 3 redone), then the final model
    assert scores[0] == step_1[0] and scores[:5] == sorted(scores[:5], reverse=True) and scores[0] > scores[1]
    assert json.loads((tmp_path / "run/scores.json").read_text())["ft"] == scores[-1] == step_1[0]
    got = dict(EmbeddingModel.from_pretrained(str(final), max_length=32).named_parameters())
    assert all(torch.equal(got[n], w) for n, w in step_1[1].items())
    assert [r["step"] for r in records if "eval" not in r] == [None, 1, 2, 3, 4, 5]  # data record, then the steps


def test_stages_soup_and_eval(inputs, tmp_path):
    raw = dict(
        model=str(inputs["model"]), output_dir=str(tmp_path / "run"), max_length=32, log_every=2,
        eval=dict(queries=str(inputs["root"] / "queries.jsonl"), corpus=str(inputs["root"] / "corpus.jsonl")),
        stages=[
            dict(name="a", data=[str(inputs["root"] / "train.jsonl")], steps=3, batch_size=4, hard_negatives=1,
                 lr=1e-3, eval_every=2, keep_best=True),
            dict(name="b", init="base", data=[str(inputs["root"] / "train.jsonl")], steps=2, batch_size=6,
                 hard_negatives=0, lr=5e-4, seed=3, matryoshka_dims=[32, 16], matryoshka_weights=[1, 0.5]),
            dict(name="plain", type="soup", weights=[3, 1], **{"from": ["a", "b"]}),
            dict(name="greedy", type="soup", greedy=True, **{"from": ["a", "b", "base"]}),
        ])
    final = Trainer(config_from_dict(raw), show_progress=False).train()
    out = tmp_path / "run"
    assert final == out / "greedy" / "final"
    wa, wb = _weights(out / "a/final"), _weights(out / "b/final")
    soup = _weights(out / "plain/final")
    for k in wa:
        torch.testing.assert_close(soup[k], 0.75 * wa[k] + 0.25 * wb[k])
    scores = json.loads((out / "scores.json").read_text())
    assert {"a", "b", "plain", "greedy", "greedy:base"} <= set(scores)
    assert scores["greedy"] >= max(scores["a"], scores["b"], scores["greedy:base"]) - 1e-9
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("eval" in r and r["stage"] == "a" and r["step"] == 2 for r in records)
    assert any(r.get("soup") for r in records)
    assert (out / "greedy/final/modules.json").is_file() and (out / "greedy/final/tokenizer.json").is_file()


def test_soup_with_the_embedded_model_as_base(inputs, tmp_path):
    """The embedded MiniLM's file holds a legacy ``position_ids`` buffer that the stages' saved models do not: the
    soup takes the base as the stages save it."""
    from kalm_fast.models.loading import default_model_dir

    raw = dict(output_dir=str(tmp_path / "run"), max_length=32, stages=[
        dict(name="ft", data=[str(inputs["root"] / "train.jsonl")], steps=1, batch_size=2, hard_negatives=1, lr=1e-3),
        dict(name="soup", type="soup", **{"from": ["ft", "base"]})])
    final = Trainer(config_from_dict(raw), show_progress=False).train()
    out = tmp_path / "run"
    ft, base, soup = _weights(out / "ft/final"), _weights(out / "soup/base"), _weights(final)
    assert "embeddings.position_ids" in load_file(str(default_model_dir() / "model.safetensors"))
    assert soup.keys() == ft.keys() == base.keys()
    for k in soup:
        torch.testing.assert_close(soup[k], 0.5 * ft[k] + 0.5 * base[k])
    assert max_abs_diff(ft, base) > 1e-6  # the step moved the weights


def test_cli_train_and_eval(inputs, tmp_path):
    from kalm_fast.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {inputs['model']}\noutput_dir: {tmp_path / 'out'}\nmax_length: 32\n"
        f"stages:\n  - {{name: s, data: {inputs['root'] / 'train.jsonl'}, steps: 2, batch_size: 4, "
        "hard_negatives: 1}\n")
    assert main(["train", str(config)]) == 0
    assert (tmp_path / "out/s/final/model.safetensors").is_file()
    assert main(["eval", "--model", str(tmp_path / "out/s/final"), "--queries", str(inputs["root"] / "queries.jsonl"),
                 "--corpus", str(inputs["root"] / "corpus.jsonl"), "--k", "1", "10",
                 "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"ndcg@1", "ndcg@10", "recall@1", "recall@10", "mrr@1", "mrr@10"}
    # the Encoder path of `kalm-fast eval` agrees with the trainer's in-memory evaluation
    from kalm_fast.models import EmbeddingModel
    from kalm_fast.train.data import load_eval_set
    from kalm_fast.train.evaluate import evaluate_model
    ev = load_eval_set(inputs["root"] / "queries.jsonl", inputs["root"] / "corpus.jsonl")
    expected = evaluate_model(EmbeddingModel.from_pretrained(tmp_path / "out/s/final", max_length=32), ev, ks=(1, 10))
    assert metrics == pytest.approx(expected, abs=1e-6)
    # --max-length cuts every text, as the trainer's max_length does
    assert main(["eval", "--model", str(tmp_path / "out/s/final"), "--queries", str(inputs["root"] / "queries.jsonl"),
                 "--corpus", str(inputs["root"] / "corpus.jsonl"), "--k", "1", "10", "--max-length", "3",
                 "--output", str(tmp_path / "m3.json")]) == 0
    short = evaluate_model(EmbeddingModel.from_pretrained(tmp_path / "out/s/final", max_length=3), ev, ks=(1, 10))
    assert json.loads((tmp_path / "m3.json").read_text()) == pytest.approx(short, abs=1e-6)
    assert short != pytest.approx(expected, abs=1e-6)


def test_lr_schedule():
    f = lr_lambda(10, 2, "linear")
    assert [f(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    g = lr_lambda(10, 0, "cosine")
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)
    assert lr_lambda(10, 2, "constant")(9) == 1.0


def test_the_stage_settings_reach_the_loss_the_optimizer_the_clipping_and_the_schedule(inputs, tmp_path, monkeypatch):
    """Spies on what the trainer builds: every loss setting differs from its default, so none can be dropped."""
    losses, models, optimizers, max_norms = [], [], [], []
    real_init, real_wrap = FocalInfoNCELoss.__init__, trainer_module.wrap_model
    real_clip = torch.nn.utils.clip_grad_norm_

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        losses.append(self)

    class AdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    def clip(parameters, max_norm, *args, **kwargs):
        max_norms.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(FocalInfoNCELoss, "__init__", init)
    monkeypatch.setattr(trainer_module, "wrap_model", lambda model, *a: models.append(model) or real_wrap(model, *a))
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    loss_settings = dict(temperature=0.07, gamma=0.3, similarity="dot", in_batch_negatives=False, num_synthetic=2,
                         mix_top_k=2, mix_alpha=1.5, mix_mode="list", false_negative_margin=0.2,
                         detach_focal_weight=True)
    cfg = _config(inputs, tmp_path / "run", steps=4, hard_negatives=3, gradcache_chunk=None, save_every=None,
                  lr=2e-3, warmup_ratio=0.75, schedule="linear", weight_decay=0.05, max_grad_norm=0.7,
                  matryoshka_dims=[32, 16], matryoshka_weights=[1.0, 0.5], **loss_settings)
    Trainer(cfg, show_progress=False).train()

    [loss] = losses
    assert loss.options == dict(loss_settings, gather=False, backend="auto")
    assert (loss.matryoshka_dims, loss.matryoshka_weights) == ([32, 16], [1.0, 0.5])
    # AdamW: weight decay on the matrices only, none on biases and LayerNorm weights
    [optimizer], [model] = optimizers, models
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    no_decay = {n for n in trained if n.endswith(".bias") or "LayerNorm" in n}
    assert set(decay) == {0.05, 0.0} and decay[0.0] == no_decay and decay[0.05] == trained - no_decay
    assert no_decay and all(g["initial_lr"] == 2e-3 for g in optimizer.param_groups)
    assert max_norms == [0.7] * 4
    # the lr each step ran at, logged with its loss: warmup 1/3, 2/3, 1 over 3 steps, then linear decay (to 0 after
    # the last step, a rate no step runs at)
    records = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx([2e-3 * f for f in (1 / 3, 2 / 3, 1, 1)])


def _teacher_score(text: str) -> float:
    """A made-up teacher: a pure function of the text, so every score can be traced back to its text."""
    return sum(map(ord, text)) % 97 / 10


def test_a_distilling_stage_hands_each_text_its_teacher_score(inputs, tmp_path, monkeypatch):
    rows = [dict(r, pos_scores=[_teacher_score(t) for t in r["pos"]], neg_scores=[_teacher_score(t) for t in r["neg"]])
            for r in make_records(24, negatives=3)]
    write_jsonl(tmp_path / "scored.jsonl", rows)
    steps, real_step = [], trainer_module.contrastive_step

    def spy(model, tokenize, queries, docs, loss_fn, **kwargs):
        steps.append((docs, loss_fn))
        return real_step(model, tokenize, queries, docs, loss_fn, **kwargs)

    monkeypatch.setattr(trainer_module, "contrastive_step", spy)
    cfg = _config(inputs, tmp_path / "run", data=[str(tmp_path / "scored.jsonl")], steps=3, save_every=None,
                  distill_weight=0.7, distill_temperature=0.1, teacher_temperature=0.5)
    Trainer(cfg, show_progress=False).train()
    assert len(steps) == 3
    for docs, loss_fn in steps:
        assert loss_fn.func.distill == dict(weight=0.7, temperature=0.1, teacher_temperature=0.5)
        teacher = loss_fn.keywords["teacher_scores"]
        assert teacher.shape == (4, 3) and teacher.dtype == torch.float32
        torch.testing.assert_close(teacher, torch.tensor([[_teacher_score(t) for t in group] for group in docs]))
    records = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    logged = [r for r in records if r.get("step")]
    assert len(logged) == 3 and all(r["distill_kl"] >= 0 and "mean_p" in r for r in logged)
    assert [r["data"]["unused_keys"] for r in records if "data" in r] == [{}]  # the scores were used
    # the same data without scores is refused before anything trains
    write_jsonl(tmp_path / "plain.jsonl", make_records(24, negatives=3))
    with pytest.raises(ValueError, match=r"plain.jsonl:1: no teacher scores \['pos_scores', 'neg_scores'\]"):
        Trainer(_config(inputs, tmp_path / "plain", data=[str(tmp_path / "plain.jsonl")], distill_weight=0.7),
                show_progress=False).train()
    assert not (tmp_path / "plain").exists()


def test_greedy_soup_keeps_a_candidate_only_if_the_soup_does_not_score_lower(inputs, tmp_path, monkeypatch):
    """Greedy soup (Wortsman et al., 2022) on made-up scores: candidates best first; each joins iff the soup with it
    scores at least as well as the soup so far (a tie joins). The choice is checked against a replay of that rule, on
    scores where a candidate that makes the soup worse than before (but not worse than itself alone) stays out."""
    names = ["a", "b", "c", "d", "e"]
    for name in names:
        (tmp_path / name).mkdir()
    alone = {"a": 0.5, "b": 0.7, "c": 0.6, "d": 0.4, "e": 0.3}
    soups = {frozenset("bc"): 0.65, frozenset("ba"): 0.7, frozenset("bad"): 0.72, frozenset("bade"): 0.71}

    def score(members):
        return alone[next(iter(members))] if len(members) == 1 else soups.get(members, 0.0)

    order = sorted(names, key=lambda n: -alone[n])  # the rule, replayed
    chosen, best = [order[0]], alone[order[0]]
    for name in order[1:]:
        if score(frozenset(chosen + [name])) >= best:
            chosen, best = chosen + [name], score(frozenset(chosen + [name]))
    assert sorted(chosen) == ["a", "b", "d"]  # c lowers the soup, a ties, e lowers it after d raised it

    raw = dict(model=str(inputs["model"]), output_dir=str(tmp_path / "run"), max_length=32,
               eval=dict(queries=str(inputs["root"] / "queries.jsonl"), corpus=str(inputs["root"] / "corpus.jsonl")),
               stages=[dict(name="greedy", type="soup", greedy=True, **{"from": [str(tmp_path / n) for n in names]})])
    trainer = Trainer(config_from_dict(raw), show_progress=False)
    trainer.out.mkdir(parents=True)  # as train() does
    made = {}  # output path -> the members of the soup written there
    soups_written = []

    def fake_soup(paths, weights=None, output=None):
        made[str(output)] = frozenset(Path(p).name for p in paths)
        soups_written.append((sorted(made[str(output)]), Path(output)))
        return Path(output)

    monkeypatch.setattr(trainer_module, "model_soup", fake_soup)
    monkeypatch.setattr(trainer, "load_model",
                        lambda path, device=None: made.get(str(path), frozenset([Path(path).name])))
    monkeypatch.setattr(trainer, "evaluate", lambda model, sync=True: {trainer.config.eval.metric: score(model)})
    trainer._run_soup(trainer.config.stages[0])
    assert soups_written[-1] == (sorted(chosen), tmp_path / "run" / "greedy" / "final")
    assert json.loads((tmp_path / "run" / "scores.json").read_text())["greedy"] == best


def test_lr_schedule_stays_at_zero_after_the_last_step():
    """Past ``total`` the decayed multiplier stays 0 (cosine does not rise again, linear does not turn negative)."""
    assert [lr_lambda(10, 2, schedule)(s) for schedule in ("linear", "cosine") for s in (12, 15)] == [0.0] * 4


def test_keep_best_keeps_the_earlier_model_on_a_tie(inputs, tmp_path, monkeypatch):
    """keep_best replaces the best model only when a later evaluation scores higher, not when it only ties: with a
    constant score the final model is the one of the first evaluation (step 1)."""
    from kalm_fast.models import EmbeddingModel

    evaluated = []

    def constant_metric(model, eval_set, batch_size):
        evaluated.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return {"ndcg@10": 0.5}

    monkeypatch.setattr(trainer_module, "evaluate_model", constant_metric)
    cfg = _config(inputs, tmp_path / "run", evaluated=True, steps=3, eval_every=1, keep_best=True, save_every=None,
                  gradcache_chunk=None)
    final = Trainer(cfg, show_progress=False).train()
    got = dict(EmbeddingModel.from_pretrained(str(final), max_length=32).named_parameters())
    assert len(evaluated) == 4 and max_abs_diff(evaluated[0], evaluated[2]) > 1e-4  # steps 1-3, then final
    assert all(torch.equal(got[n], w) for n, w in evaluated[0].items())
