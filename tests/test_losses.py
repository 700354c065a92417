"""FocalInfoNCELoss: options pass through, Matryoshka truncation + weights, statistics for logging."""
import pytest
import torch
import torch.nn.functional as F

from kalm_fast.ops.focal_infonce import reference as ref
from kalm_fast.train.losses import FocalInfoNCELoss, teacher_distillation


def _inputs(b=6, m=3, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=gen)
    docs = 0.5 * q[:, None] + torch.randn(b, 1 + m, d, generator=gen)
    return q.requires_grad_(), docs.requires_grad_()


def test_single_dim_equals_the_op_with_the_same_options():
    q, docs = _inputs()
    options = dict(temperature=0.05, gamma=2.0, false_negative_margin=0.2, num_synthetic=2, mix_top_k=2)
    loss, _ = FocalInfoNCELoss(**options)(q, docs, generator=torch.Generator().manual_seed(3))
    want = ref.focal_infonce(q, docs, generator=torch.Generator().manual_seed(3), **options)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert q.grad is not None and docs.grad is not None and torch.isfinite(docs.grad).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_matryoshka_weighted_sum_of_renormalized_truncations(backend):
    q, docs = _inputs()
    module = FocalInfoNCELoss(temperature=0.05, matryoshka_dims=[16, 8, 4], matryoshka_weights=[1.0, 0.3, 0.1],
                              backend=backend)
    loss, _ = module(q, docs)
    want = sum(w * ref.focal_infonce(F.normalize(q[:, :d], dim=-1), F.normalize(docs[..., :d], dim=-1),
                                     temperature=0.05)
               for d, w in ((16, 1.0), (8, 0.3), (4, 0.1)))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    got_grad = torch.autograd.grad(loss, q)[0]
    want_grad = torch.autograd.grad(want, q)[0]
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_matryoshka_weights_apply_to_the_first_dim_too(backend):
    """Every dimension's loss is scaled by its weight, the first one's included (the test above weights it 1)."""
    q, docs = _inputs()
    module = FocalInfoNCELoss(temperature=0.05, matryoshka_dims=[8, 16], matryoshka_weights=[0.25, 2.0],
                              backend=backend)
    loss, _ = module(q, docs)
    want = sum(w * ref.focal_infonce(q[:, :d], docs[..., :d], temperature=0.05) for d, w in ((8, 0.25), (16, 2.0)))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    only_first, _ = FocalInfoNCELoss(temperature=0.05, matryoshka_dims=[8], matryoshka_weights=[0.25],
                                     backend=backend)(q, docs)
    torch.testing.assert_close(only_first, 0.25 * ref.focal_infonce(q[:, :8], docs[..., :8], temperature=0.05),
                               atol=1e-6, rtol=1e-5)


def test_stats_match_hand_computed_values():
    q, docs = _inputs(b=5, m=2, d=8)
    loss, stats = FocalInfoNCELoss(temperature=0.1, gamma=0.5)(q, docs)
    assert set(stats) == {"mean_p", "mean_weight", "pos_sim", "hardest_neg_sim"}
    assert all(isinstance(v, float) for v in stats.values())
    qn, dn = F.normalize(q.detach(), dim=-1), F.normalize(docs.detach(), dim=-1).reshape(-1, 8)
    sims = qn @ dn.T
    pos = torch.arange(5) * 3
    p = torch.softmax(sims / 0.1, dim=1)[torch.arange(5), pos]
    negs = sims.clone()
    negs[torch.arange(5), pos] = float("-inf")
    assert stats["mean_p"] == pytest.approx(p.mean().item(), rel=1e-5)
    assert stats["mean_weight"] == pytest.approx(((1 - p) ** 0.5).mean().item(), rel=1e-5)
    assert stats["pos_sim"] == pytest.approx(sims[torch.arange(5), pos].mean().item(), rel=1e-5)
    assert stats["hardest_neg_sim"] == pytest.approx(negs.max(dim=1).values.mean().item(), rel=1e-5)


def test_stats_without_negatives():
    q, docs = _inputs(b=3, m=0, d=8)
    loss, stats = FocalInfoNCELoss(in_batch_negatives=False)(q, docs)
    assert loss.item() == 0.0 and stats["mean_p"] == 1.0
    assert stats["hardest_neg_sim"] != stats["hardest_neg_sim"]  # NaN: no query has a negative


def test_stats_come_from_the_first_matryoshka_dim():
    """The statistics are those of the first Matryoshka dimension (4 of 16 features here), from the oracle's rows."""
    q, docs = _inputs(b=5, m=2, d=16)
    _, stats = FocalInfoNCELoss(temperature=0.1, matryoshka_dims=[4, 16])(q, docs)
    log_p, pos_sim, neg_sim = ref.log_p_rows(q.detach()[:, :4], docs.detach()[..., :4], None, 0.1, "cos", True, None)
    assert stats["mean_p"] == pytest.approx(log_p.exp().mean().item(), rel=1e-5)
    assert stats["mean_weight"] == pytest.approx(((1 - log_p.exp()) ** 0.5).mean().item(), rel=1e-5)
    assert stats["pos_sim"] == pytest.approx(pos_sim.mean().item(), rel=1e-5)
    assert stats["hardest_neg_sim"] == pytest.approx(neg_sim.mean().item(), rel=1e-5)


def test_generator_makes_mixing_reproducible():
    q, docs = _inputs()
    module = FocalInfoNCELoss(num_synthetic=3)
    a, _ = module(q, docs, generator=torch.Generator().manual_seed(0))
    b, _ = module(q, docs, generator=torch.Generator().manual_seed(0))
    c, _ = module(q, docs, generator=torch.Generator().manual_seed(1))
    assert a.item() == b.item() and a.item() != c.item()


@pytest.mark.parametrize("kwargs, match", [
    (dict(matryoshka_dims=[]), "matryoshka_dims must be a non-empty list"),
    (dict(matryoshka_dims=[8, 0]), "matryoshka_dims must be a non-empty list"),
    (dict(matryoshka_dims=[8, 6.7]), "matryoshka_dims must be a non-empty list of ints"),
    (dict(matryoshka_weights=[1.0]), "one weight per matryoshka_dims"),
    (dict(matryoshka_dims=[8, 4], matryoshka_weights=[1.0]), "one weight per matryoshka_dims"),
    (dict(matryoshka_dims=[8, 4], matryoshka_weights=[1.0, -0.1]), "finite and >= 0"),
    (dict(matryoshka_dims=[8, 4], matryoshka_weights=[1.0, float("nan")]), "finite and >= 0"),
    (dict(matryoshka_dims=[8, 4], matryoshka_weights=[float("inf"), 1.0]), "finite and >= 0"),
    (dict(matryoshka_dims=[8, 4], matryoshka_weights=[0.0, 0.0]), "finite and >= 0, not all 0"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FocalInfoNCELoss(**kwargs)


def test_dims_larger_than_the_embedding():
    q, docs = _inputs(d=8)
    with pytest.raises(ValueError, match="matryoshka_dims must be <= the embedding size D=8"):
        FocalInfoNCELoss(matryoshka_dims=[16, 8])(q, docs)


def test_bad_tensors_are_reported_by_the_op():
    q, docs = _inputs()
    with pytest.raises(ValueError, match=r"docs must be \[B, 1\+M, D\]"):
        FocalInfoNCELoss()(q, docs[:3])
    # docs wider than q: checked before the Matryoshka slices, which would cut them to q's width
    with pytest.raises(ValueError, match=r"docs must be \[B, 1\+M, D\] = \[4, 1\+M, 8\]"):
        FocalInfoNCELoss()(torch.randn(4, 8), torch.randn(4, 2, 16))
    with pytest.raises(ValueError, match=r"docs must be \[B, 1\+M, D\]"):
        FocalInfoNCELoss(matryoshka_dims=[4])(torch.randn(4, 8), torch.randn(4, 2, 6))
    with pytest.raises(ValueError, match=r"q must have 2 dimensions, got shape \(8,\)"):
        FocalInfoNCELoss()(torch.randn(8), torch.randn(4, 2, 8))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(similarity="l2"), ValueError, "similarity must be"),
    (dict(num_synthetic=-2), ValueError, "num_synthetic must be >= 0"),
    (dict(mix_mode="mixup"), ValueError, "mix_mode must be 'pair' or 'list'"),
    (dict(gamma="0.5"), TypeError, "gamma must be a finite number"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
])
def test_bad_op_options_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FocalInfoNCELoss(**kwargs)


# ---------------------------------------------------------------- teacher-score distillation


def _kl_by_hand(q, docs, teacher, temperature, teacher_temperature, similarity):
    """KL(softmax(teacher / tt) || softmax(sim / t)) per query, mean over queries, in float64."""
    q, docs, teacher = q.double(), docs.double(), teacher.double()
    if similarity == "cos":
        q, docs = F.normalize(q, dim=-1), F.normalize(docs, dim=-1)
    sim = (docs @ q[:, :, None])[..., 0]
    p_teacher = torch.softmax(teacher / teacher_temperature, dim=-1)
    p_student = torch.softmax(sim / temperature, dim=-1)
    return (p_teacher * (p_teacher.log() - p_student.log())).sum(-1).mean()


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("teacher_temperature", [None, 1.0])
def test_teacher_distillation_is_the_kl_of_teacher_and_student_softmaxes(similarity, teacher_temperature):
    q, docs = _inputs(b=5, m=4, d=12, seed=1)
    teacher = torch.randn(5, 5, generator=torch.Generator().manual_seed(2)) * 0.2
    kl = teacher_distillation(q, docs, teacher, temperature=0.5, teacher_temperature=teacher_temperature,
                              similarity=similarity)
    q64, docs64 = q.detach().double().requires_grad_(), docs.detach().double().requires_grad_()
    want = _kl_by_hand(q64, docs64, teacher, 0.5, teacher_temperature or 0.5, similarity)
    assert kl.dtype == torch.float32 and kl.shape == ()
    torch.testing.assert_close(kl.double(), want, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(kl, (q, docs))
    want_grads = torch.autograd.grad(want, (q64, docs64))
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-4)
    assert want.item() > 1e-3 and grads[1].abs().sum() > 0  # the case is not trivially zero


def test_teacher_distillation_is_zero_when_the_student_agrees_and_ignores_a_shift_of_the_scores():
    q, docs = (t.detach() for t in _inputs(b=4, m=3, d=8))
    sim = F.cosine_similarity(q[:, None], docs, dim=-1)
    assert float(teacher_distillation(q, docs, sim, temperature=0.1)) == pytest.approx(0, abs=1e-6)
    teacher = torch.randn(4, 4)
    shifted = teacher + torch.arange(4.0)[:, None] * 5  # a constant per query: the same distribution
    torch.testing.assert_close(teacher_distillation(q, docs, teacher, temperature=0.1, teacher_temperature=2.0),
                               teacher_distillation(q, docs, shifted, temperature=0.1, teacher_temperature=2.0))
    # a sharper teacher makes another target: the temperatures are used
    assert float(teacher_distillation(q, docs, teacher, temperature=0.1, teacher_temperature=0.5)) != pytest.approx(
        float(teacher_distillation(q, docs, teacher, temperature=0.1, teacher_temperature=2.0)))


@pytest.mark.parametrize("weight", [0.7, 1.0])
def test_distill_weight_mixes_the_two_losses_at_every_matryoshka_dim(weight):
    q, docs = _inputs(b=6, m=3, d=16)
    teacher = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    options = dict(temperature=0.05, gamma=0.5, matryoshka_dims=[16, 8], matryoshka_weights=[1.0, 0.3])
    module = FocalInfoNCELoss(**options, distill_weight=weight, distill_temperature=0.1, teacher_temperature=0.5)
    loss, stats = module(q, docs, teacher_scores=teacher)
    want = 0
    for dim, w in ((16, 1.0), (8, 0.3)):
        focal = ref.focal_infonce(q[:, :dim], docs[..., :dim], temperature=0.05, gamma=0.5)
        kl = teacher_distillation(q[:, :dim], docs[..., :dim], teacher, temperature=0.1, teacher_temperature=0.5)
        want = want + w * ((1 - weight) * focal + weight * kl)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert stats["distill_kl"] == pytest.approx(teacher_distillation(q, docs, teacher, temperature=0.1,
                                                                     teacher_temperature=0.5).item(), rel=1e-5)
    assert ("mean_p" in stats) == (weight < 1)
    loss.backward()
    assert torch.isfinite(q.grad).all() and docs.grad.abs().sum() > 0


def test_distillation_arguments_are_checked():
    q, docs = _inputs(b=3, m=2, d=8)
    with pytest.raises(ValueError, match=r"teacher_scores \[B, 1\+M\] must be given exactly when distill_weight > 0 "
                                         r"\(it is 0.5\); it was not given"):
        FocalInfoNCELoss(distill_weight=0.5)(q, docs)
    with pytest.raises(ValueError, match=r"it is 0.0\); it was given"):
        FocalInfoNCELoss()(q, docs, teacher_scores=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"teacher_scores must be \[B, 1\+M\] = \[3, 3\] .*, got \[3, 2\]"):
        FocalInfoNCELoss(distill_weight=0.5)(q, docs, teacher_scores=torch.zeros(3, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(distill_weight=1.5), r"distill_weight must be in \[0, 1\], got 1.5"),
    (dict(distill_weight=-0.1), r"distill_weight must be in \[0, 1\]"),
    (dict(distill_weight=float("nan")), "distill_weight must be a finite number"),
    (dict(distill_weight=True), "distill_weight must be a finite number"),
    (dict(distill_temperature=0), "distill_temperature must be > 0"),
    (dict(teacher_temperature=-1.0), r"teacher_temperature must be > 0 \(or None"),
    (dict(teacher_temperature="1"), "teacher_temperature must be a finite number"),
])
def test_bad_distillation_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FocalInfoNCELoss(**kwargs)
