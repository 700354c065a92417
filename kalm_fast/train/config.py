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
Every key of ``TrainStage`` / ``SoupStage`` / ``TrainConfig`` below may be set; unknown keys are an error, and
every value is checked against its type and range when the config is read (before any data or model is touched),
the error naming the key: ``stages[0] ('finetune'): 'lr' must be > 0, got -1.0``. Numbers written as strings are
taken as numbers where a float is expected: YAML 1.1 reads ``lr: 1e-5`` (no dot) as the string ``"1e-5"``.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ..ops.focal_infonce import check_options
from .evaluate import DEFAULT_KS
from .losses import DISTILL_TEMPERATURE, check_distill_options

EVAL_METRICS = tuple(f"{name}@{k}" for name in ("ndcg", "recall", "mrr") for k in DEFAULT_KS)
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
ATTN_BACKENDS = ("auto", "reference", "torch", "triton", "cuda")


def _typed(key: str, value, hint):
    """``value`` checked against the annotation ``hint`` (ints and numeric strings pass as floats)."""
    if get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    origin, args = get_origin(hint), get_args(hint)
    if hint is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number):
            return float(number)
        raise ValueError(f"{key!r} must be a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key!r} must be a whole number, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key!r} must be true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key!r} must be a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key!r} must be a list, got {value!r}")
        return [_typed(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key!r} must be a mapping, got {value!r}")
        return {_typed(f"{key} key", k, args[0]): _typed(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    return value  # nested sections are built and checked by their own classes


def _check_types(obj) -> None:
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _typed(f.name.rstrip("_"), getattr(obj, f.name), get_type_hints(type(obj))[f.name]))


def _require(ok: bool, key: str, what: str, value) -> None:
    if not ok:
        raise ValueError(f"{key!r} must be {what}, got {value!r}")


RUN_FILES = ("run.json", "metrics.jsonl", "scores.json")  # what the trainer writes beside the stages' directories


def _check_name(name: str) -> None:
    """A stage name is a directory under output_dir: one plain path component, none of the run's own files."""
    _require(bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")
             and name not in RUN_FILES, "name", "a plain directory name (not empty, no '/', '\\' or NUL, not "
             f"starting with '.', none of {', '.join(RUN_FILES)})", name)


@dataclass
class EvalConfig:
    queries: str
    corpus: str
    instruction: Optional[str] = None
    batch_size: int = 64
    metric: str = "ndcg@10"   # the score used for checkpoint selection and greedy soups

    def __post_init__(self):
        _check_types(self)
        _require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _require(self.metric in EVAL_METRICS, "metric", f"one of {', '.join(EVAL_METRICS)}", self.metric)


@dataclass
class TrainStage:
    name: str
    data: list[str]
    type: str = "train"
    init: str = "previous"            # "previous", "base" or an earlier stage's name
    instructions: dict[str, str] = field(default_factory=dict)   # task -> instruction for records without one
    task_weights: dict[str, float] = field(default_factory=dict)  # task -> mixing weight (batches per epoch scale)
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
    mix_mode: str = "pair"            # "pair": two of the top-K hard negatives; "list": all K, similarity-weighted
    false_negative_margin: Optional[float] = None
    detach_focal_weight: bool = False
    matryoshka_dims: Optional[list[int]] = None
    matryoshka_weights: Optional[list[float]] = None
    distill_weight: float = 0.0       # > 0: loss (1 - w) * focal-InfoNCE + w * KL(teacher || student) on pos/neg_scores
    distill_temperature: float = DISTILL_TEMPERATURE  # the student's softmax temperature in the KL term
    teacher_temperature: Optional[float] = None  # the teacher scores' (None: distill_temperature)
    gather: bool = True               # cross-rank negatives when distributed
    save_every: Optional[int] = None  # steps between resumable checkpoints (None: only the final model)
    keep_checkpoints: int = 2         # how many of the latest checkpoints to keep on disk
    eval_every: Optional[int] = None  # steps between evaluations (needs `eval`)
    keep_best: bool = False           # final model = best evaluated checkpoint of the stage (needs eval_every)
    seed: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        _check_types(self)
        _check_name(self.name)
        _require(bool(self.data) and all(self.data), "data", "a non-empty list of JSONL paths", self.data)
        resolved = [Path(f).resolve() for f in self.data]
        for i, path in enumerate(resolved):
            if path in resolved[:i]:
                raise ValueError(f"'data' lists the file {path} twice ({self.data[resolved.index(path)]!r} and "
                                 f"{self.data[i]!r}): its records would be trained on twice; list each file once "
                                 "(task_weights weighs a task)")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of 'steps' or 'epochs'")
        for key in ("steps", "gradcache_chunk", "save_every", "eval_every"):
            value = getattr(self, key)
            _require(value is None or value >= 1, key, ">= 1 (or null)", value)
        _require(self.epochs is None or self.epochs > 0, "epochs", "> 0", self.epochs)
        _require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _require(self.hard_negatives >= 0, "hard_negatives", ">= 0", self.hard_negatives)
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1", self.keep_checkpoints)
        _require(self.lr > 0, "lr", "> 0", self.lr)
        _require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 (or null)",
                 self.max_grad_norm)
        _require(self.schedule in ("linear", "cosine", "constant"), "schedule", "linear, cosine or constant",
                 self.schedule)
        _require(all(w >= 0 for w in self.task_weights.values()), "task_weights", "weights >= 0", self.task_weights)
        check_options(temperature=self.temperature, gamma=self.gamma, similarity=self.similarity,
                      num_synthetic=self.num_synthetic, mix_top_k=self.mix_top_k, mix_alpha=self.mix_alpha,
                      false_negative_margin=self.false_negative_margin, mix_mode=self.mix_mode)
        if self.num_synthetic and (self.hard_negatives < 2 or (self.mix_top_k or 2) < 2):
            raise ValueError("'num_synthetic' mixes a query's top hard negatives: it needs hard_negatives >= 2 "
                             f"and mix_top_k >= 2 (got {self.hard_negatives} and {self.mix_top_k})")
        if self.hard_negatives == 0 and (not self.in_batch_negatives or self.batch_size == 1):
            raise ValueError(f"'hard_negatives' 0 with in_batch_negatives {self.in_batch_negatives} and batch_size "
                             f"{self.batch_size} leaves each query only its positive (loss 0, no gradient): set "
                             "hard_negatives >= 1, or in_batch_negatives: true with batch_size >= 2")
        check_distill_options(distill_weight=self.distill_weight, distill_temperature=self.distill_temperature,
                              teacher_temperature=self.teacher_temperature)
        if self.distill_weight and self.hard_negatives == 0:
            raise ValueError("'distill_weight' > 0 distills the teacher's scores of each query's positive and hard "
                             "negatives: it needs hard_negatives >= 1 (with none, the KL term is always 0)")
        if not self.distill_weight and (self.distill_temperature != DISTILL_TEMPERATURE
                                        or self.teacher_temperature is not None):
            warnings.warn(f"stage {self.name!r}: distill_temperature / teacher_temperature are set but "
                          "distill_weight is 0, so nothing distills (set distill_weight > 0 to use them)", stacklevel=2)
        if not self.num_synthetic and (self.mix_top_k is not None or self.mix_alpha != 2.0 or self.mix_mode != "pair"):
            warnings.warn(f"stage {self.name!r}: mix_top_k / mix_alpha / mix_mode are set but num_synthetic is 0, so "
                          "nothing is mixed (set num_synthetic > 0 to use them)", stacklevel=2)
        if self.distill_weight == 1 and self.num_synthetic:
            warnings.warn(f"stage {self.name!r}: distill_weight 1 leaves out the focal-InfoNCE term, which alone uses "
                          f"the {self.num_synthetic} synthetic negatives (num_synthetic) and gamma", stacklevel=2)
        if self.keep_best and self.eval_every is None:
            raise ValueError("'keep_best' needs 'eval_every' (the steps between the evaluations it chooses from)")
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        _require(dims is None or (dims and min(dims) >= 1), "matryoshka_dims", "a non-empty list of ints >= 1", dims)
        _require(weights is None or (dims is not None and len(weights) == len(dims) and min(weights) >= 0
                                     and sum(weights) > 0),
                 "matryoshka_weights", "one weight >= 0 per matryoshka_dims entry, not all 0", weights)


@dataclass
class SoupStage:
    name: str
    type: str = "soup"
    # earlier stage names, "base", or paths to model directories
    from_: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None
    greedy: bool = False

    def __post_init__(self):
        _check_types(self)
        _check_name(self.name)
        _require(bool(self.from_), "from", "a non-empty list of stage names, 'base' or model directories", self.from_)
        if self.weights is not None:
            _require(len(self.weights) == len(self.from_) and min(self.weights) >= 0 and sum(self.weights) > 0,
                     "weights", f"one weight >= 0 per 'from' entry ({len(self.from_)}), not all zero", self.weights)
            if self.greedy:
                raise ValueError("'weights' and 'greedy: true' exclude each other (a greedy soup is uniform)")


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
        _check_types(self)
        _require(self.parallel in ("ddp", "fsdp"), "parallel", "'ddp' or 'fsdp'", self.parallel)
        _require(self.dtype is None or self.dtype in DTYPE_NAMES, "dtype", f"one of {', '.join(DTYPE_NAMES)}",
                 self.dtype)
        # AdamW updates the weights in their own dtype: its eps (1e-8) is 0 in float16 (0/0: NaN weights), and in
        # bfloat16 updates under half a unit in the last place are lost (most of them at lr ~1e-5)
        _require(self.dtype not in ("float16", "fp16"), "dtype",
                 "float32 or bfloat16 (float16 weights turn NaN under AdamW; leave dtype unset for float32 weights "
                 "and bf16 autocast)", self.dtype)
        if self.dtype in ("bfloat16", "bf16"):
            warnings.warn("dtype: bfloat16 trains bf16 weights, without a float32 copy: AdamW updates smaller than "
                          "half a bf16 unit are lost (most updates at lr ~1e-5). Leave dtype unset for float32 "
                          "weights with bf16 autocast (the default on GPU)", stacklevel=2)
        _require(self.attn_backend in ATTN_BACKENDS, "attn_backend", f"one of {', '.join(ATTN_BACKENDS)}",
                 self.attn_backend)
        _require(self.max_length >= 1, "max_length", ">= 1", self.max_length)
        _require(self.log_every >= 1, "log_every", ">= 1", self.log_every)
        _require(bool(self.output_dir), "output_dir", "a non-empty path", self.output_dir)
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
            if isinstance(s, TrainStage) and s.eval_every and self.eval is None:
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
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = sorted(name for name in required if name not in raw)
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    try:
        return cls(**raw)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def config_from_dict(raw: dict) -> TrainConfig:
    """Build a ``TrainConfig`` from a mapping (paths are relative to the working directory)."""
    if not isinstance(raw, dict):
        raise ValueError(f"config must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    stages = []
    raw_stages = raw.pop("stages", None) or []
    if not isinstance(raw_stages, list):
        raise ValueError(f"'stages' must be a list of stages, got {raw_stages!r}")
    for i, s in enumerate(raw_stages):
        where = f"stages[{i}]" + (f" ({s['name']!r})" if isinstance(s, dict) and isinstance(s.get("name"), str) else "")
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


def config_to_dict(config: TrainConfig) -> dict:
    """The plain mapping of a config (what ``config_from_dict`` reads back; ``from`` for soup stages)."""
    raw = dataclasses.asdict(config)
    for stage in raw["stages"]:
        if "from_" in stage:
            stage["from"] = stage.pop("from_")
    return raw


def load_config(path) -> TrainConfig:
    """Read a YAML config (paths inside are relative to the working directory)."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not a readable YAML config ({' '.join(str(exc).split())})") from None
    try:
        return config_from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
