"""The multi-stage trainer behind ``kalm-fast train CONFIG.yaml [--resume]``.

Stages run in order. A training stage starts from the previous stage's model (or ``base`` / a named
stage), samples task-homogeneous batches with M hard negatives per query, runs the focal-InfoNCE loss
(optionally with GradCache), AdamW with warmup and decay, gradient clipping, and writes
``OUTPUT/<stage>/final``. A soup stage averages earlier stages' final models (greedily by eval score if
asked). Under ``torchrun`` every rank takes its slice of each global batch (DDP or FSDP); rank 0 logs and
saves.

Output layout::

    OUTPUT/run.json                       the config, the sha256 of every stage's data files and the kernel
                                          settings (``KALM_*``) of the latest start (not compared on resume)
    OUTPUT/metrics.jsonl                  one JSON line per logged step / evaluation, with its UTC time
    OUTPUT/scores.json                    eval scores of final models and soup candidates
    OUTPUT/<stage>/checkpoints/step-N/    model (safetensors) + trainer/ (optimizer, scheduler, sampler, RNG)
                                          + checkpoint.json (size and sha256 of each of its files)
    OUTPUT/<stage>/final/                 the stage's model (Hugging Face + sentence-transformers layout)

Before anything is written, the config (``config.py``), the device, the eval set, every stage's data and its
``matryoshka_dims`` (against its model's size) are checked. ``--resume`` skips finished stages and continues the
current one from its latest intact checkpoint (a damaged one is reported, removed, and the one before it used),
exactly: the weights after the last step equal those of an uninterrupted run. It refuses a changed config or
changed data (naming what changed), except the keys in ``RESUMABLE_CHANGES``, which do not change the weights. A
run that stopped before its first checkpoint left nothing to continue: the next run, with or without ``--resume``,
starts it afresh. A non-finite loss or gradient norm stops the run (``RunError``) before the optimizer step, so no
model is saved from it. Files and directories are written under temporary names, fsynced and renamed; a killed
run's temporary files are removed by the next one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._registry import kernel_settings
from ..distributed import (
    DistInfo,
    any_across,
    barrier,
    from_main,
    full_state_dict,
    init_distributed,
    is_fsdp,
    local_device,
    mean_across,
    no_sync_of,
    to_local,
    unwrap,
    wrap_model,
)
from ..errors import RunError
from ..files import (
    atomic_write_text,
    check_writable_dir,
    digest,
    fsync_dir,
    publish_dir,
    remove_leftovers,
    sync_tree,
    verify,
)
from ..models import EmbeddingModel
from ..models.embedding import check_gradient_checkpointing
from ..models.loading import (
    build_config,
    default_model_dir,
    read_sentence_transformer_info,
    resolve_model_dir,
    token_embedding_size,
    transformers_class,
)
from .config import EvalConfig, SoupStage, TrainConfig, TrainStage, config_to_dict
from .data import EvalSet, TrainData, load_eval_set
from .evaluate import evaluate_model
from .gradcache import contrastive_step
from .losses import FocalInfoNCELoss
from .sampler import TaskBatchSampler, build_example
from .soup import model_soup

_STEP_DIR = re.compile(r"^step-(\d+)$")
RUN_FILE = "run.json"
CHECKPOINT_MANIFEST = "checkpoint.json"
# Config keys that --resume lets change: they do not change the weights a run produces.
RESUMABLE_CHANGES = (r"output_dir", r"device", r"log_every", r"eval\.batch_size",
                     r"stages\[\d+\]\.(save_every|keep_checkpoints)")


def _flatten(value, prefix: str = "") -> dict:
    """``{"stages[0].lr": 1e-5, ...}`` for a nested config mapping."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _default_of(key: str, current: dict):
    """The default value of a flattened config key (``stages[0].lr``, ``eval.batch_size``, ``seed``), or a marker
    that equals nothing when it has none."""
    missing = object()
    parts = key.split(".")
    if len(parts) == 1:
        cls = TrainConfig
    elif len(parts) == 2 and parts[0] in ("eval", "test"):
        cls = EvalConfig
    elif len(parts) == 2 and re.fullmatch(r"stages\[\d+\]", parts[0]):
        stage = current["config"]["stages"][int(parts[0][len("stages["):-1])]
        cls = SoupStage if stage.get("type") == "soup" else TrainStage
    else:  # deeper: an entry of a mapping (instructions, task_weights), which has no default
        return missing
    f = {f.name.rstrip("_"): f for f in dataclasses.fields(cls)}.get(parts[-1])
    return missing if f is None or f.default is dataclasses.MISSING else f.default


def run_changes(stored: dict, current: dict) -> list:
    """What differs between two run records (``run.json``) in ways ``--resume`` does not allow, one line each. A key
    the stored record lacks (a run started by an older kalm_fast) is unchanged if it holds its default."""
    old, new = _flatten(stored.get("config", {})), _flatten(current["config"])
    unset = "(unset)"
    for k in set(new) - set(old):
        if new[k] == _default_of(k, current):
            old[k] = new[k]
    changes = [f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}" for k in sorted(set(old) | set(new))
               if old.get(k, unset) != new.get(k, unset)
               and not any(re.fullmatch(pattern, k) for pattern in RESUMABLE_CHANGES)]
    for stage, files in sorted(current["data"].items()):
        before = stored.get("data", {}).get(stage, {})
        changes += [f"{f} of stage {stage!r} (its content changed)" for f in sorted(files)
                    if f in before and before[f] != files[f]]
    return changes


def checkpoint_problem(path: Path):
    """None if every file of the checkpoint ``path`` matches its ``checkpoint.json``; else what is wrong."""
    manifest = path / CHECKPOINT_MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CHECKPOINT_MANIFEST} is missing or unreadable"
    for name, expected in files.items():
        problem = verify(path / name, expected, name)
        if problem:
            return problem
    return None


def base_model_path(model: Optional[str]) -> str:
    """The configured model directory, or the embedded MiniLM when None."""
    return str(model) if model is not None else str(default_model_dir())


def check_split_files(split: EvalConfig, section: str) -> None:
    """The files of the config section ``section`` ('eval' or 'test') exist; else a ValueError naming the key."""
    for key in ("queries", "corpus"):
        path = Path(getattr(split, key))
        if not path.exists():
            raise ValueError(f"{section}.{key}: cannot read {str(path)!r}: it does not exist")
        if path.is_dir():
            raise ValueError(f"{section}.{key}: cannot read {str(path)!r}: it is a directory, expected a file")


def load_split(split: EvalConfig, section: str) -> EvalSet:
    """The eval set of the config section ``section``; a missing file is a ValueError naming its key."""
    check_split_files(split, section)
    return load_eval_set(split.queries, split.corpus, instruction=split.instruction)


def _model_config(model_dir):
    """The transformers config of a model directory, without loading weights."""
    return build_config(read_sentence_transformer_info(resolve_model_dir(model_dir)).transformer_dir)


def embedding_size(model_dir) -> int:
    """The embedding size of a model directory (its last Dense module's, else the width of the model's hidden
    states), read from its configs without loading weights."""
    info = read_sentence_transformer_info(resolve_model_dir(model_dir))
    return info.dense[-1].out_features if info.dense else token_embedding_size(build_config(info.transformer_dir))


def check_model_checkpointing(model_dir) -> None:
    """A ValueError when transformers' class of the model in ``model_dir`` cannot checkpoint activations, found
    from its config (before any weights load)."""
    config = _model_config(model_dir)
    check_gradient_checkpointing(transformers_class(config), config.model_type)


def lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s``: linear warmup, then linear/cosine decay or constant."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)
    return f


def _optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW groups: weight decay on matrices, none on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def freeze_unused_parameters(model) -> list:
    """Stop training parameters that never reach the embedding (e.g. BERT's pooler); returns their names.

    Probed with one short text. DDP requires every trained parameter to get a gradient each step.
    """
    model.zero_grad(set_to_none=True)
    model(model.tokenize(["probe"])).float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, tag: str):
    """Optimizer state as ``{tag}.safetensors`` (tensors) + ``{tag}.json`` (groups and scalars); no pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = to_local(value).detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(directory / f"{tag}.safetensors"))
    (directory / f"{tag}.json").write_text(json.dumps(dict(param_groups=sd["param_groups"], scalars=scalars)))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, tag: str):
    """Inverse of ``save_optimizer``; per-parameter state of FSDP2 (DTensor) parameters becomes DTensors again."""
    meta = json.loads((directory / f"{tag}.json").read_text())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for name, value in list(load_file(str(directory / f"{tag}.safetensors")).items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        param = params[int(pid)]
        if torch.is_tensor(value) and value.dim() > 0 and hasattr(param, "device_mesh"):
            from torch.distributed.tensor import DTensor
            value = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                       shape=param.shape, stride=param.stride())  # shards may be uneven
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict(dict(state=state, param_groups=meta["param_groups"]))


def _rng_tensors(device: torch.device, generator: torch.Generator) -> dict:
    out = {"cpu": torch.get_rng_state(), "loss_generator": generator.get_state().cpu()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _restore_rng(tensors: dict, device: torch.device, generator: torch.Generator):
    torch.set_rng_state(tensors["cpu"])
    generator.set_state(tensors["loss_generator"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)


class Trainer:
    """Runs a ``TrainConfig``: ``Trainer(config, resume=False).train() -> Path`` of the last stage's model.

    ``on_step(stage_name, step)`` is called after every optimizer step (and after that step's checkpoint).
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, on_step: Optional[Callable] = None,
                 show_progress: bool = True):
        self.config = config
        self.resume = resume
        self.on_step = on_step
        self.show_progress = show_progress
        self.out = Path(config.output_dir)
        self.info: DistInfo = init_distributed(config.device)
        self.device = local_device(self.info, config.device)
        self.eval_set = None   # the validation split: every choice (keep_best, greedy soups); `test` is never used
        self._train_data: dict = {}
        if config.eval is not None:
            self.eval_set = load_split(config.eval, "eval")
        if config.test is not None:  # found before anything is written (`kalm-fast ablate` reads it)
            check_split_files(config.test, "test")

    # ---------------------------------------------------------------- bookkeeping
    def _log(self, record: dict):
        if self.info.is_main:
            record = dict(time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record)
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _trim_metrics(self, stage: str, step: int):
        """Drop the records of ``stage`` after ``step`` (work about to be redone), so no step appears twice. A stage
        resumed from a checkpoint (``step`` > 0) keeps its ``data`` record, which stays before its steps."""
        path = self.out / "metrics.jsonl"
        if not self.info.is_main or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)

        def kept(line: str) -> bool:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                return False
            at = record.get("step")
            return (record.get("stage") != stage or (isinstance(at, int) and 0 < at <= step)
                    or (step > 0 and "data" in record))

        atomic_write_text(path, "".join(line for line in lines if kept(line)))

    def _scores(self) -> dict:
        path = self.out / "scores.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _record_score(self, key: str, score: float):
        if self.info.is_main:
            scores = self._scores()
            scores[key] = score
            atomic_write_text(self.out / "scores.json", json.dumps(scores, indent=2))

    def _stage_final(self, name: str) -> Path:
        return self.out / name / "final"

    def _resolve(self, ref: str, previous: str) -> str:
        if ref == "previous":
            ref = previous
        if ref == "base":
            return base_model_path(self.config.model)
        if ref in {s.name for s in self.config.stages}:
            return str(self._stage_final(ref))
        return ref

    def load_model(self, path: str, device=None):
        return EmbeddingModel.from_pretrained(path, device=device or self.device, dtype=self.config.dtype,
                                              attn_backend=self.config.attn_backend,
                                              max_length=self.config.max_length)

    def _autocast(self):
        if self.device.type == "cuda" and self.config.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _write_model(self, model, directory: Path):
        """Rank 0 saves ``model`` (all ranks call this). An FSDP model's full weights are gathered to the CPU
        and saved through a CPU copy of the stage's model (``self._shadow``)."""
        if is_fsdp(model):
            weights = full_state_dict(model)
            if self.info.is_main:
                self._shadow.load_state_dict(weights)
                self._shadow.save_pretrained(directory)
        elif self.info.is_main:
            unwrap(model).save_pretrained(directory)

    def _save_model_atomic(self, model, target: Path):
        """Write ``model`` to ``target`` through a temporary directory (all ranks must call this)."""
        tmp = target.with_name(f".{target.name}.tmp")
        if self.info.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self._write_model(model, tmp)
        if self.info.is_main:
            sync_tree(tmp)
            # Move the old model aside before the new one takes its place: a crash leaves one of them, and the
            # next run puts an orphaned old one back (``_clean_stage``).
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            fsync_dir(target.parent)
            if old.exists():
                shutil.rmtree(old)
        barrier(self.info)

    def evaluate(self, model, *, sync: bool = True) -> Optional[dict]:
        """Eval metrics of ``model`` on the config's eval set (None without one).

        ``sync``: every rank calls this and gets rank 0's metrics (every rank then takes the same choices, such
        as saving a best model); False when only rank 0 does.
        """
        if self.eval_set is None:
            return None
        metrics = None
        if self.info.is_main or is_fsdp(model):  # an FSDP forward needs every rank
            metrics = evaluate_model(unwrap(model), self.eval_set, batch_size=self.config.eval.batch_size)
        return from_main(self.info, metrics) if sync else metrics

    # ---------------------------------------------------------------- run
    def _prepare(self) -> dict:
        """Every training stage's data (validated and hashed) and sampler, before any stage trains."""
        check_writable_dir(self.out, "output_dir")
        resolve_model_dir(self.config.model)  # the base model exists (its files are checked when it loads)
        sources = self._model_sources()
        if self.config.gradient_checkpointing:
            check_model_checkpointing(sources["base"])
        prepared = {}
        for stage in self.config.stages:
            if not isinstance(stage, TrainStage):
                continue
            try:
                if stage.batch_size % self.info.world_size:
                    raise ValueError(f"batch_size {stage.batch_size} must be a multiple of the number of processes "
                                     f"{self.info.world_size}")
                if stage.matryoshka_dims:
                    size = embedding_size(sources[stage.name])
                    if max(stage.matryoshka_dims) > size:
                        raise ValueError(f"'matryoshka_dims' must be <= the embedding size {size} of the model it "
                                         f"trains ({sources[stage.name]}), got {stage.matryoshka_dims}")
                data = self.train_data(stage)
                sampler = TaskBatchSampler(data.tasks, stage.batch_size, seed=self._seed(stage),
                                           task_weights=stage.task_weights)
            except ValueError as exc:
                raise ValueError(f"stage {stage.name!r}: {exc}") from None
            prepared[stage.name] = (data, sampler)
        return prepared

    def _model_sources(self) -> dict:
        """Per stage, the model directory that fixes its model's shape: the base model, or the first outside
        directory of a soup it comes from (a soup's members share one shape)."""
        sources, previous = {"base": base_model_path(self.config.model)}, "base"
        for stage in self.config.stages:
            if isinstance(stage, SoupStage):
                ref = stage.from_[0]
            else:
                ref = previous if stage.init == "previous" else stage.init
            sources[stage.name] = sources.get(ref, ref)
            previous = stage.name
        return sources

    def _seed(self, stage: TrainStage) -> int:
        return self.config.seed if stage.seed is None else stage.seed

    def _progress(self) -> list:
        """The stages in output_dir with something to continue from, a final model or a checkpoint: this config's and
        those of any other run written there."""
        if not self.out.is_dir():
            return []
        return sorted(d.name for d in self.out.iterdir()
                      if d.is_dir() and ((d / "final").is_dir() or self._checkpoints(d.name)))

    def _start_run(self, prepared: dict):
        """Refuse what would mix two runs in one output_dir; record this run's config and data."""
        record = json.loads(json.dumps(dict(config=config_to_dict(self.config),
                                            data={name: data.sha256 for name, (data, _) in prepared.items()},
                                            settings=kernel_settings())))
        progress = self._progress()
        barrier(self.info)  # every rank looks before any rank writes
        if progress and not self.resume:
            raise ValueError(f"output_dir {self.out} holds a previous run (stages {', '.join(progress)}); pass "
                             "--resume to continue it or choose another output_dir")
        run_file = self.out / RUN_FILE
        if progress and run_file.is_file():
            changes = run_changes(json.loads(run_file.read_text()), record)
            if changes:
                raise ValueError(f"--resume: output_dir {self.out} was started with another config or data; "
                                 f"changed: {'; '.join(changes)}. A resumed run keeps its config (only "
                                 "output_dir, device, log_every, save_every, keep_checkpoints and eval.batch_size "
                                 "may change): restore these, or start a new output_dir")
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.out)
            if not progress and run_file.is_file():  # a run that stopped before its first checkpoint: redone
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
                (self.out / "scores.json").unlink(missing_ok=True)  # of models that are gone
            atomic_write_text(run_file, json.dumps(record, indent=2))
        barrier(self.info)

    def train(self) -> Path:
        """Run every stage (skipping finished ones when resuming); returns the last stage's final model."""
        prepared = self._prepare()
        self._start_run(prepared)
        previous = "base"
        for stage in self.config.stages:
            final = self._stage_final(stage.name)
            if not final.exists():
                (self.out / stage.name).mkdir(parents=True, exist_ok=True)
                if isinstance(stage, SoupStage):
                    self._trim_metrics(stage.name, 0)
                    self._run_soup(stage)
                else:
                    self._run_train(stage, self._resolve(stage.init, previous), *prepared[stage.name])
            elif self.eval_set is not None:  # finished, perhaps by a run killed before it recorded the score
                self._score_path(stage.name, final)
            previous = stage.name
        return self._stage_final(previous)

    def train_data(self, stage: TrainStage) -> TrainData:
        """The stage's training records, indexed once and shared by every stage that reads the same files."""
        key = (tuple(map(str, stage.data)), tuple(sorted(stage.instructions.items())), stage.hard_negatives,
               stage.distill_weight > 0)
        if key not in self._train_data:
            self._train_data[key] = TrainData(stage.data, instructions=stage.instructions,
                                              min_negatives=stage.hard_negatives,
                                              teacher_scores=stage.distill_weight > 0)
        return self._train_data[key]

    def _checkpoints(self, name: str) -> list:
        """The checkpoint directories of stage ``name``, oldest first."""
        root = self.out / name / "checkpoints"
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def _clean_stage(self, stage: TrainStage):
        """Remove what a killed run of ``stage`` left half-written; put back a model that was being replaced."""
        if not self.info.is_main:
            return
        stage_dir = self.out / stage.name
        for name in ("final", "best"):
            old = stage_dir / f".{name}.old"
            if old.is_dir() and not (stage_dir / name).exists():
                os.replace(old, stage_dir / name)
        remove_leftovers(stage_dir, ".*.tmp")
        remove_leftovers(stage_dir, ".*.old")
        remove_leftovers(stage_dir / "checkpoints", ".step-*.tmp")

    def _intact_checkpoint(self, stage: TrainStage) -> Optional[Path]:
        """The latest checkpoint whose files match its ``checkpoint.json``; damaged later ones are reported and
        removed. A ``ValueError`` when checkpoints exist but none is intact."""
        checkpoints = self._checkpoints(stage.name)
        damaged = []
        for path in reversed(checkpoints):
            problem = checkpoint_problem(path)
            if problem is None:
                break
            damaged.append((path, problem))
        else:
            if damaged:
                raise ValueError(f"stage {stage.name!r}: no intact checkpoint to resume from "
                                 f"({'; '.join(f'{p.name}: {why}' for p, why in damaged)}); delete "
                                 f"{self.out / stage.name / 'checkpoints'} to train the stage again from its start")
            return None
        barrier(self.info)  # every rank has decided before rank 0 removes anything
        for bad, problem in damaged:
            warnings.warn(f"checkpoint {bad} is damaged ({problem}); it is removed and the run resumes from "
                          f"{path.name}", stacklevel=2)
            if self.info.is_main:
                shutil.rmtree(bad)
        barrier(self.info)
        return path

    def _save_checkpoint(self, stage, step, model, optimizer, scheduler, sampler, generator, best, window):
        """``window``: ``(sum, count)`` of this rank's losses since the last log line."""
        window = (mean_across(self.info, window[0]), window[1])  # the same on every rank after a resume
        root = self.out / stage.name / "checkpoints"
        target = root / f"step-{step:07d}"
        tmp = root / f".step-{step:07d}.tmp"
        if self.info.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier(self.info)
        self._write_model(model, tmp)
        trainer_dir = tmp / "trainer"
        if self.info.is_main:
            trainer_dir.mkdir()
            state = dict(stage=stage.name, step=step, world_size=self.info.world_size, sampler=sampler.state_dict(),
                         scheduler=scheduler.state_dict(), best=best, loss_window=window)
            (trainer_dir / "state.json").write_text(json.dumps(state, indent=2))
        barrier(self.info)
        if self.info.is_main or self.config.parallel == "fsdp":  # FSDP optimizer state is sharded per rank
            save_optimizer(optimizer, trainer_dir, f"optimizer-rank{self.info.rank}")
        save_file(_rng_tensors(self.device, generator), str(trainer_dir / f"rng-rank{self.info.rank}.safetensors"))
        barrier(self.info)
        if self.info.is_main:
            files = {p.relative_to(tmp).as_posix(): digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps(dict(step=step, files=files), indent=2))
            if target.exists():  # a damaged checkpoint of this step was removed on resume; never two of one step
                shutil.rmtree(target)
            publish_dir(tmp, target)
            for old in self._checkpoints(stage.name)[:-max(1, stage.keep_checkpoints)]:
                shutil.rmtree(old)
        barrier(self.info)

    def _run_train(self, stage: TrainStage, init_path: str, data: TrainData, sampler: TaskBatchSampler):
        cfg, info = self.config, self.info
        seed = self._seed(stage)
        total = stage.steps or math.ceil(stage.epochs * sampler.batches_per_epoch())
        self._clean_stage(stage)
        barrier(info)
        checkpoint = self._intact_checkpoint(stage) if self.resume else None
        model = self.load_model(str(checkpoint) if checkpoint else init_path)
        model.train()
        freeze_unused_parameters(model)
        if cfg.parallel == "fsdp" and info.enabled and info.is_main:
            self._shadow = self.load_model(init_path, device="cpu")
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(seed)
        # mixing draws: one stream per rank (rank 0's is the single-process stream)
        generator = torch.Generator(self.device).manual_seed(seed + 7919 * info.rank)
        wrapped = wrap_model(model, info, cfg.parallel, self.device)
        optimizer = torch.optim.AdamW(_optimizer_groups(wrapped, stage.weight_decay), lr=stage.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, int(stage.warmup_ratio * total), stage.schedule))
        step, best, window_loss, window_n = 0, None, 0.0, 0
        if checkpoint:
            tdir = checkpoint / "trainer"
            state = json.loads((tdir / "state.json").read_text())
            if state["world_size"] != info.world_size:
                raise ValueError(f"checkpoint {checkpoint} was written by {state['world_size']} processes; "
                                 f"resume it with the same number (this run has {info.world_size})")
            rank_tag = info.rank if cfg.parallel == "fsdp" else 0
            load_optimizer(optimizer, tdir, f"optimizer-rank{rank_tag}")
            scheduler.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["sampler"])
            _restore_rng(load_file(str(tdir / f"rng-rank{info.rank}.safetensors")), self.device, generator)
            step, best = state["step"], state["best"]
            window_loss, window_n = state.get("loss_window", (0.0, 0))  # absent from older checkpoints
        self._trim_metrics(stage.name, step)
        self._report_data(stage, data, sampler, log=step == 0)
        loss_fn = FocalInfoNCELoss(
            temperature=stage.temperature, gamma=stage.gamma, similarity=stage.similarity,
            in_batch_negatives=stage.in_batch_negatives, num_synthetic=stage.num_synthetic,
            mix_top_k=stage.mix_top_k, mix_alpha=stage.mix_alpha, mix_mode=stage.mix_mode,
            false_negative_margin=stage.false_negative_margin,
            detach_focal_weight=stage.detach_focal_weight, gather=stage.gather and info.enabled,
            matryoshka_dims=stage.matryoshka_dims, matryoshka_weights=stage.matryoshka_weights,
            distill_weight=stage.distill_weight, distill_temperature=stage.distill_temperature,
            teacher_temperature=stage.teacher_temperature)
        local = stage.batch_size // info.world_size
        batches = iter(sampler)
        show = info.is_main and self.show_progress
        with tqdm(total=total, initial=step, desc=stage.name, dynamic_ncols=True, disable=not show) as progress:
            t0, samples = time.perf_counter(), 0
            while step < total:
                task, ids, epoch = next(batches)
                examples = [build_example(data[i], i, num_negatives=stage.hard_negatives, seed=seed, epoch=epoch)
                            for i in ids[info.rank * local:(info.rank + 1) * local]]
                step_loss = loss_fn
                if stage.distill_weight:  # every record has its scores (checked when the data was read)
                    teacher = torch.tensor([s for _, _, s in examples], dtype=torch.float32, device=self.device)
                    step_loss = functools.partial(loss_fn, teacher_scores=teacher)
                loss, stats = contrastive_step(
                    wrapped, model.tokenize, [q for q, _, _ in examples], [d for _, d, _ in examples], step_loss,
                    chunk_size=stage.gradcache_chunk, generator=generator, autocast=self._autocast,
                    no_sync=no_sync_of(wrapped), device=self.device)
                loss = float(loss)
                # the norm is checked even when nothing is clipped: a NaN gradient can come with a finite loss
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    wrapped.parameters(), math.inf if stage.max_grad_norm is None else stage.max_grad_norm)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                bad = not math.isfinite(loss) or not math.isfinite(grad_norm)
                # every rank stops together: the gathered loss spreads one rank's NaN to every rank's gradients
                if any_across(info, bad):
                    what = (f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}" if bad
                            else "loss or gradient norm of another rank is not finite")
                    raise RunError(f"stage {stage.name!r}, step {step + 1} (task {task!r}): the {what}; stopped "
                                   "before the optimizer step, so no model is saved from it (earlier checkpoints "
                                   "stay valid). Lower lr or check the data, then start a new output_dir")
                optimizer.step()
                lr = scheduler.get_last_lr()[0]  # this step's
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                samples += stage.batch_size
                window_loss, window_n = window_loss + loss, window_n + 1
                if step % cfg.log_every == 0 or step == total:
                    rate = samples / (time.perf_counter() - t0)
                    record = dict(stage=stage.name, step=step, task=task,
                                  loss=mean_across(info, window_loss / window_n), lr=lr,
                                  grad_norm=grad_norm, samples_per_s=rate)
                    record.update({k: float(v) for k, v in (stats or {}).items()})
                    self._log(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{rate:.1f}")
                    window_loss, window_n = 0.0, 0
                progress.update(1)
                if stage.eval_every and (step % stage.eval_every == 0 or step == total):
                    best = self._evaluate_step(stage, step, wrapped, best)
                if stage.save_every and step % stage.save_every == 0 and step < total:
                    self._save_checkpoint(stage, step, wrapped, optimizer, scheduler, sampler, generator, best,
                                          (window_loss, window_n))
                if self.on_step is not None:
                    self.on_step(stage.name, step)
        final = self._stage_final(stage.name)
        best_dir = self.out / stage.name / "best"
        # rank 0's view: it moves best/ away, so another rank may look after it did
        if from_main(info, stage.keep_best and best is not None and best_dir.exists()):
            if info.is_main:
                os.replace(best_dir, final)
                fsync_dir(final.parent)
            barrier(info)
        else:
            self._save_model_atomic(wrapped, final)
        data.close()  # its file handles; the index stays for later stages
        if self.eval_set is not None:
            self._score_path(stage.name, final, None if stage.keep_best else wrapped)

    def _report_data(self, stage: TrainStage, data: TrainData, sampler: TaskBatchSampler, *, log: bool):
        """Log what batching leaves out (tasks smaller than a batch; each epoch, every task's last records) unless
        ``log`` is False (a resumed stage keeps its record: same config, same data); warn of the small tasks."""
        coverage = sampler.coverage()
        if log:
            self._log(dict(stage=stage.name, step=None,
                           data=dict(records=len(data), **coverage, unused_keys=data.unused)))
        if coverage["tasks_smaller_than_a_batch"] and self.info.is_main:
            warnings.warn(f"stage {stage.name!r}: tasks with fewer records than batch_size {stage.batch_size} are "
                          f"never trained on: {coverage['tasks_smaller_than_a_batch']}", stacklevel=2)

    def _evaluate_step(self, stage, step, model, best):
        metrics = self.evaluate(model)
        if metrics is None:
            return best
        score = metrics[self.config.eval.metric]
        self._log(dict(stage=stage.name, step=step, eval=metrics))
        if stage.keep_best and (best is None or score > best):
            self._save_model_atomic(model, self.out / stage.name / "best")
            return score
        return best

    def _score_path(self, key: str, path: Path, model=None, *, sync: bool = True) -> Optional[float]:
        """Eval score of a saved model (cached in scores.json); ``model``: the same weights already in memory."""
        cached = self._scores().get(key)
        if cached is not None:
            return cached
        metrics = self.evaluate(model if model is not None else self.load_model(str(path)), sync=sync)
        score = None
        if metrics is not None:
            score = metrics[self.config.eval.metric]
            self._log(dict(stage=key, step=None, eval=metrics, path=str(path)))
            self._record_score(key, score)
        return score

    # ---------------------------------------------------------------- soup
    def _soup_paths(self, stage: SoupStage) -> list:
        """The soup's ingredients. The run's model (``base``) is saved once more by rank 0 as the stages are, in
        ``<soup>/base``: a model saved elsewhere may hold other tensors (transformers 4's ``position_ids``) or
        another dtype than the stages' models, and a soup needs the same tensors in the same dtype."""
        base = base_model_path(self.config.model)
        paths = [self._resolve(r, "base") for r in stage.from_]
        if base not in paths:
            return paths
        copy = self.out / stage.name / "base"
        if self.info.is_main and not copy.is_dir():
            tmp = copy.with_name(".base.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            self.load_model(base, device="cpu").save_pretrained(tmp)
            publish_dir(tmp, copy)
        barrier(self.info)
        return [str(copy) if p == base else p for p in paths]

    def _run_soup(self, stage: SoupStage):
        refs = stage.from_
        paths = self._soup_paths(stage)
        final = self._stage_final(stage.name)
        if self.info.is_main:
            if not stage.greedy:
                model_soup(paths, weights=stage.weights, output=final)
            else:
                self._greedy_soup(stage, refs, paths, final)
        barrier(self.info)
        if self.eval_set is not None:
            self._score_path(stage.name, final)

    def _greedy_soup(self, stage: SoupStage, refs: list, paths: list, final: Path):
        """Greedy soup (Wortsman et al., 2022): best candidate first, add each next if the score does not drop."""
        stage_names = {s.name for s in self.config.stages}
        scores = [self._score_path(r if r in stage_names else f"{stage.name}:{r}", Path(p), sync=False)
                  for r, p in zip(refs, paths)]
        order = sorted(range(len(paths)), key=lambda i: -scores[i])
        chosen, best = [order[0]], scores[order[0]]
        trial = self.out / stage.name / "trial"
        for i in order[1:]:
            if trial.exists():
                shutil.rmtree(trial)
            model_soup([paths[j] for j in chosen + [i]], output=trial)
            score = self.evaluate(self.load_model(str(trial)), sync=False)[self.config.eval.metric]
            self._log(dict(stage=stage.name, soup_candidates=[refs[j] for j in chosen + [i]], score=score))
            if score >= best:
                chosen, best = chosen + [i], score
        if trial.exists():
            shutil.rmtree(trial)
        self._log(dict(stage=stage.name, soup=[refs[j] for j in chosen], score=best))
        model_soup([paths[j] for j in chosen], output=final)
        self._record_score(stage.name, best)
