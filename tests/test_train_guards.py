"""The trainer never continues silently from something wrong (issue 14, issue 16 item 6): intact checkpoints only,
the same config and data on --resume, every stage's data checked before the first step, a non-finite loss stops
the run, a failed start does not block the fixed rerun, and what batching leaves out is logged."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_utils import make_records, make_tiny_model

from kalm_fast._registry import KERNEL_SETTINGS
from kalm_fast.cli import main
from kalm_fast.errors import RunError
from kalm_fast.files import digest
from kalm_fast.train import trainer as trainer_module
from kalm_fast.train.config import config_from_dict
from kalm_fast.train.data import write_jsonl
from kalm_fast.train.trainer import Trainer


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_jsonl(root / "train.jsonl", make_records(16, negatives=2))
    return dict(root=root, model=make_tiny_model(root / "model"))


def _raw(inputs, out, **stage):
    s = dict(name="ft", data=[str(inputs["root"] / "train.jsonl")], steps=4, batch_size=4, hard_negatives=1,
             lr=1e-3, save_every=1, keep_checkpoints=2)
    s.update(stage)
    return dict(model=str(inputs["model"]), output_dir=str(out), max_length=16, log_every=1, stages=[s])


def _run(raw, **kwargs):
    return Trainer(config_from_dict(raw), show_progress=False, **kwargs).train()


def _stop_at(n):
    def on_step(stage, step):
        if step == n:
            raise Interrupted
    return on_step


def _interrupted(raw, n=3):
    with pytest.raises(Interrupted):
        _run(raw, on_step=_stop_at(n))


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def interrupted(inputs, tmp_path_factory):
    """A run stopped after step 4 (checkpoints of steps 2 and 3 kept); tests take a copy (``_copy``)."""
    out = tmp_path_factory.mktemp("interrupted") / "cut"
    _interrupted(_raw(inputs, out), n=4)
    return out


def _copy(interrupted, inputs, tmp_path):
    """A copy of the interrupted run and its config (output_dir may change on --resume)."""
    shutil.copytree(interrupted, tmp_path / "cut")
    return _raw(inputs, tmp_path / "cut")


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(inputs, interrupted, tmp_path):
    full = _weights(_run(_raw(inputs, tmp_path / "full")))
    raw = _copy(interrupted, inputs, tmp_path)
    ckpts = tmp_path / "cut/ft/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000003"]
    optimizer = ckpts / "step-0000003/trainer/optimizer-rank0.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[-3] ^= 0xFF  # same size, changed bytes: the optimizer state would be silently wrong
    optimizer.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step-0000003 is damaged \(trainer/optimizer-rank0.safetensors does not "
                                         r"match its sha256\); it is removed and the run resumes from step-0000002"):
        resumed = _run(raw, resume=True)
    got = _weights(resumed)
    assert all(torch.equal(full[k], got[k]) for k in full)  # exactly the uninterrupted run


def test_no_intact_checkpoint_is_a_clear_error(inputs, interrupted, tmp_path):
    raw = _copy(interrupted, inputs, tmp_path)
    (tmp_path / "cut/ft/checkpoints/step-0000003/checkpoint.json").unlink()
    (tmp_path / "cut/ft/checkpoints/step-0000002/model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no intact checkpoint to resume from \(step-0000003: checkpoint.json is "
                                         r"missing or unreadable; step-0000002: model.safetensors has 0 bytes, "
                                         r"expected \d+\); delete .*checkpoints to train the stage again"):
        _run(raw, resume=True)


def test_a_checkpoint_missing_a_tensor_is_refused_not_trained_from_random_weights(inputs, interrupted, tmp_path):
    raw = _copy(interrupted, inputs, tmp_path)
    step = tmp_path / "cut/ft/checkpoints/step-0000003"
    weights = _weights(step)
    weights["encoder.layer.0.attention.self.query.renamed"] = weights.pop("encoder.layer.0.attention.self.query.weight")
    save_file(weights, str(step / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((step / "checkpoint.json").read_text())  # as written so by the run: intact on disk
    manifest["files"]["model.safetensors"] = digest(step / "model.safetensors")
    (step / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"lack 1 tensor\(s\) .*'encoder.layer.0.attention.self.query.weight'"):
        _run(raw, resume=True)


def test_a_non_finite_loss_stops_the_run_and_saves_no_model(inputs, tmp_path, monkeypatch, capsys):
    real = trainer_module.contrastive_step
    calls = {"n": 0}

    def nan_at_third(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(trainer_module, "contrastive_step", nan_at_third)
    raw = _raw(inputs, tmp_path / "nan")
    with pytest.raises(RunError, match=r"stage 'ft', step 3 .*: the loss is nan; stopped before the optimizer step"):
        _run(raw)
    assert not (tmp_path / "nan/ft/final").exists()
    assert sorted(p.name for p in (tmp_path / "nan/ft/checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    calls["n"] = 0
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dict(raw, output_dir=str(tmp_path / "nan-cli"))))
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kalm-fast train: error: stage 'ft', step 3") and "the loss is nan" in err[-1]
    assert not (tmp_path / "nan-cli/ft/final").exists()


def test_resume_refuses_a_changed_config_or_data_naming_them(inputs, tmp_path, monkeypatch):
    for name in KERNEL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "train.jsonl"
    shutil.copy(inputs["root"] / "train.jsonl", data)
    raw = _raw(inputs, tmp_path / "cut", data=[str(data)])
    _interrupted(raw)
    changed = _raw(inputs, tmp_path / "cut", data=[str(data)], lr=2e-3, temperature=0.05)
    with pytest.raises(ValueError, match=r"changed: stages\[0\].lr: 0.001 -> 0.002; stages\[0\].temperature: "
                                         r"0.01 -> 0.05\. A resumed run keeps its config"):
        _run(changed, resume=True)
    kept = data.read_bytes()
    write_jsonl(data, make_records(16, negatives=2, seed=5))
    with pytest.raises(ValueError, match=rf"changed: {data} of stage 'ft' \(its content changed\)"):
        _run(raw, resume=True)
    data.write_bytes(kept)
    allowed = dict(_raw(inputs, tmp_path / "cut", data=[str(data)], save_every=2, keep_checkpoints=3), log_every=2)
    monkeypatch.setenv("KALM_ATTENTION_DQ", "atomic")  # a kernel setting: recorded in run.json, free to change
    assert (_run(allowed, resume=True) / "model.safetensors").is_file()
    assert json.loads((tmp_path / "cut/run.json").read_text())["settings"] == {"KALM_ATTENTION_DQ": "atomic"}


def test_every_stage_is_checked_before_the_first_trains_and_the_fixed_rerun_starts(inputs, tmp_path):
    bad = tmp_path / "later.jsonl"
    write_jsonl(bad, make_records(8, negatives=2))
    with open(bad, "a") as f:
        f.write('{"query": "q", "pos": []}\n')
    raw = _raw(inputs, tmp_path / "run", save_every=None)
    raw["stages"].append(dict(name="second", data=[str(bad)], steps=1, batch_size=4, hard_negatives=1))
    with pytest.raises(ValueError, match=rf"stage 'second': {bad}:9: 'pos' must hold at least one text"):
        _run(raw)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    write_jsonl(bad, make_records(8, negatives=2))
    assert _run(raw) == tmp_path / "run/second/final"


def test_a_start_that_failed_before_any_checkpoint_does_not_block_the_rerun(inputs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-200])  # found when the stage loads its model
    raw = dict(_raw(inputs, tmp_path / "run"), model=str(model))
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        _run(raw)
    weights.write_bytes(good)
    assert (_run(raw) / "model.safetensors").is_file()  # no --resume needed, nothing refused


def test_leftovers_of_a_killed_run_are_removed_on_resume(inputs, interrupted, tmp_path):
    raw = _copy(interrupted, inputs, tmp_path)
    out = tmp_path / "cut"
    (out / "ft/checkpoints/.step-0000003.tmp").mkdir()
    (out / "ft/.final.tmp").mkdir()
    (out / ".scores.json.123.tmp").write_text("{")
    _run(raw, resume=True)
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


def test_the_saved_model_keeps_the_models_max_length_not_the_training_one(inputs, tmp_path):
    final = _run(_raw(inputs, tmp_path / "run", steps=1, save_every=None))
    saved = json.loads((final / "sentence_bert_config.json").read_text())
    assert saved["max_seq_length"] == 64  # the tiny BERT's positions; the run trained with max_length 16


def test_tasks_smaller_than_a_batch_and_left_out_records_are_reported(inputs, tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, make_records(10, tasks=("big",), negatives=2) + make_records(3, tasks=("tiny",), negatives=2))
    raw = _raw(inputs, tmp_path / "run", data=[str(data)], steps=1, save_every=None)
    with pytest.warns(UserWarning, match=r"tasks with fewer records than batch_size 4 are never trained on: "
                                         r"\{'tiny': 3\}"):
        _run(raw)
    records = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    report = next(r["data"] for r in records if "data" in r)
    assert report["records"] == 13 and report["tasks_smaller_than_a_batch"] == {"tiny": 3}
    assert report["left_out_per_epoch"] == {"big": 2}


def test_a_missing_cuda_device_is_refused_before_anything(inputs, tmp_path):
    raw = dict(_raw(inputs, tmp_path / "run"), device="cuda:99")
    with pytest.raises(ValueError, match="device 'cuda:99'"):
        _run(raw)
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_dir_is_refused_before_anything(inputs, tmp_path, monkeypatch):
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(ValueError, match=f"output_dir: cannot write in '{tmp_path}'"):
        _run(_raw(inputs, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_task_weights_that_leave_no_batch_are_refused_before_anything(inputs, tmp_path):
    raw = _raw(inputs, tmp_path / "run", task_weights={"alpha": 0, "beta": 0})
    with pytest.raises(ValueError, match=r"stage 'ft': task_weights \{'alpha': 0\.0, 'beta': 0\.0\} leave no batch"):
        _run(raw)
    assert not (tmp_path / "run").exists()


def test_matryoshka_dims_beyond_the_models_size_are_refused_before_anything(inputs, tmp_path):
    with pytest.raises(ValueError, match=r"stage 'ft': 'matryoshka_dims' must be <= the embedding size 32 of the "
                                         r"model it trains \(.*\), got \[16, 48\]"):
        _run(_raw(inputs, tmp_path / "run", matryoshka_dims=[16, 48]))
    assert not (tmp_path / "run").exists()
    # a stage trained from a soup of an outside model is measured against that model
    small = make_tiny_model(tmp_path / "small", hidden=16)
    raw = _raw(inputs, tmp_path / "run", matryoshka_dims=[24])
    raw["stages"].insert(0, {"name": "outside", "type": "soup", "from": [str(small)]})
    with pytest.raises(ValueError, match=re.escape(f"stage 'ft': 'matryoshka_dims' must be <= the embedding size 16 "
                                                   f"of the model it trains ({small}), got [24]")):
        _run(raw)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section", ["eval", "test"])
@pytest.mark.parametrize("key", ["queries", "corpus"])
def test_a_missing_eval_file_is_a_usage_error_naming_its_key(inputs, tmp_path, capsys, key, section):
    split = dict(queries=str(tmp_path / "q.jsonl"), corpus=str(tmp_path / "c.jsonl"))
    write_jsonl(tmp_path / "c.jsonl", [dict(id="d0", text="apple")])
    write_jsonl(tmp_path / "q.jsonl", [dict(query="apple", relevant=["d0"])])
    (tmp_path / f"{key[0]}.jsonl").unlink()
    raw = dict(_raw(inputs, tmp_path / "run"), **{section: split})
    message = f"{section}.{key}: cannot read '{tmp_path / key[0]}.jsonl': it does not exist"
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(raw)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(raw))
    assert main(["train", str(config)]) == 2
    assert f"kalm-fast train: error: {message}" in capsys.readouterr().err
    (tmp_path / f"{key[0]}.jsonl").mkdir()
    with pytest.raises(ValueError, match=rf"{section}\.{key}: cannot read .*: it is a directory, expected a file"):
        _run(raw)
    assert not (tmp_path / "run").exists()


def test_under_torchrun_each_rank_takes_its_own_gpu(monkeypatch):
    """``cuda:N`` would put every rank on GPU N; ``cuda`` (or none) is ``cuda:LOCAL_RANK``."""
    from kalm_fast import distributed

    monkeypatch.setattr(distributed, "check_device", lambda device: torch.device(device))  # no GPU here
    two = distributed.DistInfo(rank=1, world_size=2, local_rank=1)
    assert distributed.local_device(two, "cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device 'cuda:0': under torchrun every rank computes on cuda:LOCAL_RANK"):
        distributed.local_device(two, "cuda:0")
    assert distributed.local_device(distributed.DistInfo(), "cuda:3") == torch.device("cuda", 3)


# ---------------------------------------------------------------- pinned by mutation testing


def _steps_logged(out, stage="ft"):
    """The ``step`` of every metrics record of ``stage``, in file order (None: its data record)."""
    return [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["stage"] == stage]


def test_run_changes_lets_only_the_resumable_keys_change():
    """eval.batch_size, save_every, log_every, output_dir may change on --resume; the eval metric (which picks the
    best model) may not, nor a data file's content."""
    def record(metric, batch_size, save_every, log_every, out, sha):
        return dict(config=dict(output_dir=out, log_every=log_every, eval=dict(metric=metric, batch_size=batch_size),
                                stages=[dict(name="ft", lr=1e-3, save_every=save_every)]),
                    data={"ft": {"a.jsonl": sha}})

    stored = record("ndcg@10", 8, 1, 1, "x", "aaa")
    assert trainer_module.run_changes(stored, record("ndcg@10", 16, 5, 3, "y", "aaa")) == []
    assert trainer_module.run_changes(stored, record("mrr@10", 8, 1, 1, "x", "bbb")) == [
        "eval.metric: 'ndcg@10' -> 'mrr@10'", "a.jsonl of stage 'ft' (its content changed)"]


def test_a_run_started_before_a_key_existed_resumes_if_the_key_holds_its_default():
    """A run.json written by an older kalm_fast lacks the keys added since: at their defaults they change nothing."""
    current = dict(config=dict(seed=0, eval=dict(metric="ndcg@10", batch_size=64),
                               stages=[dict(name="ft", type="train", lr=1e-3, distill_weight=0.0,
                                            teacher_temperature=None),
                                       dict(name="soup", type="soup", greedy=False)]), data={})
    older = dict(config=dict(eval=dict(metric="ndcg@10"), stages=[dict(name="ft", type="train", lr=1e-3),
                                                                  dict(name="soup", type="soup")]), data={})
    assert trainer_module.run_changes(older, current) == []
    current["config"]["stages"][0]["distill_weight"] = 0.7
    current["config"]["stages"][1]["greedy"] = True
    current["config"]["seed"] = 3
    assert trainer_module.run_changes(older, current) == [
        "seed: '(unset)' -> 3", "stages[0].distill_weight: '(unset)' -> 0.7", "stages[1].greedy: '(unset)' -> True"]
    # an entry of a mapping is no config key, even when named like one
    current["config"]["stages"][0]["task_weights"] = {"lr": 1e-5}
    assert "stages[0].task_weights.lr: '(unset)' -> 1e-05" in trainer_module.run_changes(older, current)


def test_a_non_finite_gradient_norm_stops_the_run(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: torch.tensor(float("inf")))
    with pytest.raises(RunError, match=r"stage 'ft', step 1 .*: the gradient norm is inf; stopped before the opt"):
        _run(_raw(inputs, tmp_path / "inf", save_every=None))
    assert not (tmp_path / "inf/ft/final").exists()


def test_a_nan_gradient_with_a_finite_loss_stops_a_run_that_does_not_clip(inputs, tmp_path, monkeypatch):
    """max_grad_norm null clips nothing, but the norm is still taken and checked (and logged)."""
    real = trainer_module.contrastive_step
    calls = {"n": 0}

    def nan_gradient_at_second(model, *args, **kwargs):
        calls["n"] += 1
        loss, stats = real(model, *args, **kwargs)
        if calls["n"] == 2:
            next(p for p in model.parameters() if p.grad is not None).grad[0] = float("nan")
        return loss, stats

    monkeypatch.setattr(trainer_module, "contrastive_step", nan_gradient_at_second)
    with pytest.raises(RunError, match=r"stage 'ft', step 2 .*: the gradient norm is nan; stopped before the opt"):
        _run(_raw(inputs, tmp_path / "nan", save_every=None, max_grad_norm=None))
    assert not (tmp_path / "nan/ft/final").exists()
    grad_norms = [r["grad_norm"] for r in map(json.loads, open(tmp_path / "nan/metrics.jsonl")) if "loss" in r]
    assert len(grad_norms) == 1 and grad_norms[0] > 0  # step 1's, measured though nothing was clipped


def test_another_configs_finished_stages_in_the_output_dir_are_not_overwritten(inputs, tmp_path):
    """A config whose stages have other names than the run in its output_dir is refused there too, with or without
    --resume: the earlier run's records are kept."""
    _run(_raw(inputs, tmp_path / "run", save_every=None, steps=1))
    before = (tmp_path / "run/metrics.jsonl").read_bytes()
    other = _raw(inputs, tmp_path / "run", save_every=None, steps=1, name="other")
    with pytest.raises(ValueError, match=r"holds a previous run \(stages ft\); pass --resume"):
        _run(other)
    with pytest.raises(ValueError, match=r"--resume: output_dir .* was started with another config"):
        _run(other, resume=True)
    assert (tmp_path / "run/metrics.jsonl").read_bytes() == before


def test_a_checkpoint_of_another_number_of_processes_is_refused(inputs, interrupted, tmp_path):
    raw = _copy(interrupted, inputs, tmp_path)
    step = tmp_path / "cut/ft/checkpoints/step-0000003"
    state = json.loads((step / "trainer/state.json").read_text())
    (step / "trainer/state.json").write_text(json.dumps(dict(state, world_size=2)))
    manifest = json.loads((step / "checkpoint.json").read_text())  # intact on disk, as a 2-process run wrote it
    manifest["files"]["trainer/state.json"] = digest(step / "trainer/state.json")
    (step / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"step-0000003 was written by 2 processes; resume it with the same number "
                                         r"\(this run has 1\)"):
        _run(raw, resume=True)


def test_a_stage_seed_overrides_the_run_seed(inputs, tmp_path):
    raw = dict(_raw(inputs, tmp_path / "run", seed=5), seed=1)
    raw["stages"].append(dict(raw["stages"][0], name="second"))
    del raw["stages"][1]["seed"]
    prepared = Trainer(config_from_dict(raw), show_progress=False)._prepare()
    assert {name: sampler.seed for name, (_, sampler) in prepared.items()} == {"ft": 5, "second": 1}


def test_epochs_round_up_to_whole_steps(inputs, tmp_path):
    """2 tasks of 8 records, batch_size 4: 4 batches an epoch; 0.6 epochs are 2.4 batches, trained as 3 steps."""
    _run(_raw(inputs, tmp_path / "run", steps=None, epochs=0.6, save_every=None))
    assert _steps_logged(tmp_path / "run") == [None, 1, 2, 3]


def test_a_rerun_of_a_run_stopped_before_its_first_checkpoint_drops_its_records(inputs, tmp_path):
    """Nothing to continue: the rerun starts afresh, without --resume and with any config (here the stage renamed);
    metrics.jsonl holds the new run's records only."""
    _interrupted(_raw(inputs, tmp_path / "run", save_every=None), n=2)
    assert _steps_logged(tmp_path / "run") == [None, 1, 2]
    _run(_raw(inputs, tmp_path / "run", save_every=None, name="renamed"))
    records = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert {r["stage"] for r in records} == {"renamed"}
    assert _steps_logged(tmp_path / "run", "renamed") == [None, 1, 2, 3, 4]


def test_a_stage_resumed_without_a_checkpoint_logs_once_and_a_finished_run_trains_nothing(inputs, tmp_path,
                                                                                            monkeypatch):
    """The second stage stops before its first checkpoint: --resume keeps the first stage, redoes the second from
    its start (its earlier data record and steps dropped, not doubled); resuming the finished run trains nothing."""
    raw = _raw(inputs, tmp_path / "run", steps=1, save_every=None)
    raw["stages"].append(dict(raw["stages"][0], name="second", steps=2))

    def stop(stage, step):
        if stage == "second":
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(raw, on_step=stop)
    first = _weights(tmp_path / "run/ft/final")
    _run(raw, resume=True)
    assert _steps_logged(tmp_path / "run", "ft") == [None, 1]
    assert _steps_logged(tmp_path / "run", "second") == [None, 1, 2]
    assert all(torch.equal(first[k], v) for k, v in _weights(tmp_path / "run/ft/final").items())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(trainer_module, "contrastive_step", no_training)
    assert _run(raw, resume=True) == tmp_path / "run/second/final"


def test_a_model_swap_cut_short_by_a_kill_is_undone(inputs, tmp_path):
    """A kill between moving ``best`` aside (``.best.old``) and putting the new one in place: the next run puts the
    old one back, so keep_best still finds it; a ``.final.old`` next to a complete ``final`` is removed."""
    trainer = Trainer(config_from_dict(_raw(inputs, tmp_path / "run")), show_progress=False)
    stage_dir = tmp_path / "run/ft"
    for name in (".best.old", ".best.tmp", "final", ".final.old"):
        (stage_dir / name).mkdir(parents=True)
        (stage_dir / name / "model.safetensors").write_text(name)
    trainer._clean_stage(trainer.config.stages[0])
    assert sorted(p.name for p in stage_dir.iterdir()) == ["best", "final"]
    assert (stage_dir / "best/model.safetensors").read_text() == ".best.old"
    assert (stage_dir / "final/model.safetensors").read_text() == "final"
