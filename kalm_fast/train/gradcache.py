"""One contrastive step, plain or with GradCache (Gao et al., 2021).

GradCache decouples the contrastive batch size from activation memory: embed every text in mini-batches
without keeping the graph, compute the loss and its gradient w.r.t. the embeddings on the full batch, then
re-run each mini-batch with the graph and back-propagate the cached embedding gradient through it. The
random state (dropout) of each mini-batch is replayed, so the gradients equal those of the plain step.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch


class _RandomState:
    """The CPU and (where used) CUDA random states at one point, to replay a forward's dropout masks."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def contrastive_step(model, tokenize: Callable, queries: Sequence[str], docs: Sequence[Sequence[str]], loss_fn, *,
                     chunk_size: Optional[int] = None, generator: Optional[torch.Generator] = None,
                     autocast: Callable = contextlib.nullcontext, no_sync: Optional[Callable] = None,
                     device: torch.device = torch.device("cpu")):
    """Forward + backward of one batch; returns ``(loss (detached), stats)``. Gradients accumulate in ``model``.

    ``queries``: B texts; ``docs``: B lists of ``1 + M`` texts (positive first). ``model(tokenize(texts))``
    gives ``[n, D]`` embeddings. ``chunk_size``: texts per GradCache mini-batch (None or >= all texts: one
    plain forward/backward). ``no_sync``: the DDP/FSDP context that skips the gradient all-reduce, used for
    every mini-batch but the last. ``loss_fn(q [B, D], docs [B, 1+M, D], generator=...)`` -> ``(loss, stats)``.
    """
    B = len(queries)
    group = len(docs[0])
    if any(len(d) != group for d in docs):
        raise ValueError(f"docs must hold the same number (1 + M) of texts per query, got {[len(d) for d in docs]}")
    texts = list(queries) + [t for d in docs for t in d]

    def split(emb):
        return emb[:B], emb[B:].reshape(B, group, emb.shape[-1])

    if chunk_size is None or chunk_size >= len(texts):
        with autocast():
            emb = model(tokenize(texts)).float()
        loss, stats = loss_fn(*split(emb), generator=generator)
        loss.backward()
        return loss.detach(), stats

    batches = [tokenize(texts[i:i + chunk_size]) for i in range(0, len(texts), chunk_size)]
    states, cached = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(_RandomState(device))
            with autocast():
                cached.append(model(batch).float())
    emb = torch.cat(cached).requires_grad_()
    loss, stats = loss_fn(*split(emb), generator=generator)
    loss.backward()
    grads = emb.grad.split([c.shape[0] for c in cached])
    for i, (batch, state, grad) in enumerate(zip(batches, states, grads)):
        sync = contextlib.nullcontext() if no_sync is None or i == len(batches) - 1 else no_sync()
        with sync, state.replay():
            with autocast():
                out = model(batch).float()
            out.backward(grad)
    return loss.detach(), stats
