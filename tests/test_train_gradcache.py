"""GradCache gives the gradients of the plain full-batch step (and replays dropout exactly)."""
import contextlib
import functools

import pytest
import torch
from conftest import DEVICE
from train_utils import make_records, make_tiny_model

from kalm_fast.models import EmbeddingModel
from kalm_fast.train.gradcache import contrastive_step
from kalm_fast.train.losses import FocalInfoNCELoss


@pytest.fixture(scope="module")
def batch():
    rows = make_records(5, negatives=3, seed=1)
    return [r["query"] for r in rows], [[r["pos"][0]] + r["neg"][:2] for r in rows]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("m"), dropout=0.0)
    return EmbeddingModel.from_pretrained(path, max_length=32).train()


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(got, ref, tol=1e-4):
    """Per parameter, relative L2 error <= ``tol`` (fp32 sums in another order differ in the last bits; key
    biases have an analytically zero gradient, hence the floor of the norm)."""
    assert ref.keys() == got.keys() and len(ref) > 10
    for name in ref:
        err = float((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-5))
        assert err <= tol, f"{name}: relative error {err:.2e}"


def _step(model, batch, loss_fn, chunk, seed=0):
    queries, docs = batch
    gen = torch.Generator().manual_seed(seed)
    loss, stats = contrastive_step(model, model.tokenize, queries, docs, loss_fn, chunk_size=chunk, generator=gen)
    return loss, stats, _grads(model)


@pytest.mark.parametrize("chunk", [1, 4, 7])
@pytest.mark.parametrize("options", [dict(), dict(num_synthetic=2, gamma=2.0, temperature=0.05),
                                     dict(distill_weight=0.7, distill_temperature=0.05)])
def test_gradcache_equals_full_batch(model, batch, chunk, options):
    loss_fn = FocalInfoNCELoss(**options)
    if options.get("distill_weight"):  # the trainer binds each batch's teacher scores [B, 1+M] so
        teacher = torch.linspace(-1, 1, 15, dtype=torch.float32).reshape(5, 3)
        loss_fn = functools.partial(loss_fn, teacher_scores=teacher)
    ref_loss, ref_stats, ref = _step(model, batch, loss_fn, None)
    loss, stats, got = _step(model, batch, loss_fn, chunk)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert stats["mean_p"] == pytest.approx(ref_stats["mean_p"], abs=1e-5)
    _assert_grads_close(got, ref)
    assert max(float(g.abs().max()) for g in ref.values()) > 1e-3  # the gradients are not trivially zero


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_gradcache_equals_full_batch_for_a_gemma_decoder(tmp_path, batch, kind):
    """Training runs Gemma 3 and Gemma 2 through transformers' own modules (local and global layers; Gemma 3's q/k
    norms, Gemma 2's soft-capped logits) with kalm_fast's attention: GradCache equals the full-batch step there too,
    and the step moves every layer."""
    from conftest import BPE_TOKENIZER
    from transformers import AutoModel, AutoTokenizer, Gemma2Config, Gemma3TextConfig

    torch.manual_seed(0)
    shape = dict(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=128,
                 sliding_window=8, pad_token_id=0, layer_types=["sliding_attention", "full_attention"])
    config = Gemma3TextConfig(**shape) if kind == "gemma3" else Gemma2Config(**shape, attn_logit_softcapping=2.0)
    AutoModel.from_config(config).save_pretrained(str(tmp_path))
    AutoTokenizer.from_pretrained(str(BPE_TOKENIZER)).save_pretrained(str(tmp_path))
    model = EmbeddingModel.from_pretrained(tmp_path, max_length=32).train()
    loss_fn = FocalInfoNCELoss(temperature=0.05, num_synthetic=2, mix_mode="list")
    ref_loss, _, ref = _step(model, batch, loss_fn, None)
    loss, _, got = _step(model, batch, loss_fn, 3)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    _assert_grads_close(got, ref)
    assert {n.split("layers.")[1].split(".")[0] for n in ref if "layers." in n} == {"0", "1"}


def test_gradcache_replays_dropout(tmp_path, batch):
    """With dropout on, GradCache equals a step that embeds the same mini-batches with the graph kept."""
    path = make_tiny_model(tmp_path, dropout=0.3)
    model = EmbeddingModel.from_pretrained(path, max_length=32).train()
    loss_fn = FocalInfoNCELoss(temperature=0.05)
    queries, docs = batch
    texts = queries + [t for d in docs for t in d]
    chunk = 4
    torch.manual_seed(123)
    emb = torch.cat([model(model.tokenize(texts[i:i + chunk])) for i in range(0, len(texts), chunk)])
    B = len(queries)
    ref_loss, _ = loss_fn(emb[:B], emb[B:].reshape(B, len(docs[0]), -1))
    ref_loss.backward()
    ref = _grads(model)
    torch.manual_seed(123)
    loss, _, got = _step(model, batch, loss_fn, chunk)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-6, rtol=1e-5)
    _assert_grads_close(got, ref)
    # and dropout really is on: another random state gives another loss
    torch.manual_seed(7)
    other, _, _ = _step(model, batch, loss_fn, chunk)
    assert abs(float(other) - float(loss)) > 1e-6


def test_docs_groups_must_match(model):
    with pytest.raises(ValueError, match="same number"):
        contrastive_step(model, model.tokenize, ["a", "b"], [["x", "y"], ["z"]], FocalInfoNCELoss())


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("fused", ["0", "1"], ids=["modules", "fused_decoder"])
def test_gradcache_step_on_gpu(tmp_path, batch, bpe_tokenizer, monkeypatch, fused):
    """One GradCache step of a Qwen2-family model on the GPU (Triton attention, pooling and loss), with transformers'
    modules as they are and with KALM_FUSED_DECODER=1: equal to the plain full-batch step, and finite under bf16
    autocast."""
    from transformers import Qwen2Config, Qwen2Model

    monkeypatch.setenv("KALM_FUSED_DECODER", fused)
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)).save_pretrained(str(tmp_path))
    bpe_tokenizer.save_pretrained(str(tmp_path))
    model = EmbeddingModel.from_pretrained(tmp_path, device="cuda", max_length=32).train()
    queries, docs = batch
    loss_fn = FocalInfoNCELoss(temperature=0.05, num_synthetic=2)

    def step(chunk, autocast=contextlib.nullcontext):
        gen = torch.Generator("cuda").manual_seed(0)
        loss, _ = contrastive_step(model, model.tokenize, queries, docs, loss_fn, chunk_size=chunk, generator=gen,
                                   autocast=autocast, device=torch.device("cuda"))
        return loss, _grads(model)

    ref_loss, ref = step(None)
    loss, got = step(4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    _assert_grads_close({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in ref.items()}, tol=1e-3)
    loss, got = step(4, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in got.values())


class _Recorder(torch.nn.Module):
    """A linear 'encoder' of fixed per-text features that records, at each forward, whether the autocast context is
    entered and, at each backward into its weight, whether the no_sync context is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)
        self.flags = dict(autocast=False, no_sync=False)
        self.forwards, self.backwards = [], []
        self.linear.weight.register_hook(lambda grad: self.backwards.append(self.flags["no_sync"]))

    def tokenize(self, texts):
        return torch.stack([torch.tensor([len(t), t.count("a"), t.count("e"), 1.0]) for t in texts])

    def forward(self, features):
        self.forwards.append(self.flags["autocast"])
        return self.linear(features)

    def context(self, flag):
        @contextlib.contextmanager
        def enter():
            self.flags[flag] = True
            try:
                yield
            finally:
                self.flags[flag] = False
        return enter


@pytest.mark.parametrize("chunk", [None, 4])
def test_autocast_wraps_every_forward_and_no_sync_every_backward_but_the_last(batch, chunk):
    """The embedding forwards run under ``autocast``, the GradCache replays too (else they would not recompute the
    cached embeddings); every mini-batch's backward but the last runs under ``no_sync``, so DDP all-reduces once,
    after the last one has accumulated its gradient."""
    queries, docs = batch[0][:3], batch[1][:3]  # 3 + 3 * 3 = 12 texts: 3 mini-batches of 4
    model = _Recorder()
    contrastive_step(model, model.tokenize, queries, docs, FocalInfoNCELoss(temperature=0.5), chunk_size=chunk,
                     autocast=model.context("autocast"), no_sync=model.context("no_sync"))
    assert model.forwards == [True] * (1 if chunk is None else 6)
    assert model.backwards == ([False] if chunk is None else [True, True, False])
