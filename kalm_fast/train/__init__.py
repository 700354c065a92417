"""Training pipeline: data, task-homogeneous sampling, GradCache, the multi-stage trainer, model soup, eval.

``Trainer(load_config("run.yaml")).train()`` is what ``kalm-fast train run.yaml`` runs; ``model_soup`` and
``evaluate_model`` / ``rank_metrics`` are usable on their own; ``ablate(config)`` is ``kalm-fast ablate``;
``score_file(teacher, records, output)`` (a teacher's scores for distillation) is ``kalm-fast score``,
``mine_file(model, records, output)`` (hard negatives) ``kalm-fast mine``.
"""
from ..prompts import format_query
from .ablation import Ablation, ablate
from .config import TrainConfig, load_config
from .data import EvalSet, TrainData, load_eval_set
from .evaluate import evaluate_model, rank_metrics
from .mining import mine_file
from .gradcache import contrastive_step
from .sampler import TaskBatchSampler
from .soup import model_soup
from .teacher_scores import score_file
from .trainer import Trainer

__all__ = ["Trainer", "TrainConfig", "load_config", "TrainData", "TaskBatchSampler", "EvalSet", "load_eval_set",
           "format_query", "contrastive_step", "model_soup", "evaluate_model", "rank_metrics", "Ablation", "ablate",
           "score_file", "mine_file"]
