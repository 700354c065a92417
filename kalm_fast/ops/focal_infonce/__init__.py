"""``focal_infonce``: focal-InfoNCE with online hard-negative mixing; checks, the backend table, the shared steps.

The computation, steps 1-7, is defined by the oracle ``reference.py``: what ``reference.focal_infonce`` computes is
the contract.

Backend contract (every backend registered for "focal_infonce" is called exactly like this)::

    fn(q, docs, synthetic, temperature, similarity, in_batch_negatives, false_negative_margin)
        -> (log_p, pos_sim, hardest_neg_sim)

- ``q [B, D]`` and ``docs [Bd, 1+M, D]`` with ``Bd >= B``, same float dtype; query i's positive is
  ``docs[i, 0]``, ``docs[i, 1:]`` its hard negatives. ``Bd > B`` happens with ``gather=True``: the ops put
  this rank's docs first, the other ranks' docs after them (extra in-batch negatives only).
- ``synthetic [B, S, D]`` float32 (already-drawn mixed negatives, no gradient) or None.
- ``temperature`` float > 0, ``similarity`` "cos" | "dot", ``in_batch_negatives`` bool,
  ``false_negative_margin`` float or None.
- Returns float32 ``[B]`` tensors: ``log_p`` (step 5, differentiable w.r.t. ``q`` and ``docs``),
  ``pos_sim = s(q_i, docs[i, 0])`` and ``hardest_neg_sim`` = the largest similarity among the kept
  candidates other than the positive (-inf if none); the last two carry no gradient.

Backends: ``reference`` (``reference.py``: the whole similarity matrix), ``torch`` (``_torch.py``), ``triton``
(``_triton.py``) and ``cuda`` (``_cuda.py``); the last three share the autograd core of ``logp.py`` and never hold
the ``[B, |C|]`` score matrix: they walk tiles of queries x candidates with a log-sum-exp, and recompute the tiles in
backward. The focal weight, the reduction, the mixing draws (``mixing.py``) and the gathering across ranks
(``gather.py``) are done here, once, for every backend.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from ... import _registry
from ..._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..._native import cuda_unavailable
from .gather import gather_local_first
from .mixing import synthetic_negatives

OP = "focal_infonce"
_TINY = torch.finfo(torch.float32).tiny
_registry.register(OP, [
    _registry.Backend("reference", f"{__name__}.reference:log_p_rows", ("cpu", "cuda"), FLOAT_DTYPES),
    _registry.Backend("torch", f"{__name__}._torch:focal_infonce_torch", ("cpu", "cuda"), FLOAT_DTYPES),
    _registry.Backend("triton", f"{__name__}._triton:focal_infonce_triton", _registry.TRITON_DEVICES, FLOAT_DTYPES,
                      available=_registry.triton_unavailable, hint=_registry.TRITON_HINT),
    # not verified on hardware yet: `auto` does not pick it
    _registry.Backend("cuda", f"{__name__}._cuda:focal_infonce_cuda", ("cuda",), (torch.float16, torch.bfloat16),
                      available=cuda_unavailable),
], auto={"cuda": ("triton", "torch"), "cpu": ("torch",)})


class FocalInfoNCEOutput(NamedTuple):
    """``loss`` (reduced, float32) and per-query float32 ``[B]`` rows for logging."""

    loss: torch.Tensor
    log_p: torch.Tensor
    pos_sim: torch.Tensor
    hardest_neg_sim: torch.Tensor


def _check_number(name, value, *, low=None, low_inclusive=False, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite {'int' if integer else 'number'}, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}")


def check_options(*, temperature, gamma, similarity, num_synthetic, mix_top_k, mix_alpha, false_negative_margin,
                  mix_mode="pair", reduction="mean", backend="auto"):
    """Raises ValueError/TypeError naming the first bad scalar option of ``focal_infonce``."""
    _check_number("temperature", temperature, low=0)
    _check_number("gamma", gamma, low=0, low_inclusive=True)
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be 'cos' or 'dot', got {similarity!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_number("num_synthetic", num_synthetic, low=0, low_inclusive=True, integer=True)
    if mix_top_k is not None:
        _check_number("mix_top_k", mix_top_k, low=1, low_inclusive=True, integer=True)
    _check_number("mix_alpha", mix_alpha, low=0)
    if mix_mode not in ("pair", "list"):
        raise ValueError(f"mix_mode must be 'pair' or 'list', got {mix_mode!r}")
    if false_negative_margin is not None:
        _check_number("false_negative_margin", false_negative_margin)
    if backend not in _registry.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {_registry.BACKEND_NAMES}, got {backend!r}")


def check_inputs(q, docs, generator=None):
    """``q [B, D]`` and ``docs [B, 1+M, D]`` of one float dtype and device, ``generator`` a torch.Generator or None
    (else a ValueError / TypeError naming the argument)."""
    check_tensor("q", q, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("docs", docs, ndim=3, dtypes=FLOAT_DTYPES)
    if docs.dtype != q.dtype:
        raise TypeError(f"docs must have the dtype of q ({q.dtype}), got {docs.dtype}")
    if q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q must be [B, D] with B, D >= 1, got shape {tuple(q.shape)}")
    if docs.shape[0] != q.shape[0] or docs.shape[2] != q.shape[1] or docs.shape[1] < 1:
        raise ValueError(f"docs must be [B, 1+M, D] = [{q.shape[0]}, 1+M, {q.shape[1]}] for q of shape "
                         f"{tuple(q.shape)}, got {tuple(docs.shape)}")
    check_same_device(q=q, docs=docs)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def focal_weighted(log_p: torch.Tensor, gamma: float, detach_focal_weight: bool, reduction: str) -> torch.Tensor:
    """Steps 6-7: ``loss_i = -(1 - p_i) ** gamma * log p_i``, reduced; float32."""
    one_minus_p = -torch.expm1(log_p)
    # clamp: at p == 1 the weight's derivative is 0 * inf, whose limit (0) the clamp gives
    weight = one_minus_p.clamp_min(_TINY) ** gamma
    if detach_focal_weight:
        weight = weight.detach()
    loss = -weight * log_p
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def focal_infonce_with_stats(q: torch.Tensor, docs: torch.Tensor, *, temperature: float = 0.01, gamma: float = 0.5,
                             similarity: str = "cos", in_batch_negatives: bool = True, num_synthetic: int = 0,
                             mix_top_k: Optional[int] = None, mix_alpha: float = 2.0, mix_mode: str = "pair",
                             generator: Optional[torch.Generator] = None,
                             false_negative_margin: Optional[float] = None, detach_focal_weight: bool = False,
                             gather: bool = False, reduction: str = "mean",
                             backend: str = "auto") -> FocalInfoNCEOutput:
    """``focal_infonce`` plus the per-query rows ``log_p``, ``pos_sim``, ``hardest_neg_sim`` (float32 ``[B]``)."""
    check_options(temperature=temperature, gamma=gamma, similarity=similarity, num_synthetic=num_synthetic,
                  mix_top_k=mix_top_k, mix_alpha=mix_alpha, false_negative_margin=false_negative_margin,
                  mix_mode=mix_mode, reduction=reduction, backend=backend)
    check_inputs(q, docs, generator)
    _, fn = _registry.select(OP, backend, q.device, q.dtype)
    # scores are divided by a small temperature: never let an enclosing autocast run them in 16 bits
    with torch.autocast(q.device.type, enabled=False):
        synthetic = synthetic_negatives(q, docs, num_synthetic=num_synthetic, mix_top_k=mix_top_k,
                                        mix_alpha=mix_alpha, mix_mode=mix_mode, similarity=similarity,
                                        generator=generator)
        if gather and in_batch_negatives:
            docs = gather_local_first(docs)
        margin = None if false_negative_margin is None else float(false_negative_margin)
        log_p, pos_sim, neg_sim = fn(q, docs, synthetic, float(temperature), similarity,
                                            bool(in_batch_negatives), margin)
        loss = focal_weighted(log_p, gamma, detach_focal_weight, reduction)
    return FocalInfoNCEOutput(loss, log_p, pos_sim, neg_sim)


def focal_infonce(q: torch.Tensor, docs: torch.Tensor, *, temperature: float = 0.01, gamma: float = 0.5,
                  similarity: str = "cos", in_batch_negatives: bool = True, num_synthetic: int = 0,
                  mix_top_k: Optional[int] = None, mix_alpha: float = 2.0, mix_mode: str = "pair",
                  generator: Optional[torch.Generator] = None, false_negative_margin: Optional[float] = None,
                  detach_focal_weight: bool = False, gather: bool = False, reduction: str = "mean",
                  backend: str = "auto") -> torch.Tensor:
    """Focal-InfoNCE of ``q [B, D]`` against ``docs [B, 1+M, D]`` (positive first, then M hard negatives).

    ``loss_i = -(1 - p_i) ** gamma * log p_i`` where ``p_i`` is the softmax probability (at ``temperature``) of
    the positive among the candidates (``reference.py``, steps 1-5). Returns a float32 scalar (``reduction``
    "mean" / "sum") or ``[B]`` ("none"). With ``gather=True`` every rank's docs join the candidates and "mean" is
    over this rank's queries, so that DDP's gradient averaging gives exactly the gradient of the global-batch loss
    when every rank holds the same number of queries (the trainer's global batches split evenly; else weight by the
    local counts).
    """
    return focal_infonce_with_stats(
        q, docs, temperature=temperature, gamma=gamma, similarity=similarity, in_batch_negatives=in_batch_negatives,
        num_synthetic=num_synthetic, mix_top_k=mix_top_k, mix_alpha=mix_alpha, mix_mode=mix_mode, generator=generator,
        false_negative_margin=false_negative_margin, detach_focal_weight=detach_focal_weight, gather=gather,
        reduction=reduction, backend=backend).loss
