"""What focal reweighting, hard-negative mixing and the soup buy on your data (``kalm-fast ablate CONFIG.yaml``).

``ablate(config, seeds=3)`` runs the config's fine-tuning stage under four variants: plain InfoNCE (gamma 0, no
mixing), + focal (the stage's gamma), + mixing (the stage's synthetic negatives), + focal + mixing; each with
every seed, and for every seed a greedy soup of its four runs. A seed gives every variant the same batches, hard
negatives and dropout draws, so the variants are paired. Everything else of the stage stays as configured.

Honest splits: the config's ``eval`` section is the validation split; it alone chooses checkpoints
(``keep_best``) and the greedy soups. The ``test`` section (same format) is read only after every run and soup
is final, and scores each final model once. The two must not share queries.

Reported per variant: mean and standard deviation over seeds of nDCG@10 / Recall@10 / MRR@10 on the test split,
and the difference to plain InfoNCE with a paired bootstrap confidence interval over test queries (per-query
differences averaged over seeds; queries resampled ``resamples`` times with a fixed seed; percentile interval).
A difference whose interval contains 0 is within noise.

Everything runs in one process through one ``Trainer``: the training data is indexed once, the validation and
test splits are read once, the starting model is scored once. ``resume=True`` (``--resume``) skips finished runs.

Output (``output_dir``, default ``<config output_dir>/ablation``)::

    ablation.json   every number: per variant and seed, test means, validation scores, soup members; wall time
    ablation.md     the table
    ablation.png    bar chart with error bars (needs matplotlib; skipped with a message without it)
    <variant>-s<seed>/final/, metrics.jsonl, scores.json   the runs, as ``kalm-fast train`` writes them
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..files import atomic_write, atomic_write_text
from .config import SoupStage, TrainConfig, TrainStage, load_config
from .evaluate import evaluate_model
from .trainer import Trainer, base_model_path, load_split

METRICS = ("ndcg@10", "recall@10", "mrr@10")
METRIC_LABELS = {"ndcg@10": "nDCG@10", "recall@10": "Recall@10", "mrr@10": "MRR@10"}
# variant name -> (focal reweighting on, hard-negative mixing on)
VARIANTS = {"plain": (False, False), "focal": (True, False), "mixing": (False, True), "focal_mixing": (True, True)}
SOUP = "soup"
START = "start"


def paired_bootstrap_ci(diff, *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> tuple:
    """Percentile bootstrap interval of ``mean(diff)``, ``diff`` the per-query differences of two paired systems.

    Queries are drawn with replacement ``resamples`` times from ``numpy.random.default_rng(seed)``.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"diff must be a non-empty 1-D array of per-query differences, got shape {diff.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, (1 << 22) // diff.size)  # bounds the index matrix to ~32 MB
    for start in range(0, resamples, rows):
        n = min(rows, resamples - start)
        means[start:start + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _pick_stage(config: TrainConfig, name: Optional[str], where: str) -> TrainStage:
    train_stages = [s for s in config.stages if isinstance(s, TrainStage)]
    if not train_stages:
        raise ValueError(f"{where}: no training stage to ablate (only soup stages)")
    if name is None:
        stage = train_stages[0]
    else:
        found = [s for s in train_stages if s.name == name]
        if not found:
            raise ValueError(f"stage {name!r} is not a training stage of {where}; expected one of "
                             f"{[s.name for s in train_stages]}")
        stage = found[0]
    starts_from_base = stage.init == "base" or (stage.init == "previous" and config.stages[0] is stage)
    if not starts_from_base:
        raise ValueError(f"{where}: stage {stage.name!r} starts from {stage.init!r}; ablate runs one stage from the "
                         "config's model, so give it 'init: base' or point 'model' at that stage's output")
    return stage


def _check_variants_differ(stage: TrainStage, where: str):
    """Every variant must differ from plain InfoNCE, else the ablation would compare a run with itself."""
    prefix = f"{where}: stage {stage.name!r}"
    if stage.gamma <= 0:
        raise ValueError(f"{prefix} has gamma {stage.gamma}, so '+ focal' would be plain InfoNCE; set its gamma "
                         "to the focal exponent to test (KaLM-Embedding-V2: 0.5)")
    if stage.num_synthetic <= 0:
        raise ValueError(f"{prefix} has num_synthetic {stage.num_synthetic}, so '+ mixing' would be plain InfoNCE; "
                         "set num_synthetic (synthetic negatives per query, e.g. 2)")
    if stage.distill_weight == 1:
        raise ValueError(f"{prefix} has distill_weight 1: its loss is the distillation term alone, which gamma and "
                         "num_synthetic do not change, so every variant would be the same run; ablate it with "
                         "distill_weight < 1")


def _variant_stages(stage: TrainStage, seeds: list) -> list:
    """Per seed: the four variants of ``stage`` from the base model, then a greedy soup of them."""
    stages = []
    for seed in seeds:
        names = []
        for name, (focal, mixing) in VARIANTS.items():
            names.append(f"{name}-s{seed}")
            stages.append(dataclasses.replace(stage, name=names[-1], init="base", seed=seed,
                                              gamma=stage.gamma if focal else 0.0,
                                              num_synthetic=stage.num_synthetic if mixing else 0))
        stages.append(SoupStage(name=f"{SOUP}-s{seed}", from_=names, greedy=True))
    return stages


def _labels(stage: TrainStage) -> dict:
    """Row labels of the table; a distilling stage's runs all distill, which the plain row says."""
    distills = f", + distillation (w={stage.distill_weight:g}) in every run" if stage.distill_weight else ""
    list_wise = ", list-wise" if stage.mix_mode == "list" else ""
    return {START: "start (no fine-tuning)", "plain": f"plain InfoNCE (γ=0, no mixing){distills}",
            "focal": f"+ focal (γ={stage.gamma:g})",
            "mixing": f"+ mixing ({stage.num_synthetic} synthetic/query{list_wise})",
            "focal_mixing": "+ focal + mixing", SOUP: "greedy soup of the 4 (chosen on validation)"}


def _fmt_diff(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def format_table(results: dict) -> str:
    """The results as a markdown table, with a caption line and the list of differences within noise."""
    test, seeds = results["test"], results["seeds"]
    level = f"{100 * results['bootstrap']['confidence']:g}"
    lines = [f"Ablation of stage {results['stage']!r}: {len(seeds)} seeds ({', '.join(map(str, seeds))}); test split "
             f"{test['num_queries']} queries / {test['num_docs']} documents; checkpoints and soups chosen on the "
             f"validation split ({results['validation']['num_queries']} queries). Mean ± std over seeds; Δ: "
             f"difference to plain InfoNCE [{level}% paired bootstrap CI over test queries, "
             f"{results['bootstrap']['resamples']} resamples].", ""]
    names = [METRIC_LABELS[m] for m in results["metrics"]]
    lines.append("| variant | " + " | ".join(names) + " | " + " | ".join(f"Δ {n}" for n in names) + " |")
    lines.append("|---" * (1 + 2 * len(names)) + "|")
    noise = []
    for row in results["variants"]:
        cells = []
        for m in results["metrics"]:
            std = row["std"][m] if row["std"] else None
            cells.append(f"{row['mean'][m]:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
        diffs = row["diff_vs_plain"]
        cells += [_fmt_diff(diffs[m]) if diffs else "—" for m in results["metrics"]]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        if diffs:
            within = [METRIC_LABELS[m] for m in results["metrics"] if diffs[m]["within_noise"]]
            if within:
                noise.append(f"{row['label']}: {', '.join(within)}")
    lines.append("")
    lines.append(f"Within noise ({level}% CI of Δ contains 0): " + ("; ".join(noise) if noise else "none") + ".")
    return "\n".join(lines)


def plot_results(results: dict) -> Optional[bytes]:
    """PNG bytes of a bar chart (one group per variant, one bar per metric, error bars = std over seeds);
    None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metrics = results["variants"], results["metrics"]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for j, m in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        means = [r["mean"][m] for r in rows]
        errs = [(r["std"][m] or 0.0) if r["std"] else 0.0 for r in rows]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=METRIC_LABELS[m])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["label"].replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set_ylabel("test score (mean ± std over seeds)")
    ax.set_title(f"ablation of {results['stage']!r}, {len(results['seeds'])} seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


class Ablation:
    """A checked ablation plan: the constructor validates everything (bad input raises ``ValueError`` naming
    the argument or config key) and reads the data before any training; ``run()`` trains, scores, writes."""

    def __init__(self, config, *, seeds: int = 3, stage: Optional[str] = None, output_dir=None,
                 resume: bool = False, resamples: int = 1000, bootstrap_seed: int = 0, confidence: float = 0.95,
                 show_progress: bool = True):
        self.started = time.perf_counter()
        self.config_path = None if isinstance(config, TrainConfig) else str(config)
        config = config if isinstance(config, TrainConfig) else load_config(config)
        where = self.config_path or "config"
        _check_int("seeds", seeds, 1)
        _check_int("resamples", resamples, 1)
        _check_int("bootstrap_seed", bootstrap_seed, 0)
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("ablate runs in one process; start it without torchrun")
        if config.eval is None:
            raise ValueError(f"{where}: ablate needs an 'eval' section (the validation split, which chooses "
                             "checkpoints and soups)")
        if config.test is None:
            raise ValueError(f"{where}: ablate needs a 'test' section (the test split, scored once per final "
                             "model; same keys as 'eval': queries, corpus, instruction, batch_size)")
        self.stage = _pick_stage(config, stage, where)
        _check_variants_differ(self.stage, where)
        first = config.seed if self.stage.seed is None else self.stage.seed
        self.seeds = [first + i for i in range(seeds)]
        self.resamples, self.bootstrap_seed, self.confidence = resamples, bootstrap_seed, confidence
        self.show_progress = show_progress
        self.out = Path(output_dir) if output_dir is not None else Path(config.output_dir) / "ablation"
        self.config = dataclasses.replace(config, output_dir=str(self.out),
                                          stages=_variant_stages(self.stage, self.seeds))
        self.trainer = Trainer(self.config, resume=resume, show_progress=show_progress)  # reads the validation split
        self.trainer.train_data(self.config.stages[0])  # indexes (and checks) the training data once, for every run
        self.test_set = load_split(config.test, "test")
        shared = set(self.trainer.eval_set.queries) & set(self.test_set.queries)
        if shared:
            raise ValueError(f"{where}: the validation split ('eval': {config.eval.queries}) and the test split "
                             f"('test': {config.test.queries}) share {len(shared)} queries, e.g. "
                             f"{sorted(shared)[0]!r}; validation queries must come from the training side")

    def run(self) -> dict:
        """Train every variant and soup (choices on validation), then score each final model on test once."""
        self.trainer.train()
        per_query = self._score_on_test()
        results = self._summarize(per_query)
        self.out.mkdir(parents=True, exist_ok=True)
        png = plot_results(results)
        results["files"] = {"json": str(self.out / "ablation.json"), "table": str(self.out / "ablation.md"),
                            "png": str(self.out / "ablation.png") if png is not None else None}
        if png is None:
            print("matplotlib is not installed: skipped the bar chart (pip install matplotlib to get ablation.png)")
            (self.out / "ablation.png").unlink(missing_ok=True)  # an earlier run's chart would not match
        else:
            atomic_write(self.out / "ablation.png", lambda tmp: tmp.write_bytes(png))
        atomic_write_text(self.out / "ablation.md", format_table(results) + "\n")
        atomic_write_text(self.out / "ablation.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        return results

    def _score_on_test(self) -> dict:
        """Per-query test metrics ``{model: {metric: array}}`` of the starting model and every final model."""
        from tqdm.auto import tqdm

        models = {START: base_model_path(self.config.model)}
        models.update({s.name: str(self.out / s.name / "final") for s in self.config.stages})
        out = {}
        for name, path in tqdm(models.items(), desc="test split", disable=not self.show_progress):
            model = self.trainer.load_model(path)
            metrics = evaluate_model(model, self.test_set, batch_size=self.config.test.batch_size, ks=(10,),
                                     per_query=True)
            out[name] = {m: np.asarray(metrics[m], dtype=np.float64) for m in METRICS}
            del model
        return out

    def _soup_members(self) -> dict:
        """``{soup stage: [member stages]}`` from the trainer's log (the last record per soup)."""
        members = {}
        with open(self.out / "metrics.jsonl") as fh:
            for line in fh:
                record = json.loads(line)
                if record.get("soup"):
                    members[record["stage"]] = record["soup"]
        return members

    def _summarize(self, per_query: dict) -> dict:
        validation = json.loads((self.out / "scores.json").read_text())
        members = self._soup_members()
        labels = _labels(self.stage)
        start = {m: float(per_query[START][m].mean()) for m in METRICS}
        rows = [dict(name=START, label=labels[START], runs=[dict(seed=None, path=base_model_path(self.config.model),
                                                                 test=start)],
                     mean=start, std=None, diff_vs_plain=None)]
        for name in [*VARIANTS, SOUP]:
            runs = []
            for seed in self.seeds:
                key = f"{name}-s{seed}"
                run = dict(seed=seed, path=str(self.out / key / "final"),
                           test={m: float(per_query[key][m].mean()) for m in METRICS},
                           validation={self.config.eval.metric: validation.get(key)})
                if name == SOUP:
                    run["members"] = members.get(key)
                runs.append(run)
            values = {m: [r["test"][m] for r in runs] for m in METRICS}
            row = dict(name=name, label=labels[name], runs=runs,
                       mean={m: float(np.mean(v)) for m, v in values.items()},
                       std={m: float(np.std(v, ddof=1)) if len(v) > 1 else None for m, v in values.items()},
                       diff_vs_plain=None)
            if name in VARIANTS:
                focal, mixing = VARIANTS[name]
                row["settings"] = dict(gamma=self.stage.gamma if focal else 0.0,
                                       num_synthetic=self.stage.num_synthetic if mixing else 0)
            if name != "plain":
                row["diff_vs_plain"] = {}
                for m in METRICS:
                    diff = np.mean([per_query[f"{name}-s{s}"][m] - per_query[f"plain-s{s}"][m] for s in self.seeds],
                                   axis=0)
                    low, high = paired_bootstrap_ci(diff, resamples=self.resamples, seed=self.bootstrap_seed,
                                                    confidence=self.confidence)
                    row["diff_vs_plain"][m] = dict(mean=float(diff.mean()), ci_low=low, ci_high=high,
                                                   within_noise=bool(low <= 0.0 <= high))
            rows.append(row)
        cfg = self.config
        return dict(
            config=self.config_path, stage=self.stage.name, seeds=self.seeds, metrics=list(METRICS),
            validation=dict(queries=cfg.eval.queries, corpus=cfg.eval.corpus, metric=cfg.eval.metric,
                            num_queries=len(self.trainer.eval_set), num_docs=len(self.trainer.eval_set.docs)),
            test=dict(queries=cfg.test.queries, corpus=cfg.test.corpus, num_queries=len(self.test_set),
                      num_docs=len(self.test_set.docs)),
            bootstrap=dict(resamples=self.resamples, seed=self.bootstrap_seed, confidence=self.confidence,
                           over="test queries; per-query differences to plain InfoNCE averaged over seeds"),
            variants=rows, output_dir=str(self.out), wall_s=round(time.perf_counter() - self.started, 1),
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            environment=dict(torch=torch.__version__, device=str(self.trainer.device),
                             threads=torch.get_num_threads()))


def ablate(config, **options) -> dict:
    """``Ablation(config, **options).run()``: ``config`` a ``TrainConfig`` or a YAML path; returns the results
    (what ``ablation.json`` holds). Options: ``seeds=3, stage=None, output_dir=None, resume=False,
    resamples=1000, bootstrap_seed=0, confidence=0.95, show_progress=True``."""
    return Ablation(config, **options).run()
