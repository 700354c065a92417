"""Training configuration: a YAML file with global settings and a list of stages.

```yaml
model: null                 # model directory; null = the embedded MiniLM
output_dir: runs/demo
seed: 0
stages:
  - name: finetune          # a training stage
    data: [train.jsonl]
    steps: 200              # or epochs: 1
    batch_size: 64          # global contrastive batch (split across ranks)
    hard_negatives: 7
  - name: soup              # a soup stage: average earlier stages' final models
    type: soup
    from: [finetune, base]
    greedy: true            # keep a checkpoint only if it does not lower the eval score
eval:                       # the validation split: chooses checkpoints (keep_best) and greedy soups
  queries: val_queries.jsonl
  corpus: val_corpus.jsonl
test:                       # the test split (optional): scored once per final model, never used to choose
  queries: test_queries.jsonl
  corpus: test_corpus.jsonl
```
Every key of ``TrainStage`` / ``SoupStage`` / ``TrainConfig`` below may be set; unknown keys are an error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml


@dataclass
class EvalConfig:
    queries: str
    corpus: str
    instruction: Optional[str] = None
    batch_size: int = 64
    metric: str = "ndcg@10"   # the score used for checkpoint selection and greedy soups


@dataclass
class TrainStage:
    name: str
    data: list
    type: str = "train"
    init: str = "previous"            # "previous", "base" or an earlier stage's name
    instructions: dict = field(default_factory=dict)   # task -> instruction for records without one
    task_weights: dict = field(default_factory=dict)   # task -> mixing weight (batches per epoch scale)
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 32
    gradcache_chunk: Optional[int] = None   # GradCache mini-batch (texts per forward); None = plain backward
    hard_negatives: int = 7
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "linear"          # linear | cosine | constant (after warmup)
    max_grad_norm: Optional[float] = 1.0
    temperature: float = 0.01
    gamma: float = 0.5
    similarity: str = "cos"
    in_batch_negatives: bool = True
    num_synthetic: int = 0
    mix_top_k: Optional[int] = None
    mix_alpha: float = 2.0
    false_negative_margin: Optional[float] = None
    detach_focal_weight: bool = False
    matryoshka_dims: Optional[list] = None
    matryoshka_weights: Optional[list] = None
    gather: bool = True               # cross-rank negatives when distributed
    save_every: Optional[int] = None  # steps between resumable checkpoints (None: only the final model)
    keep_checkpoints: int = 2         # how many of the latest checkpoints to keep on disk
    eval_every: Optional[int] = None  # steps between evaluations (needs `eval`)
    keep_best: bool = False           # final model = best evaluated checkpoint of the stage
    seed: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"stage {self.name!r}: set exactly one of 'steps' or 'epochs'")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"stage {self.name!r}: batch_size must be >= 1, got {self.batch_size}")
        if self.hard_negatives < 0:
            raise ValueError(f"stage {self.name!r}: hard_negatives must be >= 0, got {self.hard_negatives}")
        if self.gradcache_chunk is not None and self.gradcache_chunk < 1:
            raise ValueError(f"stage {self.name!r}: gradcache_chunk must be >= 1 or null")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"stage {self.name!r}: schedule must be linear, cosine or constant, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"stage {self.name!r}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class SoupStage:
    name: str
    type: str = "soup"
    # earlier stage names, "base", or paths to model directories
    from_: list = field(default_factory=list)
    weights: Optional[list] = None
    greedy: bool = False


@dataclass
class TrainConfig:
    stages: list
    model: Optional[str] = None
    output_dir: str = "runs/kalm"
    seed: int = 0
    device: Optional[str] = None      # None: cuda if available, else cpu
    dtype: Optional[str] = None       # weights dtype; autocast is bf16 on GPU unless `autocast: false`
    autocast: bool = True
    max_length: int = 512
    attn_backend: str = "auto"
    gradient_checkpointing: bool = False
    parallel: str = "ddp"             # ddp | fsdp (under torchrun)
    log_every: int = 10
    eval: Optional[EvalConfig] = None   # validation split (every choice of the trainer)
    test: Optional[EvalConfig] = None   # test split (reports only; the trainer never reads it)

    def __post_init__(self):
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.eval is not None and self.test is not None and \
                Path(self.eval.queries).resolve() == Path(self.test.queries).resolve():
            raise ValueError(f"test.queries and eval.queries are the same file ({self.test.queries}): the 'eval' "
                             "split chooses checkpoints and soups, so the test split must be other queries")
        if not self.stages:
            raise ValueError("config needs at least one stage under 'stages'")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names) or "base" in names:
            raise ValueError(f"stage names must be unique and not 'base', got {names}")
        for i, s in enumerate(self.stages):
            earlier = names[:i]
            refs = [s.init] if isinstance(s, TrainStage) else s.from_
            for ref in refs:
                if isinstance(s, TrainStage) and ref == "previous":
                    continue
                if ref == "base" or ref in earlier or (isinstance(s, SoupStage) and Path(ref).exists()):
                    continue
                raise ValueError(f"stage {s.name!r} refers to {ref!r}, which is neither 'base', an earlier stage "
                                 f"({earlier}) nor an existing path")
            if isinstance(s, SoupStage) and s.greedy and self.eval is None:
                raise ValueError(f"soup stage {s.name!r} is greedy, which needs an 'eval' section")
            if isinstance(s, TrainStage) and (s.eval_every or s.keep_best) and self.eval is None:
                raise ValueError(f"stage {s.name!r} evaluates (eval_every/keep_best), which needs an 'eval' section")


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    if cls is SoupStage and "from" in raw:
        raw["from_"] = raw.pop("from")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        shown = sorted(k.rstrip("_") for k in known)
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {shown}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def config_from_dict(raw: dict) -> TrainConfig:
    """Build a ``TrainConfig`` from a mapping (paths are relative to the working directory)."""
    if not isinstance(raw, dict):
        raise ValueError(f"config must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    stages = []
    for i, s in enumerate(raw.pop("stages", None) or []):
        where = f"stages[{i}]"
        kind = s.get("type", "train") if isinstance(s, dict) else None
        if kind == "soup":
            stage = _build(SoupStage, s, where)
        elif kind == "train":
            stage = _build(TrainStage, s, where)
        else:
            raise ValueError(f"{where}: 'type' must be 'train' or 'soup', got {kind!r}")
        stages.append(stage)
    for split in ("eval", "test"):
        if raw.get(split) is not None:
            raw[split] = _build(EvalConfig, raw[split], split)
    return _build(TrainConfig, dict(raw, stages=stages), "config")


def load_config(path) -> TrainConfig:
    """Read a YAML config (paths inside are relative to the working directory)."""
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    try:
        return config_from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
