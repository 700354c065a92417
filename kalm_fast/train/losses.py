"""Training losses as ``nn.Module``s holding their options."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.focal_infonce import check_options, focal_infonce_with_stats


class FocalInfoNCELoss(nn.Module):
    """Focal-InfoNCE (``kalm_fast.ops.focal_infonce``) with optional Matryoshka dimensions.

    ``forward(q [B, D], docs [B, 1+M, D], generator=None) -> (loss, stats)``: ``loss`` is a float32 scalar,
    the weighted sum (weights default to 1 each, not normalized) over ``matryoshka_dims`` (default: only the full
    D) of the loss, ``reduction="mean"``, on the first ``dim`` features (cosine similarity normalizes each truncation
    again; each dimension draws its own synthetic negatives from ``generator``); ``stats`` holds floats for logging,
    from the first Matryoshka dimension: ``mean_p`` (probability of the positive), ``mean_weight`` (focal weight),
    ``pos_sim`` and ``hardest_neg_sim`` (mean over queries of the similarity to the positive / to the most
    similar kept negative, NaN when no query has a negative).
    """

    def __init__(self, temperature: float = 0.01, gamma: float = 0.5, similarity: str = "cos",
                 in_batch_negatives: bool = True, num_synthetic: int = 0, mix_top_k: Optional[int] = None,
                 mix_alpha: float = 2.0, false_negative_margin: Optional[float] = None,
                 detach_focal_weight: bool = False, gather: bool = False,
                 matryoshka_dims: Optional[Sequence[int]] = None,
                 matryoshka_weights: Optional[Sequence[float]] = None, backend: str = "auto"):
        super().__init__()
        check_options(temperature=temperature, gamma=gamma, similarity=similarity, num_synthetic=num_synthetic,
                      mix_top_k=mix_top_k, mix_alpha=mix_alpha, false_negative_margin=false_negative_margin,
                      backend=backend)
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
            if min(matryoshka_weights) < 0 or not all(map(math.isfinite, matryoshka_weights)):
                raise ValueError(f"matryoshka_weights must be finite and >= 0, got {matryoshka_weights}")
        self.matryoshka_dims = matryoshka_dims
        self.matryoshka_weights = matryoshka_weights
        self.options = dict(temperature=temperature, gamma=gamma, similarity=similarity,
                            in_batch_negatives=in_batch_negatives, num_synthetic=num_synthetic, mix_top_k=mix_top_k,
                            mix_alpha=mix_alpha, false_negative_margin=false_negative_margin,
                            detach_focal_weight=detach_focal_weight, gather=gather, backend=backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + (
            f", matryoshka_dims={self.matryoshka_dims}, matryoshka_weights={self.matryoshka_weights}")

    def forward(self, q: torch.Tensor, docs: torch.Tensor, generator: Optional[torch.Generator] = None):
        full = q.shape[-1]
        dims = self.matryoshka_dims or [full]
        weights = self.matryoshka_weights or [1.0] * len(dims)
        if max(dims) > full:
            raise ValueError(f"matryoshka_dims must be <= the embedding size D={full} of q [B, D], got {dims}")
        loss, stats = None, None
        for dim, weight in zip(dims, weights):
            out = focal_infonce_with_stats(q[:, :dim], docs[..., :dim], generator=generator, **self.options)
            loss = out.loss * weight if loss is None else loss + out.loss * weight
            if stats is None:
                stats = self._stats(out)
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
