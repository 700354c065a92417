"""Training losses as ``nn.Module``s holding their options."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import NORM_EPS
from ..ops.focal_infonce import check_inputs, check_options, focal_infonce_with_stats

DISTILL_TEMPERATURE = 0.05  # KaLM-Embedding V2.5's distillation temperature


def check_distill_options(*, distill_weight: float, distill_temperature: float,
                          teacher_temperature: Optional[float]) -> None:
    """Raises ValueError naming the first bad option of teacher-score distillation."""
    for name, value in (("distill_weight", distill_weight), ("distill_temperature", distill_temperature),
                        ("teacher_temperature", teacher_temperature)):
        if value is None and name == "teacher_temperature":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0 <= distill_weight <= 1:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight!r}")
    if distill_temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {distill_temperature!r}")
    if teacher_temperature is not None and teacher_temperature <= 0:
        raise ValueError(f"teacher_temperature must be > 0 (or None: distill_temperature), got {teacher_temperature!r}")


def teacher_distillation(q: torch.Tensor, docs: torch.Tensor, teacher_scores: torch.Tensor, *,
                         temperature: float = DISTILL_TEMPERATURE, teacher_temperature: Optional[float] = None,
                         similarity: str = "cos") -> torch.Tensor:
    """KL(teacher || student) over each query's own candidates, averaged over the queries: a float32 scalar.

    ``q [B, D]``, ``docs [B, 1+M, D]`` (positive first), ``teacher_scores [B, 1+M]``: a teacher's score of each of
    those pairs (a larger embedder's similarity, a reranker's logit). Teacher distribution
    ``softmax(teacher_scores / teacher_temperature)`` (default ``temperature``), student
    ``softmax(sim(q, doc) / temperature)`` with ``sim`` the cosine (``"cos"``) or the dot product (``"dot"``). In-batch
    and synthetic negatives take no part (the teacher scored none); the teacher side carries no gradient.
    """
    if teacher_scores.shape != docs.shape[:2]:
        raise ValueError(f"teacher_scores must be [B, 1+M] = {list(docs.shape[:2])} (one score per document of "
                         f"docs), got {list(teacher_scores.shape)}")
    q, docs = q.float(), docs.float()
    sim = torch.einsum("bd,bkd->bk", q, docs)
    if similarity == "cos":
        sim = sim / (q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS) * docs.norm(dim=-1).clamp_min(NORM_EPS))
    student = torch.log_softmax(sim / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_scores.detach().float() / (teacher_temperature or temperature), dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)


class FocalInfoNCELoss(nn.Module):
    """Focal-InfoNCE (``kalm_fast.ops.focal_infonce``) with optional Matryoshka dimensions and teacher-score
    distillation.

    ``forward(q [B, D], docs [B, 1+M, D], generator=None, teacher_scores=None) -> (loss, stats)``: ``loss`` is a
    float32 scalar, the weighted sum (weights default to 1 each, not normalized) over ``matryoshka_dims`` (default:
    only the full D) of the loss, ``reduction="mean"``, on the first ``dim`` features (cosine similarity normalizes
    each truncation again; each dimension draws its own synthetic negatives from ``generator``). With
    ``distill_weight`` w > 0 each dimension's loss is ``(1 - w) * focal-InfoNCE + w * teacher_distillation`` (KaLM
    V2.5 distills with w = 0.7 at temperature 0.05), which needs ``teacher_scores [B, 1+M]``. ``stats`` holds floats
    for logging, from the first Matryoshka dimension: ``mean_p`` (probability of the positive), ``mean_weight``
    (focal weight), ``pos_sim`` and ``hardest_neg_sim`` (mean over queries of the similarity to the positive / to
    the most similar kept negative, NaN when no query has a negative), without the focal term (w = 1) none of these;
    ``distill_kl`` when distilling.
    """

    def __init__(self, temperature: float = 0.01, gamma: float = 0.5, similarity: str = "cos",
                 in_batch_negatives: bool = True, num_synthetic: int = 0, mix_top_k: Optional[int] = None,
                 mix_alpha: float = 2.0, mix_mode: str = "pair", false_negative_margin: Optional[float] = None,
                 detach_focal_weight: bool = False, gather: bool = False,
                 matryoshka_dims: Optional[Sequence[int]] = None,
                 matryoshka_weights: Optional[Sequence[float]] = None, backend: str = "auto",
                 distill_weight: float = 0.0, distill_temperature: float = DISTILL_TEMPERATURE,
                 teacher_temperature: Optional[float] = None):
        super().__init__()
        check_options(temperature=temperature, gamma=gamma, similarity=similarity, num_synthetic=num_synthetic,
                      mix_top_k=mix_top_k, mix_alpha=mix_alpha, false_negative_margin=false_negative_margin,
                      mix_mode=mix_mode, backend=backend)
        check_distill_options(distill_weight=distill_weight, distill_temperature=distill_temperature,
                              teacher_temperature=teacher_temperature)
        if matryoshka_dims is not None:
            matryoshka_dims = list(matryoshka_dims)
            if (not matryoshka_dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in matryoshka_dims)
                    or min(matryoshka_dims) < 1):
                raise ValueError(f"matryoshka_dims must be a non-empty list of ints >= 1, got {matryoshka_dims}")
        if matryoshka_weights is not None:
            matryoshka_weights = [float(w) for w in matryoshka_weights]
            if matryoshka_dims is None or len(matryoshka_weights) != len(matryoshka_dims):
                raise ValueError(f"matryoshka_weights must have one weight per matryoshka_dims entry "
                                 f"({matryoshka_dims}), got {matryoshka_weights}")
            if (min(matryoshka_weights) < 0 or not all(map(math.isfinite, matryoshka_weights))
                    or not sum(matryoshka_weights)):
                raise ValueError(f"matryoshka_weights must be finite and >= 0, not all 0, got {matryoshka_weights}")
        self.matryoshka_dims = matryoshka_dims
        self.matryoshka_weights = matryoshka_weights
        self.options = dict(temperature=temperature, gamma=gamma, similarity=similarity,
                            in_batch_negatives=in_batch_negatives, num_synthetic=num_synthetic, mix_top_k=mix_top_k,
                            mix_alpha=mix_alpha, mix_mode=mix_mode, false_negative_margin=false_negative_margin,
                            detach_focal_weight=detach_focal_weight, gather=gather, backend=backend)
        self.distill = dict(weight=float(distill_weight), temperature=distill_temperature,
                            teacher_temperature=teacher_temperature)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + (
            f", matryoshka_dims={self.matryoshka_dims}, matryoshka_weights={self.matryoshka_weights}") + "".join(
            f", distill_{k}={v!r}" for k, v in self.distill.items() if self.distill["weight"])

    def forward(self, q: torch.Tensor, docs: torch.Tensor, generator: Optional[torch.Generator] = None,
                teacher_scores: Optional[torch.Tensor] = None):
        check_inputs(q, docs, generator)  # before any slicing: docs of another width must not be cut to q's
        full = q.shape[-1]
        dims = self.matryoshka_dims or [full]
        weights = self.matryoshka_weights or [1.0] * len(dims)
        if max(dims) > full:
            raise ValueError(f"matryoshka_dims must be <= the embedding size D={full} of q [B, D], got {dims}")
        w = self.distill["weight"]
        if (teacher_scores is None) != (w == 0):
            raise ValueError(f"teacher_scores [B, 1+M] must be given exactly when distill_weight > 0 (it is {w}); "
                             f"it was {'not given' if teacher_scores is None else 'given'}")
        loss, stats = 0.0, {}
        for i, (dim, weight) in enumerate(zip(dims, weights)):
            if w < 1:
                out = focal_infonce_with_stats(q[:, :dim], docs[..., :dim], generator=generator, **self.options)
                loss = loss + out.loss * ((1 - w) * weight)
                if i == 0:
                    stats.update(self._stats(out))
            if w > 0:
                kl = teacher_distillation(q[:, :dim], docs[..., :dim], teacher_scores,
                                          temperature=self.distill["temperature"],
                                          teacher_temperature=self.distill["teacher_temperature"],
                                          similarity=self.options["similarity"])
                loss = loss + kl * (w * weight)
                if i == 0:
                    stats["distill_kl"] = kl.item()
        return loss, stats

    def _stats(self, out) -> dict:
        with torch.no_grad():
            log_p = out.log_p.detach()
            p = log_p.clamp(max=0).exp()
            weight = (-torch.expm1(log_p)).clamp_min(0) ** self.options["gamma"]
            neg = out.hardest_neg_sim[torch.isfinite(out.hardest_neg_sim)]
            return {"mean_p": p.mean().item(), "mean_weight": weight.mean().item(),
                    "pos_sim": out.pos_sim.mean().item(),
                    "hardest_neg_sim": neg.mean().item() if neg.numel() else float("nan")}
