"""focal_infonce: reference against hand-computed cases and F.cross_entropy, every backend against reference."""
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params, tolerance

from kalm_fast import _registry
from kalm_fast.ops import focal_infonce
from kalm_fast.ops.focal_infonce import focal_infonce_with_stats, focal_weighted, logp, mixing
from kalm_fast.ops.focal_infonce import reference as ref
from kalm_fast.ops.focal_infonce._torch import TorchEngine
from kalm_fast.ops.focal_infonce.mixing import synthetic_negatives
from kalm_fast.ops.focal_infonce.reference import list_mixing_draws, mixing_draws

OP = "focal_infonce"
BACKENDS = backend_params(OP, ("torch", "triton"))
DEFAULT_CHUNKING = (logp.MIN_CHUNK_BYTES, logp.CHUNK_ALIGN)  # before the fixture below shrinks them


def _backend_fn(name):
    return _registry.backends(OP)[name].load()


@pytest.fixture(autouse=True)
def small_torch_tiles(monkeypatch):
    """Tiny tiles and backward chunks so that the small shapes below cross several query and candidate tiles, and
    the backward's candidate chunks (in steps of 16 columns, the interpreter's tile); mixing in chunks of 3 queries."""
    monkeypatch.setattr(mixing, "_CHUNK", 3)
    monkeypatch.setattr(logp, "TILE_Q", 4)
    monkeypatch.setattr(logp, "TILE_C", 7)
    monkeypatch.setattr(logp, "MIN_CHUNK_BYTES", 0)
    monkeypatch.setattr(logp, "CHUNK_ALIGN", 16)


def _inputs(b, m, d, dtype=torch.float32, seed=0, norm=1.0, dot_temperature=None):
    """``q [b, d]``, ``docs [b, 1+m, d]`` whose positives get moderate probabilities at temperature 0.05 (most p
    between 0.05 and 0.8): no loss or gradient is close to zero, so that a backend which drops a term cannot pass.

    The queries share a topic, and every third one (i = 2, 5, ...) paraphrases the one before it: the other queries'
    documents are in-batch negatives that matter. Each document of query i is a noisy copy of q_i, the positive
    leaning a little more towards it, the hard negatives nearly as close. Queries i = 1, 4, 7, ... have a false
    negative, a hard negative ``docs[i, 1]`` closer to q_i than the positive (by 0.14 in cosine on average, from
    0.05 at small widths): a ``false_negative_margin`` up to 0.1 drops some (``_margin_drops`` counts them). Rows of
    norm about ``norm`` (cosine's gradients scale with ``1 / norm``); for dot similarity at ``dot_temperature``,
    norms for which ``s / temperature`` is about what cosine similarity gives at 0.05.
    """
    gen = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(d, generator=gen) + torch.randn(b, d, generator=gen)
    q[2::3] = q[1::3][:len(q[2::3])] + 0.5 * torch.randn(q[2::3].shape, generator=gen)
    docs = q[:, None] + 1.5 * torch.randn(b, 1 + m, d, generator=gen)
    docs[:, 0] += 0.3 * q
    if m:
        docs[1::3, 1] = 1.3 * q[1::3] + 0.45 * torch.randn(q[1::3].shape, generator=gen)
    if dot_temperature is not None:
        norm = 0.5 * (dot_temperature / 0.05) ** 0.5
    scale = norm / (2 * d ** 0.5)
    return (scale * q).to(DEVICE, dtype), (scale * docs).to(DEVICE, dtype)


def _case_inputs(b, m, d, options, dtype=torch.float32):
    """``_inputs`` for a case's options (dot similarity: norms for its temperature)."""
    dot = options.get("similarity") == "dot"
    return _inputs(b, m, d, dtype, dot_temperature=options.get("temperature", 0.01) if dot else None)


def _single_candidate(b, m, options):
    """Whether every query's only candidate is its positive: log p = 0, a loss and gradients of exactly zero."""
    return m == 0 and (b == 1 or not options.get("in_batch_negatives", True))


def _margin_drops(q, docs, options, seed):
    """How many candidates the reference drops with ``options``' false-negative margin: those other than the
    positive with ``s(q_i, c) > s(q_i, positive) + margin``, from the scores (synthetic negatives drawn from
    ``seed``)."""
    margin = options.get("false_negative_margin")
    if margin is None:
        return 0
    cos = options.get("similarity", "cos") == "cos"
    sim = (lambda x: F.normalize(x.float(), dim=-1)) if cos else (lambda x: x.float())
    qs, ds = sim(q), sim(docs)
    rows = torch.arange(q.shape[0], device=q.device)
    if options.get("in_batch_negatives", True):
        s, pos = qs @ ds.reshape(-1, ds.shape[-1]).T, rows * docs.shape[1]
    else:
        s, pos = torch.einsum("bd,bgd->bg", qs, ds), torch.zeros_like(rows)
    syn = synthetic_negatives(q, docs, num_synthetic=options.get("num_synthetic", 0),
                              mix_top_k=options.get("mix_top_k"), mix_alpha=options.get("mix_alpha", 2.0),
                              mix_mode=options.get("mix_mode", "pair"),
                              similarity="cos" if cos else "dot", generator=torch.Generator().manual_seed(seed))
    if syn is not None:
        s = torch.cat([s, torch.einsum("bd,bsd->bs", qs, sim(syn))], dim=1)
    drop = s > ref.margin_bound(s[rows, pos]).unsqueeze(1) + margin
    drop[rows, pos] = False
    return int(drop.sum())


def _loss_and_grads(fn, q, docs, **kw):
    q = q.detach().clone().requires_grad_()
    docs = docs.detach().clone().requires_grad_()
    loss = fn(q, docs, **kw)
    loss.sum().backward()
    return loss.detach().float(), q.grad.float(), docs.grad.float()


def _assert_close(got, want, tol, zero=False):
    """``got`` matches ``want`` (loss, dq, ddocs) within ``tol``. The expected values must reach 20 x atol (so that
    zeros, or a gradient that misses a term, cannot pass as within the tolerance), or be exactly zero with ``zero``
    (one candidate per query, see ``_single_candidate``)."""
    for g, w, name in zip(got, want, ("loss", "dq", "ddocs")):
        if zero:
            assert not w.any(), f"{name}: expected zeros"
        else:
            assert w.abs().max() > 20 * tol[0], f"{name}: expected values up to {w.abs().max():.3g}, atol {tol[0]}"
        torch.testing.assert_close(g, w, atol=tol[0], rtol=tol[1], msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- reference


def test_reference_hand_computed_cos():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    docs = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]])  # cosine makes the scale irrelevant
    p = math.exp(2) / (math.exp(2) + 1)  # z = s / 0.5 = [[2, 0], [0, 2]]
    want = -((1 - p) ** 0.5) * math.log(p)
    got = ref.focal_infonce(q, docs, temperature=0.5, gamma=0.5, reduction="none")
    torch.testing.assert_close(got, torch.tensor([want, want]))


def test_reference_hand_computed_dot_margin_and_own_candidates():
    q = torch.tensor([[1.0, 0.0]])
    docs = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]])  # s = 0.6 (positive), 1.0, 0.0
    z = [0.6, 1.0, 0.0]
    log_p = z[0] - math.log(sum(math.exp(v) for v in z))
    got = ref.focal_infonce(q, docs, temperature=1.0, gamma=2.0, similarity="dot", in_batch_negatives=False)
    torch.testing.assert_close(got, torch.tensor(-((1 - math.exp(log_p)) ** 2) * log_p))
    # margin 0.1 drops the negative at 1.0 > 0.6 + 0.1 but keeps the one at 0.0
    log_p = z[0] - math.log(math.exp(z[0]) + math.exp(z[2]))
    got = ref.focal_infonce(q, docs, temperature=1.0, gamma=0.0, similarity="dot", in_batch_negatives=False,
                            false_negative_margin=0.1)
    torch.testing.assert_close(got, torch.tensor(-log_p))


@pytest.mark.parametrize("in_batch", [True, False])
def test_reference_gamma0_is_cross_entropy(in_batch):
    q, docs = _inputs(5, 3, 8)
    qn, dn = F.normalize(q, dim=-1), F.normalize(docs, dim=-1)
    if in_batch:
        logits = qn @ dn.reshape(-1, 8).T / 0.05
        target = torch.arange(5) * 4
    else:
        logits = torch.einsum("bd,bgd->bg", qn, dn) / 0.05
        target = torch.zeros(5, dtype=torch.long)
    want = F.cross_entropy(logits, target)
    got = ref.focal_infonce(q, docs, temperature=0.05, gamma=0.0, in_batch_negatives=in_batch)
    torch.testing.assert_close(got, want)


def test_reference_gradients_match_cross_entropy():
    q, docs = _inputs(4, 2, 6)
    got = _loss_and_grads(lambda a, b: ref.focal_infonce(a, b, temperature=0.1, gamma=0.0), q, docs)
    want = _loss_and_grads(lambda a, b: F.cross_entropy(
        F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).reshape(-1, 6).T / 0.1, torch.arange(4) * 3), q, docs)
    _assert_close(got, want, (1e-5, 1e-5))


def test_focal_weight_detach_changes_only_the_gradient():
    q, docs = _inputs(4, 2, 6)
    a = _loss_and_grads(lambda x, y: ref.focal_infonce(x, y, temperature=0.2, gamma=2.0), q, docs)
    b = _loss_and_grads(lambda x, y: ref.focal_infonce(x, y, temperature=0.2, gamma=2.0, detach_focal_weight=True),
                        q, docs)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


# ---------------------------------------------------------------------------------------------- backends

CASES = [  # b, m, d, options
    (1, 0, 16, dict()),
    (1, 7, 33, dict(gamma=2.0)),
    (5, 3, 40, dict(gamma=0.0)),
    (17, 2, 24, dict(similarity="dot", temperature=1.0)),
    (7, 7, 20, dict(in_batch_negatives=False)),
    (6, 0, 16, dict(in_batch_negatives=False)),
    (5, 3, 40, dict(detach_focal_weight=True, gamma=2.0)),
    (9, 3, 24, dict(false_negative_margin=0.05)),
    (9, 3, 24, dict(false_negative_margin=0.0, in_batch_negatives=False, similarity="dot", temperature=2.0)),
    (7, 4, 24, dict(num_synthetic=3, mix_alpha=0.5)),
    (7, 4, 24, dict(num_synthetic=2, mix_top_k=2, false_negative_margin=0.1, in_batch_negatives=False)),
    (5, 3, 16, dict(num_synthetic=2, similarity="dot", temperature=1.0, reduction="sum", gamma=2.0)),
    (7, 4, 24, dict(num_synthetic=3, mix_mode="list", mix_alpha=0.5)),
    (6, 5, 16, dict(num_synthetic=2, mix_mode="list", mix_top_k=3, similarity="dot", temperature=1.0,
                    in_batch_negatives=False, false_negative_margin=0.1)),
    (5, 3, 16, dict(reduction="none")),
]


def _case_id(case):
    return f"B{case[0]}M{case[1]}D{case[2]}-" + "-".join(f"{k}={v}" for k, v in case[3].items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backend_matches_reference_fp32(backend, case):
    b, m, d, options = case
    options = dict(dict(temperature=0.05), **options)
    q, docs = _case_inputs(b, m, d, options)
    if "false_negative_margin" in options:  # the margin must drop candidates for the comparison to check it
        assert _margin_drops(q, docs, options, seed=7) > 0
    want = _loss_and_grads(ref.focal_infonce, q, docs, generator=torch.Generator().manual_seed(7), **options)
    got = _loss_and_grads(focal_infonce, q, docs, generator=torch.Generator().manual_seed(7), backend=backend,
                          **options)
    _assert_close(got, want, tolerance(OP, backend, torch.float32), zero=_single_candidate(b, m, options))


@pytest.mark.parametrize("backend", backend_params(OP, ("torch", "triton", "cuda"), torch.float16))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(17, 2, 40, dict()), (5, 3, 24, dict(false_negative_margin=0.05, num_synthetic=2)),
                                  (6, 3, 24, dict(in_batch_negatives=False, gamma=2.0))])
def test_backend_matches_reference_half(backend, dtype, case):
    b, m, d, options = case
    q, docs = _inputs(b, m, d, dtype, norm=0.5)  # expected values 25-175 x bf16's atol (2e-2)
    if "false_negative_margin" in options:
        assert _margin_drops(q, docs, options, seed=1) > 0
    want = _loss_and_grads(ref.focal_infonce, q, docs, temperature=0.05, generator=torch.Generator().manual_seed(1),
                           **options)
    got = _loss_and_grads(focal_infonce, q, docs, temperature=0.05, generator=torch.Generator().manual_seed(1),
                          backend=backend, **options)
    _assert_close(got, want, tolerance(OP, backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_batch, margin", [(True, None), (True, 0.05), (False, 0.05)])
def test_backend_contract_with_more_docs_than_queries(backend, in_batch, margin):
    """gather=True hands backends docs [Bd > B, ...]: query i's positive is docs[i, 0], the rest are negatives."""
    q, docs = _inputs(18, 2, 24)
    q, syn = q[:5], synthetic_negatives(q[:5], docs[:5], num_synthetic=2, generator=torch.Generator().manual_seed(0))
    args = (syn, 0.05, "cos", in_batch, margin)
    if margin is not None:
        options = dict(false_negative_margin=margin, in_batch_negatives=in_batch, num_synthetic=2)
        assert _margin_drops(q, docs if in_batch else docs[:5], options, seed=0) > 0

    def run(fn):
        qq, dd = q.clone().requires_grad_(), docs.clone().requires_grad_()
        log_p, pos, neg = fn(qq, dd, *args)
        log_p.sum().backward()
        return log_p.detach(), pos, neg, qq.grad, dd.grad

    want = run(_backend_fn("reference"))
    got = run(_backend_fn(backend))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # log p and the gradients far above the tolerance: of the queries, their documents and, in-batch, the other
    # ranks' documents (which are no candidates otherwise: no gradient)
    log_p, _, _, dq, ddocs = want
    assert all(x.abs().max() > 20 * 1e-4 for x in [log_p, dq, ddocs[:5]] + ([ddocs[5:]] if in_batch else []))
    assert in_batch or not ddocs[5:].any()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("in_batch", [True, False])
def test_a_dropped_candidate_far_above_the_positive_gives_finite_gradients(backend, in_batch):
    """A candidate the margin drops may score far above the positive: its exp(z - lse) overflows, and masking the
    product afterwards (inf * 0) gave NaN gradients to the torch and triton backends' own and synthetic candidates.
    Here a hard negative is 10x the query (dot similarity) and another is the positive's twin."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEVICE)
    docs = torch.tensor([[[1.0, 0.0], [10.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 10.0], [1.0, 0.0]]], device=DEVICE)
    kw = dict(similarity="dot", false_negative_margin=0.0, in_batch_negatives=in_batch, temperature=0.05)
    want = _loss_and_grads(ref.focal_infonce, q, docs, **kw)
    got = _loss_and_grads(focal_infonce, q, docs, backend=backend, **kw)
    assert all(torch.isfinite(g).all() for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_a_copy_of_the_positive_is_kept_at_margin_zero_on_every_backend(backend, seed):
    """Query 1's positive is a copy of query 0's, so for query 0 it is an in-batch candidate at exactly s_pos: kept
    by the contract (dropped only when s > s_pos + m). The backends score the pair twice (a dot for the positive, a
    tile for the candidate) and differ in the last bits; the rounding slack keeps it on every backend, as the
    reference does: log p_0 is log 1/2 plus the rest."""
    g = torch.Generator().manual_seed(seed)
    q, docs = torch.randn(2, 24, generator=g), torch.randn(2, 1, 24, generator=g)
    docs[1, 0] = docs[0, 0]
    q, docs = q.to(DEVICE), docs.to(DEVICE)
    kw = dict(false_negative_margin=0.0, temperature=0.05)
    want = ref.log_p_rows(q, docs, None, 0.05, "cos", True, 0.0)[0]
    got = focal_infonce_with_stats(q, docs, backend=backend, **kw).log_p
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    assert got[0] <= math.log(0.5) + 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_p_is_never_above_zero(backend):
    """Positives that are copies of their queries take all the probability: log p = s_pos / t - lse, two roundings
    of about 100 apart by up to 5e-5, is at most 0 (p <= 1), so that a plain InfoNCE loss (gamma 0) is never
    negative."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 96, generator=g).to(DEVICE)
    for in_batch in (True, False):
        out = focal_infonce_with_stats(q, torch.stack([q, -q], dim=1), gamma=0.0, temperature=0.01,
                                       in_batch_negatives=in_batch, backend=backend, reduction="none")
        assert (out.log_p <= 0).all() and (out.loss >= 0).all()
        assert out.log_p.min() > -1e-4


# every candidate of some Triton column splits is dropped: their log-sum-exp is log2(0) = -inf, as it should be
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("in_batch", [True, False])
def test_negative_margin_never_drops_the_positive(backend, in_batch):
    """A margin below zero keeps only the negatives at least |m| under the positive; the positive itself always stays
    (reference.py, step 4), however its score rounds: at m = -3 every negative goes (cosine scores differ by at most
    2), log p = 0 and no negative is left; at m = -0.02 some stay, and loss and gradients match the reference."""
    q, docs = _inputs(9, 3, 24)
    kw = dict(temperature=0.05, in_batch_negatives=in_batch, num_synthetic=2)
    out = focal_infonce_with_stats(q, docs, false_negative_margin=-3.0, backend=backend,
                                   generator=torch.Generator().manual_seed(7), **kw)
    torch.testing.assert_close(out.log_p, torch.zeros_like(out.log_p), atol=1e-5, rtol=0)
    assert (out.hardest_neg_sim == float("-inf")).all() and abs(out.loss.item()) < 1e-6
    options = dict(kw, false_negative_margin=-0.02)
    assert _margin_drops(q, docs, options, seed=7) > 0
    want = _loss_and_grads(ref.focal_infonce, q, docs, generator=torch.Generator().manual_seed(7), **options)
    got = _loss_and_grads(focal_infonce, q, docs, generator=torch.Generator().manual_seed(7), backend=backend,
                          **options)
    _assert_close(got, want, tolerance(OP, backend, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    q, docs = _inputs(5, 3, 48)
    want = _loss_and_grads(lambda a, b: ref.focal_infonce(a[:, ::2], b[..., :24], temperature=0.05), q, docs)
    got = _loss_and_grads(lambda a, b: focal_infonce(a[:, ::2], b[..., :24], temperature=0.05, backend=backend),
                          q, docs)
    _assert_close(got, want, tolerance(OP, backend, torch.float32))


@pytest.mark.parametrize("n,dim", [(1, 8), (200, 896), (65536, 896), (262144, 896), (4_000_000, 896), (5000, 4)])
def test_candidate_chunks_bound_the_float32_document_gradients(n, dim, monkeypatch):
    monkeypatch.setattr(logp, "MIN_CHUNK_BYTES", DEFAULT_CHUNKING[0])
    monkeypatch.setattr(logp, "CHUNK_ALIGN", DEFAULT_CHUNKING[1])
    rows = logp.candidate_chunk(n, dim)
    assert rows % logp.CHUNK_ALIGN == 0
    # about 1/16 of the candidates, unless that is under MIN_CHUNK_BYTES: then as much, or all of them
    assert rows - logp.CHUNK_ALIGN < max(n / logp.CANDIDATE_CHUNKS, logp.MIN_CHUNK_BYTES / (4 * dim))
    assert rows >= n / logp.CANDIDATE_CHUNKS and (rows >= n or rows * 4 * dim >= logp.MIN_CHUNK_BYTES)


class _ChunkRecorder(TorchEngine):
    calls = []

    @classmethod
    def backward(cls, q, flat, rq, rd, s_pos, lse, gc, inv_tau, margin, group, dq, dd, c0=0):
        cls.calls.append((c0, c0 + dd.shape[0], dd.dtype, bool(dd.eq(0).all()), dd.data_ptr()))
        super().backward(q, flat, rq, rd, s_pos, lse, gc, inv_tau, margin, group, dq, dd, c0)


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_accumulates_the_documents_chunk_by_chunk(in_batch, dtype):
    """In-batch, LogP hands the engine zeroed float32 accumulators of consecutive candidate chunks (never one of all
    the documents): float32 documents' own gradient, chunk by chunk; for fp16 one reused float32 chunk. The
    gradients match the reference; without in-batch negatives no engine runs."""
    q, docs = _inputs(9, 4, 24, dtype)  # 45 candidates: chunks of 16
    _ChunkRecorder.calls = []

    def loss(a, b, **kw):
        log_p = logp.LogP.apply(a, b, None, 0.05, True, in_batch, None, _ChunkRecorder)[0]
        return focal_weighted(log_p, 0.5, False, "mean")

    got = _loss_and_grads(loss, q, docs)
    want = _loss_and_grads(ref.focal_infonce, q, docs, temperature=0.05, in_batch_negatives=in_batch)
    _assert_close(got, want, tolerance(OP, "torch", dtype))
    calls = _ChunkRecorder.calls
    assert [c[:2] for c in calls] == ([(0, 16), (16, 32), (32, 45)] if in_batch else [])
    assert all(acc_dtype == torch.float32 and zeroed for _, _, acc_dtype, zeroed, _ in calls)
    row_bytes = 4 * q.shape[1]
    offsets = [ptr - calls[0][-1] for *_, ptr in calls]
    assert offsets == ([c0 * row_bytes for c0, *_ in calls] if dtype == torch.float32 else [0] * len(calls))


@pytest.mark.parametrize("backend", backend_params(OP, ("triton", "cuda"), torch.float16))
@pytest.mark.parametrize("scale", [1.0, 1e-9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_engines_accumulate_at_any_gradient_scale(backend, scale, dtype):
    """dL/dlog p can be tiny (loss weights, gradient accumulation, huge batches); the fp16 tile products must
    not underflow (bf16 ones cannot): the kernels' float32 accumulators match the float32 torch engine's."""
    from importlib import import_module

    engine = {"triton": "TritonEngine", "cuda": "CudaEngine"}[backend]
    engine = getattr(import_module(f"kalm_fast.ops.focal_infonce._{backend}"), engine)
    q, docs = _inputs(17, 2, 40, dtype, norm=6.0)
    flat = (docs * 30).reshape(-1, 40)  # unnormalized candidates: inverse norms ~ 0.005
    rq, _ = logp.inverse_norms(q, True)
    rd, _ = logp.inverse_norms(flat, True)
    s_pos = (q.float() * flat[::3].float()).sum(-1) * rq * rd[::3]
    lse, _ = TorchEngine.forward(q, flat, rq, rd, s_pos, 20.0, None, 3)
    gc = scale * torch.randn(17, generator=torch.Generator().manual_seed(0)).to(q.device)
    out = []
    for engine in (TorchEngine, engine):
        dq, dd = torch.zeros(q.shape, device=q.device), torch.zeros(flat.shape, device=q.device)
        engine.backward(q, flat, rq, rd, s_pos, lse, gc, 20.0, None, 3, dq, dd)
        out.append((dq / dq.abs().max(), dd / dd.abs().max()))
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _raw(address: int, shape: tuple, row_stride: int, dtype: torch.dtype) -> torch.Tensor:
    """The CPU memory at ``address`` as a ``[rows, cols]`` (or ``[n]``) tensor sharing it."""
    import ctypes

    count = (shape[0] - 1) * row_stride + (shape[1] if len(shape) == 2 else 1) if shape[0] else 0
    flat = torch.frombuffer((ctypes.c_byte * (count * dtype.itemsize)).from_address(address), dtype=dtype)
    return flat.as_strided(shape, (row_stride, 1) if len(shape) == 2 else (1,))


class _EmulatedInfoNCEKernels:
    """``infonce_bwd`` of csrc/focal_infonce.cu computed by torch on CPU memory from its ``InfoNCEArgs``: what the
    kernel reads, rounds to the tile dtype and adds (a host-side check of CudaEngine's arguments)."""

    @staticmethod
    def infonce_bwd(a):
        dtype = {1: torch.float16, 2: torch.bfloat16}[a.dtype]
        rows = _raw(a.rows, (a.n_rows, a.dim), a.row_stride, dtype).float()
        cols = _raw(a.cols, (a.n_cols, a.dim), a.col_stride, dtype)
        n_queries = a.n_cols if a.transposed else a.n_rows
        s_pos, lse, gc = (_raw(p, (n_queries,), 1, torch.float32) for p in (a.s_pos, a.lse, a.gc))
        r_row, r_col = _raw(a.r_row, (a.n_rows,), 1, torch.float32), _raw(a.r_col, (a.n_cols,), 1, torch.float32)
        inv_r_col_max, out_scale = _raw(a.g_scale, (2,), 1, torch.float32).tolist()
        r, c = torch.arange(a.n_rows)[:, None], torch.arange(a.n_cols)[None, :]
        query, doc = (c, r + a.doc_offset) if a.transposed else (r, c + a.doc_offset)
        v = rows @ cols.float().T * r_row[:, None] * r_col[None, :]
        is_pos = doc == query * a.group
        keep = is_pos | (v <= s_pos[query] + a.margin) if a.has_margin else torch.ones_like(is_pos)
        p = torch.where(keep, torch.exp2(v * a.inv_tau_log2 - lse[query] * math.log2(math.e)), 0.0)
        g = (gc[query] * (is_pos.float() - p) * (r_col * inv_r_col_max).clamp(max=1.0)[None, :]).to(dtype)
        _raw(a.out, (a.n_rows, a.dim), a.out_stride, torch.float32).add_(g.float() @ cols.float() * out_scale)


@pytest.mark.parametrize("zero_row", [False, True])
@pytest.mark.parametrize("margin", [None, 0.05])
@pytest.mark.parametrize("scale", [1.0, 1e-9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_engine_backward_arguments_keep_half_tiles_in_range(monkeypatch, dtype, scale, margin, zero_row):
    """CudaEngine.backward's launch arguments, run through an emulation of the kernel on the CPU: its score
    gradients reach the tiles divided into [-1, 1] (fp16 does not underflow at tiny dL/dlog p or large norms, nor
    beside a zero candidate, whose inverse norm is 1 / NORM_EPS) and come back scaled; the GPU test above checks
    the kernel itself."""
    pytest.importorskip("kalm_fast._C")
    from kalm_fast.ops.focal_infonce import _cuda

    monkeypatch.setattr(_cuda._native, "cuda_lib", lambda: _EmulatedInfoNCEKernels)
    monkeypatch.setattr(_cuda, "sm_count", lambda index: 2)
    monkeypatch.setattr(_cuda, "stream_of", lambda device: 0)
    q, docs = _inputs(17, 2, 40, dtype, norm=6.0)
    q, flat = q.cpu(), (docs.cpu() * 30).reshape(-1, 40)  # unnormalized candidates: inverse norms ~ 0.005
    if zero_row:
        flat[4] = 0.0  # a hard negative (an empty text pools to zeros)
    rq, _ = logp.inverse_norms(q, True)
    rd, _ = logp.inverse_norms(flat, True)
    s_pos = (q.float() * flat[::3].float()).sum(-1) * rq * rd[::3]
    lse, _ = TorchEngine.forward(q, flat, rq, rd, s_pos, 20.0, margin, 3)
    gc = scale * torch.randn(17, generator=torch.Generator().manual_seed(0))
    out = []
    for engine in (TorchEngine, _cuda.CudaEngine):
        dq, dd = torch.zeros(q.shape), torch.zeros(flat.shape)
        engine.backward(q, flat, rq, rd, s_pos, lse, gc, 20.0, margin, 3, dq, dd)
        out.append((dq, dd))
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    for got, want in zip(*out):
        torch.testing.assert_close(got / want.abs().max(), want / want.abs().max(), atol=tol, rtol=tol)


@pytest.mark.parametrize("margin", [None, 0.05])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_engine_backward_chunks_offset_the_documents(monkeypatch, dtype, margin):
    """LogP's backward hands the engine chunks of candidates ``c0 .. c0 + len(dd)`` (16 here): CudaEngine's launch
    arguments, run through the kernel's emulation, must index the chunk's documents (their inverse norms, which one
    is a positive) from c0, not from 0; the whole in-batch backward matches the float32 torch engine's."""
    pytest.importorskip("kalm_fast._C")
    from kalm_fast.ops.focal_infonce import _cuda

    monkeypatch.setattr(_cuda._native, "cuda_lib", lambda: _EmulatedInfoNCEKernels)
    monkeypatch.setattr(_cuda, "sm_count", lambda index: 2)
    monkeypatch.setattr(_cuda, "stream_of", lambda device: 0)
    q, docs = _inputs(17, 2, 40, dtype, norm=6.0)
    gen = torch.Generator().manual_seed(0)
    # candidates of unequal norms (inverse norms 0.004 to 0.04): a chunk scaled by another chunk's norms is wrong
    flat = (docs.cpu().float().reshape(-1, 40) * (3 + 27 * torch.rand(51, 1, generator=gen))).to(dtype)
    q = q.cpu()
    rq, _ = logp.inverse_norms(q, True)
    rd, pd = logp.inverse_norms(flat, True)
    s_pos = logp._positive_scores(q, flat, rq, rd, 3)
    lse, _ = TorchEngine.forward(q, flat, rq, rd, s_pos, 20.0, margin, 3)
    gc = torch.randn(17, generator=gen)
    assert logp.candidate_chunk(51, 40) == 16  # chunks start at c0 = 0, 16, 32, 48
    out = []
    for engine in (TorchEngine, _cuda.CudaEngine):
        dq = torch.zeros(q.shape)
        dd = logp._in_batch_backward(engine, q, flat, rq, rd, pd, s_pos, lse, gc, 20.0, margin, 3, dq)
        out.append((dq, dd.float()))
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    for got, want in zip(*out):
        torch.testing.assert_close(got / want.abs().max(), want / want.abs().max(), atol=tol, rtol=tol)


@pytest.fixture
def gemm_backward(monkeypatch):
    """The Triton engine's ``gemm`` backward, its score-gradient chunks so small that every case crosses several."""
    from kalm_fast.ops.focal_infonce import _triton

    monkeypatch.setenv("KALM_FOCAL_INFONCE_BWD", "gemm")
    monkeypatch.setattr(_triton, "GRAD_CHUNK_BYTES", 64)
    return _triton


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_gemm_backward_matches_reference_fp32(backend, case, gemm_backward):
    test_backend_matches_reference_fp32(backend, case)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",), torch.float16))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_gemm_backward_matches_reference_half(backend, dtype, gemm_backward):
    for case in [(17, 2, 40, dict()), (5, 3, 24, dict(false_negative_margin=0.05, num_synthetic=2))]:
        test_backend_matches_reference_half(backend, dtype, case)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
@pytest.mark.parametrize("in_batch, margin", [(True, None), (True, 0.05)])
def test_triton_gemm_backward_with_more_docs_than_queries(backend, in_batch, margin, gemm_backward):
    test_backend_contract_with_more_docs_than_queries(backend, in_batch, margin)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",), torch.float16))
@pytest.mark.parametrize("scale", [1.0, 1e-9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_gemm_backward_accumulates_at_any_gradient_scale(backend, scale, dtype, gemm_backward):
    test_half_engines_accumulate_at_any_gradient_scale(backend, scale, dtype)


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
def test_triton_gemm_backward_chunks(backend, gemm_backward, monkeypatch):
    """The chunks tile the candidate columns exactly, one tile of columns each at the smallest chunk size (16
    columns in the interpreter, 128 on a GPU), and the gradients still match the reference."""
    calls = []
    monkeypatch.setattr(gemm_backward, "_bwd_grad_tuned", _Recorder(gemm_backward._bwd_grad_tuned, calls))
    q, docs = _inputs(37, 7, 24)  # 296 candidate columns
    want = _loss_and_grads(ref.focal_infonce, q, docs, temperature=0.05)
    got = _loss_and_grads(focal_infonce, q, docs, temperature=0.05, backend=backend)
    tile = gemm_backward.MAX_TILE
    assert [(c["c_lo"], c["c_hi"]) for c in calls] == [(c0, min(c0 + tile, 296)) for c0 in range(0, 296, tile)]
    _assert_close(got, want, tolerance(OP, backend, torch.float32))


class _Recorder:
    """Stands in for a Triton kernel: records each launch's arguments by name, then launches the kernel."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kw):
            names = self.kernel.arg_names
            self.calls.append(dict(zip(names, args)))
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
@pytest.mark.parametrize("kernel", ["fwd", "grad"])
def test_triton_every_config_matches_reference(backend, kernel, gemm_backward, monkeypatch):
    """Autotuning checks only the config that wins on a test's shapes: each config of the forward's and the gemm
    backward's tables, forced one at a time (on a GPU: its arch's, bf16 and fp32, compiled; in the interpreter, which
    ignores warps and stages: every tile shape, on fp32), at a width and batch that no tile divides."""
    import triton

    tuned = {"fwd": gemm_backward._fwd_tuned, "grad": gemm_backward._bwd_grad_tuned}[kernel]
    tables = {width: gemm_backward.GPU_CONFIGS[kernel, width] for width in ("half", "fp32")}
    if DEVICE == "cuda":  # this GPU's configs
        major = torch.cuda.get_device_capability()[0]
        configs = {dtype: gemm_backward.gpu_configs(kernel, width, major)
                   for dtype, width in ((torch.bfloat16, "half"), (torch.float32, "fp32"))}
    else:
        configs = {torch.float32: sorted({(bm, bn, bk, 4, 1) for table in tables.values() for bm, bn, bk, *_ in table})}
    # "sum": bf16's atol (2e-2) needs the gradients of 70 queries' losses, not of their mean
    kw = dict(temperature=0.05, false_negative_margin=0.1, num_synthetic=2, reduction="sum")
    checked = 0
    for dtype, table in configs.items():
        q, docs = _inputs(70, 3, 136, dtype, norm=2.0)
        assert _margin_drops(q, docs, kw, seed=2) > 0
        want = _loss_and_grads(ref.focal_infonce, q, docs, generator=torch.Generator().manual_seed(2), **kw)
        for bm, bn, bk, warps, stages in table:
            config = triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)
            monkeypatch.setattr(tuned, "configs", [config])
            got = _loss_and_grads(focal_infonce, q, docs, generator=torch.Generator().manual_seed(2),
                                  backend=backend, **kw)
            try:
                _assert_close(got, want, tolerance(OP, backend, dtype))
            except AssertionError as e:
                raise AssertionError(f"{kernel} config {config}, {dtype}: {e}") from None
            assert tuned.best_config is config
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",)))
def test_benchmark_times_the_gemm_backward_under_its_setting(backend, monkeypatch):
    """benchmarks.contrastive's ``triton gemm-bwd`` row runs the triton backend with KALM_FOCAL_INFONCE_BWD=gemm."""
    from benchmarks import contrastive as bench
    from kalm_fast.ops.focal_infonce import _triton

    seen = []
    real = _triton.backward_mode
    monkeypatch.setattr(_triton, "backward_mode", lambda: seen.append(real()) or seen[-1])
    monkeypatch.delenv("KALM_FOCAL_INFONCE_BWD", raising=False)
    q, docs = (x.requires_grad_() for x in _inputs(6, 2, 16))
    modes = {}
    for name in ("triton", "triton gemm-bwd"):
        seen.clear()
        bench._step(q, docs, name)
        modes[name] = set(seen)
    assert modes == {"triton": {"fused"}, "triton gemm-bwd": {"gemm"}}
    assert "KALM_FOCAL_INFONCE_BWD" not in os.environ


def test_focal_infonce_bwd_setting_is_checked(monkeypatch):
    from kalm_fast.ops.focal_infonce import _triton

    monkeypatch.setenv("KALM_FOCAL_INFONCE_BWD", "tiles")
    with pytest.raises(ValueError, match="KALM_FOCAL_INFONCE_BWD must be one of"):
        _triton.backward_mode()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_positive_with_probability_one_has_finite_gradients(backend):
    q = torch.eye(4, 8, device=DEVICE)
    docs = torch.eye(8, device=DEVICE)[[0, 4, 1, 5, 2, 6, 3, 7]].reshape(4, 2, 8)  # negatives orthogonal
    loss, dq, ddocs = _loss_and_grads(focal_infonce, q, docs, temperature=0.01, gamma=0.5, backend=backend)
    # log p = -3e-44 in exact arithmetic; the Triton kernels keep scores in base 2 (z * log2(e), then * ln 2), whose
    # rounding is one ulp of z = 100 on a GPU: |log p| <= 1e-5 there, a loss <= 1e-5 ** 1.5
    assert loss.item() == pytest.approx(0.0, abs=1e-30 if backend in ("reference", "torch") else 1e-7)
    assert torch.isfinite(dq).all() and torch.isfinite(ddocs).all()


def test_auto_is_torch_on_cpu():
    q, docs = (x.cpu() for x in _inputs(5, 2, 8))
    assert _registry.select(OP, "auto", q.device, q.dtype)[0] == "torch"
    torch.testing.assert_close(focal_infonce(q, docs), focal_infonce(q, docs, backend="torch"))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_enclosing_autocast_does_not_lower_the_precision(backend):
    q, docs = _inputs(6, 2, 32)
    want = focal_infonce(q, docs, backend=backend)
    with torch.autocast(q.device.type, dtype=torch.bfloat16):
        got = focal_infonce(q, docs, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_reductions_agree():
    q, docs = _inputs(6, 2, 8)
    rows = focal_infonce(q, docs, reduction="none", backend="torch")
    assert rows.shape == (6,) and rows.dtype == torch.float32
    torch.testing.assert_close(focal_infonce(q, docs, reduction="sum", backend="torch"), rows.sum())
    torch.testing.assert_close(focal_infonce(q, docs, backend="torch"), rows.mean())


def test_torch_backend_saves_no_score_matrix():
    """The reference saves [B, |C|] tensors for backward; the torch backend only O(B*D) ones."""
    q, docs = _inputs(64, 1, 8)

    def largest_saved(backend):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        qq = q.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            focal_infonce(qq, docs, num_synthetic=0, backend=backend)
        return max(sizes)

    assert largest_saved("reference") >= 64 * 128
    assert largest_saved("torch") <= docs.numel()


# ---------------------------------------------------------------------------------------------- mixing


def test_mixing_draws_are_reproducible_and_valid():
    a, b, lam = mixing_draws(50, 4, 3, 2.0, torch.Generator().manual_seed(0))
    a2, b2, lam2 = mixing_draws(50, 4, 3, 2.0, torch.Generator().manual_seed(0))
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(lam, lam2)
    assert (a != b).all() and a.min() >= 0 and a.max() < 3 and b.min() >= 0 and b.max() < 3
    assert ((lam > 0) & (lam < 1)).all() and 0.4 < lam.mean() < 0.6  # Beta(2, 2) has mean 0.5
    assert set(b.flatten().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_mixing_weights_have_the_beta_mean_and_variance(alpha):
    """lam ~ Beta(alpha, alpha): mean 1/2 and variance alpha^2 / ((2 alpha)^2 (2 alpha + 1)) (1/8 and 1/20 here),
    each within 6 standard errors of 200k draws (a fixed seed: no flakes); another alpha draws other weights from the
    same generator state (and the same indices, drawn first)."""
    n = 200_000
    a, b, lam = mixing_draws(400, 500, 3, alpha, torch.Generator().manual_seed(0))
    x = lam.double().flatten()
    var = alpha**2 / ((2 * alpha) ** 2 * (2 * alpha + 1))
    dev = (x - x.mean()) ** 2
    assert abs(x.mean() - 0.5) < 6 * (var / n) ** 0.5
    assert abs(x.var() - var) < 6 * dev.std() / n**0.5
    a2, b2, lam2 = mixing_draws(400, 500, 3, 2.5 - alpha, torch.Generator().manual_seed(0))
    assert torch.equal(a, a2) and torch.equal(b, b2) and (lam != lam2).float().mean() > 0.99


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_synthetic_negatives_mix_with_the_drawn_weights(similarity):
    """Orthonormal hard negatives e1 (the harder one for q = e0 + 0.1 e1) and e2: each synthetic negative is
    normalize(lam e1 + (1 - lam) e2) when a = 0 (e1 first), else with e1 and e2 swapped; lam, a from ``mixing_draws``
    with mix_alpha (the same generator state)."""
    q = torch.tensor([1.0, 0.1, 0.0]).repeat(50, 1)
    docs = torch.eye(3).repeat(50, 1, 1)
    for alpha in (0.5, 2.0):
        syn = synthetic_negatives(q, docs, num_synthetic=40, mix_alpha=alpha, similarity=similarity,
                                  generator=torch.Generator().manual_seed(3))
        a, _, lam = mixing_draws(50, 40, 2, alpha, torch.Generator().manual_seed(3))
        assert (syn[..., 0] == 0).all()
        torch.testing.assert_close(syn[..., 1] / (syn[..., 1] + syn[..., 2]), torch.where(a == 0, lam, 1 - lam))


def test_synthetic_negatives_shape_norm_and_not_enough_hard_negatives():
    q, docs = _inputs(5, 4, 8)
    syn = synthetic_negatives(q, docs, num_synthetic=3, generator=torch.Generator().manual_seed(0))
    assert syn.shape == (5, 3, 8) and syn.dtype == torch.float32 and not syn.requires_grad
    torch.testing.assert_close(syn.norm(dim=-1), torch.ones(5, 3, device=syn.device))
    other = synthetic_negatives(q, docs, num_synthetic=3, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(syn, other)
    # K < 2 (one hard negative, or mix_top_k=1): nothing to mix, the loss is the one without mixing
    assert synthetic_negatives(q, docs[:, :2], num_synthetic=3) is None
    assert synthetic_negatives(q, docs, num_synthetic=3, mix_top_k=1) is None
    torch.testing.assert_close(focal_infonce(q, docs[:, :2], num_synthetic=4), focal_infonce(q, docs[:, :2]))


def test_synthetic_negatives_mix_the_top_k():
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    docs = torch.tensor([[[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.8, 0, 0.2, 0], [-1.0, 0, 0, 1.0]]])
    syn = synthetic_negatives(q, docs, num_synthetic=6, mix_top_k=2, generator=torch.Generator().manual_seed(0))
    assert (syn[..., 3].abs() < 1e-7).all()  # the least similar hard negative is never mixed in
    assert (syn[..., 1] > 0).all() and (syn[..., 2] > 0).all()  # both top-2 always contribute


def test_list_mixing_draws_are_dirichlet():
    """Gamma(alpha) draws, each >= the smallest normal float; normalized, Dirichlet(alpha, ..., alpha) over K: mean
    1/K, variance (K - 1) / (K^2 (K alpha + 1)) (within 6 standard errors of 200k rows, a fixed seed), reproducible
    from the generator state."""
    k, alpha = 4, 0.7
    g = list_mixing_draws(500, 400, k, alpha, torch.Generator().manual_seed(0))
    assert g.shape == (500, 400, k) and g.dtype == torch.float32 and (g >= torch.finfo(torch.float32).tiny).all()
    assert torch.equal(g, list_mixing_draws(500, 400, k, alpha, torch.Generator().manual_seed(0)))
    g = g / g.sum(-1, keepdim=True)
    x = g[..., 0].double().flatten()
    var = (k - 1) / (k**2 * (k * alpha + 1))
    assert abs(x.mean() - 1 / k) < 6 * (var / x.numel()) ** 0.5
    assert abs(x.var() - var) < 6 * ((x - x.mean()) ** 2).std() / x.numel() ** 0.5


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_list_mixing_weighs_the_top_k_by_draw_and_similarity(similarity):
    """Orthonormal hard negatives e1..e4, q most similar to e1, then e2, e3, e4 last, mix_top_k 3: each
    synthetic negative is normalize(sum_k w_k e_k) over e1..e3 with w_k = g_k exp(s(q, e_k)) / sum, g from
    ``list_mixing_draws`` (the same generator state); e4 and the positive e0 never take part."""
    q = torch.tensor([1.0, 0.9, 0.5, 0.3, -0.4]).repeat(30, 1)
    docs = torch.eye(5).repeat(30, 1, 1)
    syn = synthetic_negatives(q, docs, num_synthetic=8, mix_top_k=3, mix_mode="list", similarity=similarity,
                              generator=torch.Generator().manual_seed(4))
    g = list_mixing_draws(30, 8, 3, 2.0, torch.Generator().manual_seed(4))
    sims = (F.normalize(q[0], dim=0) if similarity == "cos" else q[0])[1:4]
    w = g * torch.exp(sims)
    assert (syn[..., 0] == 0).all() and (syn[..., 4] == 0).all()
    torch.testing.assert_close(syn[..., 1:4] / syn[..., 1:4].sum(-1, keepdim=True), w / w.sum(-1, keepdim=True))
    torch.testing.assert_close(syn.norm(dim=-1), torch.ones(30, 8))
    # the reference's loop builds the same negatives
    torch.testing.assert_close(ref.synthetic_negatives(q, docs, 8, 3, 2.0, similarity,
                                                       torch.Generator().manual_seed(4), "list"), syn)


def test_list_mixing_with_large_dot_scores_is_finite_and_exact():
    """Dot similarity of long vectors (scores in the thousands): the weights g_k exp(s_k) are formed from scores
    shifted by the largest; float64 computes them unshifted. Tiny alpha (most draws clamped near 0) too."""
    q, docs = _inputs(7, 5, 16, seed=3)
    q, docs = 30 * q / q.norm(dim=-1, keepdim=True), 30 * docs / docs.norm(dim=-1, keepdim=True)
    for alpha in (2.0, 1e-3):
        syn = synthetic_negatives(q, docs, num_synthetic=4, mix_alpha=alpha, mix_mode="list", similarity="dot",
                                  generator=torch.Generator().manual_seed(1))
        g = list_mixing_draws(7, 4, 5, alpha, torch.Generator().manual_seed(1)).double()
        negs = docs[:, 1:].double()
        s = torch.einsum("bmd,bd->bm", negs, q.double())
        order = s.argsort(dim=1, descending=True)
        s, negs = s.gather(1, order), negs[torch.arange(7)[:, None], order]
        assert s.max() > 500  # exp(s) overflows float32, and float64's range ends near exp(709)
        log_w = g.log() + s.unsqueeze(1)  # unshifted: softmax in float64
        want = F.normalize(torch.bmm(torch.softmax(log_w, dim=-1), negs), dim=-1)
        assert syn.isfinite().all()
        torch.testing.assert_close(syn.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mix_mode", ["pair", "list"])
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_mixing_never_lowers_the_loss(backend, mix_mode):
    q, docs = _inputs(6, 4, 16)
    base = focal_infonce(q, docs, temperature=0.05, reduction="none", backend=backend)
    mixed = focal_infonce(q, docs, temperature=0.05, reduction="none", num_synthetic=4, backend=backend,
                          mix_mode=mix_mode, generator=torch.Generator().manual_seed(0))
    assert (mixed >= base - 1e-6).all() and (mixed > base).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_generator_same_loss_on_every_backend(backend):
    q, docs = _inputs(6, 4, 16)
    kw = dict(temperature=0.05, num_synthetic=3, reduction="none")
    want = focal_infonce(q, docs, backend="reference", generator=torch.Generator().manual_seed(5), **kw)
    got = focal_infonce(q, docs, backend=backend, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(docs=torch.randn(3, 2, 8)), ValueError, r"docs must be \[B, 1\+M, D\]"),
    (dict(docs=torch.randn(4, 2, 7)), ValueError, r"docs must be \[B, 1\+M, D\]"),
    (dict(docs=torch.randn(4, 0, 8)), ValueError, r"docs must be \[B, 1\+M, D\]"),  # no positive
    (dict(docs=torch.randn(4, 8)), ValueError, "docs must have 3 dimensions"),
    (dict(q=torch.randn(8)), ValueError, "q must have 2 dimensions"),
    (dict(q=torch.randn(4, 8).double()), TypeError, "q must have dtype"),
    (dict(docs=torch.randn(4, 2, 8).half()), TypeError, "docs must have the dtype of q"),
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(gamma=-0.5), ValueError, "gamma must be >= 0"),
    (dict(similarity="l2"), ValueError, "similarity must be"),
    (dict(reduction="avg"), ValueError, "reduction must be"),
    (dict(num_synthetic=-1), ValueError, "num_synthetic must be >= 0"),
    (dict(num_synthetic=1.5), TypeError, "num_synthetic must be a finite int"),
    (dict(mix_top_k=0), ValueError, "mix_top_k must be >= 1"),
    (dict(mix_top_k=2.5), TypeError, "mix_top_k must be a finite int"),
    (dict(mix_alpha=0.0), ValueError, "mix_alpha must be > 0"),
    (dict(mix_mode="listwise"), ValueError, "mix_mode must be 'pair' or 'list', got 'listwise'"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(false_negative_margin=float("nan")), TypeError, "false_negative_margin must be a finite number"),
    (dict(backend="cudnn"), ValueError, "backend must be one of"),
])
def test_bad_input(kwargs, error, match):
    args = dict(q=torch.randn(4, 8), docs=torch.randn(4, 2, 8))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        focal_infonce(args.pop("q"), args.pop("docs"), **args)


def test_triton_on_cpu_says_why(monkeypatch):
    table = _registry._OPS[OP].backends
    monkeypatch.setitem(table, "triton", dataclasses.replace(table["triton"], devices=("cuda",)))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        focal_infonce(torch.randn(2, 4), torch.randn(2, 2, 4), backend="triton")


# ---------------------------------------------------------------------------------------------- GPU-only cases


@pytest.mark.parametrize("backend", backend_params(OP, ("triton", "cuda"), torch.bfloat16, gpu_only=True))
@pytest.mark.parametrize("B,M,D", [(5, 0, 64), (70, 3, 136), (130, 7, 896)])
@pytest.mark.parametrize("options", [dict(), dict(false_negative_margin=0.1, num_synthetic=2),
                                     dict(similarity="dot", in_batch_negatives=False),
                                     dict(in_batch_negatives=False, false_negative_margin=0.05, num_synthetic=3)],
                         ids=["in-batch", "margin-mixing", "dot-own", "own-margin-mixing"])
def test_half_kernels_at_kalm_widths(backend, B, M, D, options):
    """bf16 kernels (the interpreter's bf16 dots are not trusted) at the KaLM width 896 and odd widths; "sum": bf16's
    atol (2e-2) needs the gradients of B queries' losses, not of their mean."""
    kw = dict(temperature=0.05, reduction="sum", **options)
    if options.get("similarity") == "dot":
        q, docs = _case_inputs(B, M, D, kw, torch.bfloat16)
    else:
        q, docs = _inputs(B, M, D, torch.bfloat16, norm=2.0)
    if "false_negative_margin" in options and M > 0:
        assert _margin_drops(q, docs, kw, seed=2) > 0
    want = _loss_and_grads(ref.focal_infonce, q, docs, generator=torch.Generator().manual_seed(2), **kw)
    got = _loss_and_grads(focal_infonce, q, docs, generator=torch.Generator().manual_seed(2), backend=backend, **kw)
    _assert_close(got, want, tolerance(OP, backend, torch.bfloat16), zero=_single_candidate(B, M, kw))


@pytest.mark.parametrize("backend", backend_params(OP, ("triton",), torch.bfloat16, gpu_only=True))
@pytest.mark.parametrize("B,M,D", [(5, 0, 64), (130, 7, 896)])
@pytest.mark.parametrize("options", [dict(), dict(false_negative_margin=0.1, num_synthetic=2),
                                     dict(similarity="dot", in_batch_negatives=False)],
                         ids=["in-batch", "margin-mixing", "dot-own"])
def test_triton_gemm_backward_at_kalm_widths(backend, B, M, D, options, gemm_backward):
    """The ``gemm`` backward in bf16 on a GPU (cuBLAS with a float32 result), in chunks of 128 candidates."""
    test_half_kernels_at_kalm_widths(backend, B, M, D, options)


def test_benchmark_baseline_is_plain_infonce():
    """benchmarks.contrastive's ``matmul+ce`` baseline (one matmul, cross-entropy) is the loss at gamma 0."""
    from benchmarks import contrastive as bench

    q, docs = bench._inputs(12, torch.float32, "cpu")
    want = ref.focal_infonce(q, docs, temperature=bench.TEMPERATURE, gamma=0.0)
    torch.testing.assert_close(bench._matmul_ce(q, docs), want, atol=1e-4, rtol=1e-5)
