"""kalm_fast.models: bidirectional decoders via transformers' registries, packed == padded, safe loading."""
import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRET, skip_unless_transformers_reads_is_causal, skip_unless_transformers_runs

from kalm_fast.models import EmbeddingModel
from kalm_fast.ops.attention.padding import unpad_layout

TEXTS = ["hello", "a somewhat longer sentence with more tokens in it, and a comma", "", "日本語",
         "short one", "x " * 40]


GEMMA3_WINDOW = 12
GEMMA2_SOFTCAP = 2.0
MODERNBERT_LOCAL = 8  # ModernBERT's local layers: |i - j| <= 4, far shorter than the longer TEXTS


def _tiny_config(kind):
    import transformers
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, XLMRobertaConfig

    common = dict(vocab_size=30522, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    if kind == "qwen2":  # its second layer local (|i - j| <= 12 once bidirectional), as Qwen2's use_sliding_window
        return Qwen2Config(**common, num_key_value_heads=2, pad_token_id=0, use_sliding_window=True,
                           sliding_window=GEMMA3_WINDOW, max_window_layers=1)
    if kind == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    if kind == "qwen3":
        return Qwen3Config(**common, num_key_value_heads=1, head_dim=32, pad_token_id=0)
    if kind == "mistral":
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=GEMMA3_WINDOW, pad_token_id=0)
    if kind == "xlm-roberta":
        return XLMRobertaConfig(**{**common, "max_position_embeddings": 130}, pad_token_id=1, type_vocab_size=1)
    if kind in ("roberta", "camembert", "electra", "albert"):
        config = transformers.AutoConfig.for_model(kind, **common, pad_token_id=1 if "bert" in kind else 0)
        if kind != "electra":
            config.max_position_embeddings = 130
        return config
    if kind == "distilbert":
        return transformers.DistilBertConfig(vocab_size=30522, dim=64, hidden_dim=96, n_layers=2, n_heads=4,
                                             max_position_embeddings=128)
    if kind == "gemma":
        return transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=16, pad_token_id=0)
    if kind == "gemma2":  # as gemma3 below, with soft-capped attention logits (a low cap, so that it bites)
        return transformers.Gemma2Config(**common, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                         query_pre_attn_scalar=24, sliding_window=GEMMA3_WINDOW,
                                         attn_logit_softcapping=GEMMA2_SOFTCAP,
                                         layer_types=["sliding_attention", "full_attention"])
    if kind == "embedding_gemma2":  # the multimodal checkpoint (its towers left out): 3 layers, the last global (head
        # dim 512, past the Triton kernels: the torch attention runs it), the others local (|i - j| <= 4)
        text = dict(common, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, global_head_dim=512,
                    num_global_key_value_heads=1, sliding_window=4, hidden_size_per_layer_input=16, embedding_dim=48,
                    pad_token_id=0)
        return transformers.EmbeddingGemma2Config(text_config=text)
    if kind == "gemma3":  # a causal checkpoint, as Gemma 3 LLMs are; one local (sliding) and one global layer, whose
        # window (|i - j| < 12 once bidirectional) is shorter than the longer TEXTS
        return transformers.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                             query_pre_attn_scalar=24, sliding_window=GEMMA3_WINDOW,
                                             layer_types=["sliding_attention", "full_attention"])
    if kind == "modernbert":  # a global layer, then a local one: |i - j| <= 4 (local_attention 8)
        return transformers.ModernBertConfig(**common, local_attention=MODERNBERT_LOCAL, global_attn_every_n_layers=2,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                             sep_token_id=2)
    if kind == "deberta-v2":  # DeBERTa-v3's disentangled relative attention, with buckets shorter than the texts
        return transformers.DebertaV2Config(**{**common, "type_vocab_size": 0}, relative_attention=True,
                                            position_buckets=8, pos_att_type=["p2c", "c2p"],
                                            norm_rel_ebd="layer_norm", position_biased_input=False, pad_token_id=0)
    if kind in ("mpnet", "roformer"):
        return transformers.AutoConfig.for_model(kind, **common)
    # rotary encoders built into transformers 5.x (custom code on the Hub before): GTE as gte-*-v1.5 (no token types);
    # no dropout, so that a training step compares packed and padded batches
    if kind in ("nomic_bert", "gte"):
        return transformers.AutoConfig.for_model(kind, **common, pad_token_id=0, hidden_dropout_prob=0.0,
                                                 type_vocab_size=2 if kind == "nomic_bert" else 0)
    if kind == "jina_embeddings_v3":
        return transformers.AutoConfig.for_model(kind, **common, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "eurobert":  # GQA 4:2
        return transformers.AutoConfig.for_model(kind, **common, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                                 eos_token_id=2, mask_token_id=3)
    if kind in ("t5", "mt5", "umt5", "longt5"):  # the whole encoder-decoder, as T5 checkpoints hold it; kalm_fast
        # loads the encoder. LongT5's transient-global attention, in local blocks (radius 4) shorter than the texts
        extra = dict(encoder_attention_type="transient-global", local_radius=4, global_block_size=4) if (
            kind == "longt5") else {}
        return transformers.AutoConfig.for_model(kind, vocab_size=30522, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                                 num_heads=4, pad_token_id=0, eos_token_id=1, **extra)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    """A byte-level BPE (the fixture of conftest): decoder tokenizers add no special tokens, "" has no token."""
    return bpe_tokenizer


def _save_tiny(kind, directory, tokenizer, seed=0):
    from transformers import AutoModel

    skip_unless_transformers_runs({"gemma3": "gemma3_text"}.get(kind, kind))
    torch.manual_seed(seed)
    model = AutoModel.from_config(_tiny_config(kind))
    for p in model.parameters():  # random init gives near-identical tokens; spread the weights out
        p.data.normal_(0, 0.2)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3", "mistral", "gemma2", "gemma3"])
def decoder_dir(request, tmp_path_factory, tokenizer):
    return _save_tiny(request.param, tmp_path_factory.mktemp(request.param), tokenizer)


def _eager_reference(model_dir, texts, ids, causal=False):
    """The same transformers model in eager mode, one text at a time, with a full (non-causal) float mask; Gemma 3
    as transformers' own bidirectional model (``use_bidirectional_attention``: local layers see |i - j| < window),
    the other families with local layers (Gemma 2, Qwen2, Mistral) as transformers runs them with ``is_causal:
    false`` (their local layers: |i - j| <= window)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_dir))
    extra = {}
    if config.model_type == "gemma3_text" and not causal:
        extra = dict(use_bidirectional_attention=True)
    elif getattr(config, "sliding_window", None) is not None and not causal:
        skip_unless_transformers_reads_is_causal()
        config.is_causal = False
        extra = dict(config=config)
    ref = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", **extra).eval()
    out = []
    with torch.no_grad():
        for x in ids:
            if not x:
                out.append(torch.zeros(ref.config.hidden_size))
                continue
            x = torch.tensor(x)[None]
            mask = None if causal or extra else torch.zeros(1, 1, x.shape[1], x.shape[1])
            h = ref(input_ids=x, attention_mask=mask).last_hidden_state[0]
            out.append(h.mean(0))
    return torch.stack(out)


def test_decoder_is_bidirectional_and_matches_eager_reference(decoder_dir):
    model = EmbeddingModel.from_pretrained(decoder_dir, device="cpu")
    assert model.config._attn_implementation == "kalm_fast" and model.config.is_causal is False
    ids = model.token_ids(TEXTS)
    with torch.no_grad():
        got = model(model.pack(ids))
    want = _eager_reference(decoder_dir, TEXTS, ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    causal = _eager_reference(decoder_dir, TEXTS, ids, causal=True)
    assert (got - causal).abs().max() > 1e-2  # the causal model really is different


def _padded(model, texts):
    ids = model.token_ids(texts)
    L = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), L, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return dict(input_ids=input_ids, attention_mask=mask)


def _assert_packed_equals_padded(model, weight):
    """The same embeddings, and the same gradient of ``weight``, from a packed and a padded batch of the non-empty
    TEXTS (an empty text has no row in a padded batch of a decoder)."""
    texts = [t for t in TEXTS if t]
    outs, grads = [], []
    for batch in (model.tokenize(texts), _padded(model, texts)):
        model.zero_grad()
        emb = model(batch)
        (F.normalize(emb, dim=-1) @ torch.linspace(-1, 1, emb.shape[1])).square().sum().backward()
        outs.append(emb.detach())
        grads.append(weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    assert grads[0].abs().sum() > 0


def test_packed_equals_padded_forward_and_backward(decoder_dir):
    model = EmbeddingModel.from_pretrained(decoder_dir, device="cpu")
    _assert_packed_equals_padded(model, model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("kind", ["qwen2", "roberta", "distilbert", "albert", "gemma3", "modernbert"])
def test_padded_batch_unpads_once_per_forward(tmp_path, tokenizer, monkeypatch, kind):
    """A padded batch through a model made bidirectional (``make_bidirectional``, transformers' own forward): every
    layer reuses one unpadding of the mask (one synchronization per forward, and the Varlen's cached kernel work
    lists; Gemma 3's, ModernBERT's and this Qwen2's global and local layers get a mask object each, so two), and the
    result is the packed batch's."""
    from kalm_fast.models import bidirectional

    model = EmbeddingModel.from_pretrained(_save_tiny(kind, tmp_path, tokenizer), device="cpu")
    texts = [t for t in TEXTS if t]
    batch = _padded(model, texts)
    calls = []
    monkeypatch.setattr(bidirectional, "unpad_layout", lambda mask: calls.append(1) or unpad_layout(mask))
    with torch.no_grad():
        want = model(model.tokenize(texts))
        hidden = [model.model(**batch).last_hidden_state for _ in range(2)]
    assert len(calls) == 2 * (1 + (kind in ("gemma3", "modernbert", "qwen2")))  # one per forward and mask object
    mask = batch["attention_mask"][..., None].float()
    for h in hidden:
        torch.testing.assert_close((h * mask).sum(1) / mask.sum(1), want, atol=2e-5, rtol=2e-5)


def test_decoder_trains_under_bf16_autocast(decoder_dir):
    """Under autocast the rotary embedding leaves q, k in float32 and v in bf16: the attention runs them in bf16
    (what training on a GPU does, with ``autocast: true``), close to the float32 model, gradients included."""
    model = EmbeddingModel.from_pretrained(decoder_dir, device="cpu").train()
    texts = [t for t in TEXTS if t]
    want = model(model.tokenize(texts)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(model.tokenize(texts))
    assert F.cosine_similarity(got.float(), want).min() > 0.99
    got.float().square().sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["xlm-roberta", "roberta", "camembert", "distilbert", "electra", "albert",
                                  "modernbert", "nomic_bert", "gte", "eurobert", "jina_embeddings_v3",
                                  "embedding_gemma2"])
def test_encoder_families_match_transformers(tmp_path, tokenizer, kind):
    """Each supported encoder family, packed, against transformers' own padded forward (RoBERTa-style position ids
    start after the padding index; ModernBERT's and EmbeddingGemma 2's local layers within their window; the rotary
    encoders' positions restart at each packed text)."""
    from transformers import AutoModel

    directory = _save_tiny(kind, tmp_path, tokenizer)
    model = EmbeddingModel.from_pretrained(directory, device="cpu")
    ref = AutoModel.from_pretrained(str(directory), attn_implementation="eager").eval()
    texts = [t for t in TEXTS if t]  # the padded oracle has no mean of an empty row
    with torch.no_grad():
        got = model(model.tokenize(texts))
        batch = _padded(model, texts)
        h = ref(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        want = (h * m).sum(1) / m.sum(1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["xlm-roberta", "roberta"])
def test_roberta_positions_skip_a_pad_token_inside_a_text(tmp_path, tokenizer, kind):
    """RoBERTa numbers positions past the padding id and gives the padding id's own tokens position ``pad``: a text
    that holds the pad token (``"<pad>"`` written in it) matches transformers' forward, which numbers them so."""
    from transformers import AutoModel

    directory = _save_tiny(kind, tmp_path, tokenizer)
    model = EmbeddingModel.from_pretrained(directory, device="cpu")
    ref = AutoModel.from_pretrained(str(directory), attn_implementation="eager").eval()
    pad = model.config.pad_token_id
    texts = [[5, 9, pad, 7, pad, 11], [pad, 8], [6, 12, 13]]
    with torch.no_grad():
        got = model(model.pack(texts))
        want = torch.stack([ref(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0) for ids in texts])
    assert model.pack(texts).position_ids.tolist() == [2, 3, 1, 4, 1, 5, 1, 2, 2, 3, 4]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_gemma_is_bidirectional_and_matches_eager_reference(tmp_path, tokenizer):
    directory = _save_tiny("gemma", tmp_path, tokenizer)
    model = EmbeddingModel.from_pretrained(directory, device="cpu")
    ids = model.token_ids(TEXTS)
    with torch.no_grad():
        got = model(model.pack(ids))
    torch.testing.assert_close(got, _eager_reference(directory, TEXTS, ids), atol=2e-5, rtol=2e-5)


def test_gemma3_matches_transformers_own_bidirectional_gemma3(tmp_path, tokenizer):
    """Gemma 3 keeps its layer types, so its sliding layer keeps the local RoPE base (the global one elsewhere), and
    its local layer attends within the window. The reference is transformers' own bidirectional Gemma 3
    (``use_bidirectional_attention``: |i - j| < 12, the window, shorter than the longer texts), one text at a time; a
    saved model loads as that in transformers."""
    from transformers import AutoModel

    directory = _save_tiny("gemma3", tmp_path / "m", tokenizer)
    model = EmbeddingModel.from_pretrained(directory, device="cpu", max_length=64)
    ids = model.token_ids(TEXTS)
    assert max(len(x) for x in ids) > 2 * GEMMA3_WINDOW
    with torch.no_grad():
        got = model(model.pack(ids))
    for path in (directory, None):
        if path is None:  # saved with use_bidirectional_attention, not is_causal: false (which widens the window)
            model.save_pretrained(tmp_path / "saved")
            path = tmp_path / "saved"
            saved = json.loads((path / "config.json").read_text())
            assert saved["use_bidirectional_attention"] and "is_causal" not in saved
        ref = AutoModel.from_pretrained(str(path), attn_implementation="eager", use_bidirectional_attention=True)
        assert ref.config.sliding_window == GEMMA3_WINDOW
        assert ref.config.layer_types == ["sliding_attention", "full_attention"]
        with torch.no_grad():
            want = [ref.eval()(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) if x else torch.zeros(64)
                    for x in ids]
        torch.testing.assert_close(got, torch.stack(want), atol=2e-5, rtol=2e-5)
    causal = _eager_reference(directory, TEXTS, ids, causal=True)
    assert (got - causal).abs().max() > 1e-2  # the causal model really is different
    model.model.config.sliding_window = 10 ** 6  # the local layers' window dropped: full attention differs
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    with torch.no_grad():
        assert (model(model.pack(ids)) - got).abs().max() > 1e-3


def test_gemma2_caps_its_logits_keeps_its_windows_and_saves_bidirectionally(tmp_path, tokenizer):
    """Gemma 2 (bge-multilingual-gemma2's family) made bidirectional: its logits soft-capped and its local layer
    within |i - j| <= window (transformers' masks for ``is_causal: false``, which the saved config holds), against
    transformers' eager model loaded from the saved directory, one text at a time; without the cap, or with the
    window's edge excluded, the result differs."""
    from transformers import AutoModel

    skip_unless_transformers_reads_is_causal()
    directory = _save_tiny("gemma2", tmp_path / "m", tokenizer)
    model = EmbeddingModel.from_pretrained(directory, device="cpu", max_length=64)
    ids = [x for x in model.token_ids(TEXTS) if x]
    assert max(len(x) for x in ids) > 2 * GEMMA3_WINDOW
    with torch.no_grad():
        got = model(model.pack(ids))
        model.save_pretrained(tmp_path / "saved")
        saved = json.loads((tmp_path / "saved" / "config.json").read_text())
        assert saved["is_causal"] is False and saved["attn_logit_softcapping"] == GEMMA2_SOFTCAP
        assert saved["sliding_window"] == GEMMA3_WINDOW and not any(k.startswith("kalm_") for k in saved)
        ref = AutoModel.from_pretrained(str(tmp_path / "saved"), attn_implementation="eager").eval()
        want = torch.stack([ref(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) for x in ids])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        model.model.config.kalm_window_inclusive = False
        assert (model(model.pack(ids)) - got).abs().max() > 1e-3
        model.model.config.kalm_window_inclusive = True
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (model(model.pack(ids)) - got).abs().max() > 1e-3


def test_embedding_gemma2_text_model_saves_and_keeps_its_windows(tmp_path, tokenizer):
    """EmbeddingGemma 2 from its multimodal checkpoint: kalm_fast runs its text model (the projection to
    embedding_dim included, mean-pooled as its sentence-transformers config does), saves that text model, which
    transformers loads as such and kalm_fast again to the same embeddings; its local layers see |i - j| <= 4 (texts
    longer than that), and with the local layers widened the result differs."""
    from transformers import AutoModel

    directory = _save_tiny("embedding_gemma2", tmp_path / "m", tokenizer)
    model = EmbeddingModel.from_pretrained(directory, device="cpu")
    assert type(model.model).__name__ == "EmbeddingGemma2TextModel" and model.hidden_size == 48
    ids = [x for x in model.token_ids(TEXTS) if x]
    assert max(len(x) for x in ids) > 10
    with torch.no_grad():
        got = model(model.pack(ids))
        model.save_pretrained(tmp_path / "saved")
        saved = json.loads((tmp_path / "saved" / "config.json").read_text())
        assert saved["model_type"] == "embedding_gemma2_text" and not any(k.startswith("kalm_") for k in saved)
        ref = AutoModel.from_pretrained(str(tmp_path / "saved"), attn_implementation="eager").eval()
        want = torch.stack([ref(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) for x in ids])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        again = EmbeddingModel.from_pretrained(tmp_path / "saved", device="cpu")
        torch.testing.assert_close(again(again.pack(ids)), got, atol=0, rtol=0)
        model.model.config.kalm_window_inclusive = True  # |i - j| <= 5: another model
        assert (model(model.pack(ids)) - got).abs().max() > 1e-3


def test_the_multimodal_embedding_gemma2_model_is_refused_for_its_text_model(tmp_path, tokenizer):
    """make_bidirectional on transformers' EmbeddingGemma2Model (text, vision and audio) names the text model to pass
    instead, which then runs."""
    from transformers import AutoModel

    from kalm_fast.models.bidirectional import make_bidirectional

    model = AutoModel.from_pretrained(str(_save_tiny("embedding_gemma2", tmp_path, tokenizer)))
    with pytest.raises(ValueError, match=r"the EmbeddingGemma2Model holds a text model .* pass model.language_model"):
        make_bidirectional(model)
    text = make_bidirectional(model.language_model)
    with torch.no_grad():
        assert torch.isfinite(text(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state).all()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_embedding_gemma2_refuses_backends_without_its_head_dim(tmp_path, tokenizer, backend):
    """Its global layers' head dim 512 is past the Triton and CUDA kernels: asking for either is refused by name
    (``auto`` runs those layers on the torch attention)."""
    with pytest.raises(ValueError, match=rf"attn_backend {backend!r} takes head dims up to 256; the "
                                         r"embedding_gemma2_text model has 512: use 'auto'"):
        EmbeddingModel.from_pretrained(_save_tiny("embedding_gemma2", tmp_path, tokenizer), attn_backend=backend)


def test_gemma2_refuses_the_capless_cuda_attention(tmp_path, tokenizer):
    from transformers import AutoModel

    from kalm_fast.models.bidirectional import make_bidirectional

    model = AutoModel.from_pretrained(str(_save_tiny("gemma2", tmp_path, tokenizer)))
    with pytest.raises(ValueError, match=r"attn_backend 'cuda' has no soft-capping, which the gemma2 model's "
                                         r"attention logits need \(attn_logit_softcapping=2.0\)"):
        make_bidirectional(model, backend="cuda")


def test_gemma3_windows_soft_capping_and_old_transformers(tmp_path, tokenizer, monkeypatch):
    """Texts longer than the local window are not cut (its layers run with it: padded and packed agree, the
    saved max length stays); soft-capped logits (a Gemma 3 config may set them too) match transformers; a
    transformers that halves the saved window is refused."""
    import transformers
    from transformers import AutoModel

    directory = _save_tiny("gemma3", tmp_path / "m", tokenizer)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, sliding_window=4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = EmbeddingModel.from_pretrained(directory, device="cpu", max_length=100)
    assert model.max_length == 100
    texts = ["x " * 40, "y", "a somewhat longer sentence with more tokens in it"]
    with torch.no_grad():
        torch.testing.assert_close(model(_padded(model, texts)), model(model.tokenize(texts)), atol=2e-5, rtol=2e-5)
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved/sentence_bert_config.json").read_text())["max_seq_length"] == 128  # own
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "saved")).sliding_window == 4
    monkeypatch.setattr(transformers, "__version__", "5.15.0")
    with pytest.raises(ValueError, match=r"gemma3_text model needs transformers >= 5.16 \(found 5.15.0"):
        EmbeddingModel.from_pretrained(directory, device="cpu")
    monkeypatch.undo()
    (directory / "config.json").write_text(json.dumps(dict(config, attn_logit_softcapping=1.0)))
    model = EmbeddingModel.from_pretrained(directory, device="cpu", max_length=64)
    ids = [x for x in model.token_ids(texts) if x]
    ref = AutoModel.from_pretrained(str(directory), attn_implementation="eager", use_bidirectional_attention=True)
    with torch.no_grad():
        want = torch.stack([ref.eval()(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) for x in ids])
        torch.testing.assert_close(model(model.pack(ids)), want, atol=2e-5, rtol=2e-5)


def test_gemma3_with_is_causal_false_keeps_transformers_wider_window(tmp_path, tokenizer):
    """A Gemma 3 config that itself says ``is_causal: false`` (as kalm_fast saved them before
    ``use_bidirectional_attention`` alone) runs its local layers at |i - j| <= window in transformers: here too, and
    a save keeps that key."""
    from transformers import AutoModel

    directory = _save_tiny("gemma3", tmp_path / "m", tokenizer)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, sliding_window=4, is_causal=False)))
    model = EmbeddingModel.from_pretrained(directory, device="cpu", max_length=64)
    ids = [x for x in model.token_ids(TEXTS) if x]
    with torch.no_grad():
        got = model(model.pack(ids))
        ref = AutoModel.from_pretrained(str(directory), attn_implementation="eager").eval()
        want = torch.stack([ref(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) for x in ids])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        model.model.config.kalm_window_inclusive = False  # Gemma 3's own |i - j| < window differs
        assert (model(model.pack(ids)) - got).abs().max() > 1e-3
        model.model.config.kalm_window_inclusive = True
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["is_causal"] is False


def test_the_attention_function_bands_every_family_with_local_layers():
    """transformers hands a local layer's window w to the attention function: the band |i - j| < w (Gemma 3), or
    |i - j| <= w where ``make_bidirectional`` recorded so (Mistral, Qwen2, Gemma 2 run bidirectionally), packed or
    not; a window reaching every token is full attention."""
    from types import SimpleNamespace

    from kalm_fast import ops
    from kalm_fast.models.bidirectional import kalm_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 10, 16, generator=g) for h in (4, 2, 2))  # [B, H, L, D]
    qkv = [x.transpose(1, 2) for x in (q, k, v)]
    gemma3 = SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text"))
    out, _ = kalm_attention_forward(gemma3, q, k, v, None, scaling=0.25, sliding_window=3)
    torch.testing.assert_close(out, ops.flash_attention(*qkv, window=(2, 2), softmax_scale=0.25))
    mistral = SimpleNamespace(config=SimpleNamespace(model_type="mistral", kalm_window_inclusive=True))
    out, _ = kalm_attention_forward(mistral, q, k, v, None, scaling=0.25, sliding_window=3)
    want = ops.flash_attention(*qkv, window=(3, 3), softmax_scale=0.25)
    torch.testing.assert_close(out, want)
    packed, _ = kalm_attention_forward(mistral, q, k, v, None, scaling=0.25, sliding_window=3,
                                       kalm_varlen=ops.Varlen.from_lengths([10]))
    torch.testing.assert_close(packed, want)
    full = ops.flash_attention(*qkv, softmax_scale=0.25)
    assert (want - full).abs().max() > 1e-2
    out, _ = kalm_attention_forward(mistral, q, k, v, None, scaling=0.25, sliding_window=9)  # reaches every token
    torch.testing.assert_close(out, full)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_decoder_sliding_windows_are_kept_and_saved(tmp_path, tokenizer, kind):
    """Qwen2 / Qwen3 (``use_sliding_window``, local layers from ``max_window_layers`` on) and Mistral (every layer
    local) keep their sliding windows, shorter than the longer texts: run bidirectionally the local layers see
    |i - j| <= window, as transformers runs the saved model (``is_causal: false``, the window kept), one text at a
    time; without the window's edge the result differs. Texts are not cut at the window."""
    from transformers import AutoModel, Qwen3Config

    skip_unless_transformers_reads_is_causal()
    config = _tiny_config(kind) if kind != "qwen3" else Qwen3Config(
        vocab_size=30522, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, num_key_value_heads=1, head_dim=32, pad_token_id=0, use_sliding_window=True,
        sliding_window=GEMMA3_WINDOW, max_window_layers=1)
    assert config.sliding_window == GEMMA3_WINDOW
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path / "m"))
    tokenizer.save_pretrained(str(tmp_path / "m"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = EmbeddingModel.from_pretrained(tmp_path / "m", device="cpu", max_length=64)
    assert model.max_length == 64
    ids = [x for x in model.token_ids(TEXTS) if x]
    assert max(len(x) for x in ids) > 2 * GEMMA3_WINDOW
    with torch.no_grad():
        got = model(model.pack(ids))
        torch.testing.assert_close(model(_padded(model, [t for t in TEXTS if t])), got, atol=2e-5, rtol=2e-5)
        model.save_pretrained(tmp_path / "saved")
        saved = json.loads((tmp_path / "saved" / "config.json").read_text())
        assert saved["is_causal"] is False and saved["sliding_window"] == GEMMA3_WINDOW
        assert saved.get("layer_types", ["sliding_attention"])[-1] == "sliding_attention"
        ref = AutoModel.from_pretrained(str(tmp_path / "saved"), attn_implementation="eager").eval()
        want = torch.stack([ref(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) for x in ids])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        model.model.config.kalm_window_inclusive = False
        assert (model(model.pack(ids)) - got).abs().max() > 1e-3


def test_cuda_is_refused_only_where_a_window_masks(tmp_path, tokenizer):
    """The CUDA attention has no window: a model whose local layers' window is shorter than max_length is refused
    with it by name; a window at least max_length long never masks anything, so 'cuda' is taken (and then refused
    here for want of a GPU, not for the window)."""
    from transformers import AutoModel

    from kalm_fast.models.bidirectional import make_bidirectional

    model = AutoModel.from_pretrained(str(_save_tiny("mistral", tmp_path, tokenizer)))
    with pytest.raises(ValueError, match=r"attn_backend 'cuda' has no local window, which the mistral model's "
                                         r"sliding layers need for texts longer than it \(sliding_window=12, "
                                         r"max_length=64\): use 'triton' or 'auto', or max_length <= 12"):
        make_bidirectional(model, backend="cuda", max_length=64)
    make_bidirectional(model, backend="cuda", max_length=12)
    assert model.config.kalm_attn_backend == "cuda"


def test_a_sliding_window_in_a_llama_config_is_ignored_as_transformers_does(tmp_path, tokenizer):
    """Llama has no local layers: a ``sliding_window`` written in its config (transformers ignores it) slides nothing
    in kalm_fast's paths either (the packed decoder, transformers' modules) and does not stop 'cuda'."""
    from transformers import AutoModel

    from kalm_fast.models.bidirectional import make_bidirectional

    directory = _save_tiny("llama", tmp_path, tokenizer)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, sliding_window=4)))
    model = EmbeddingModel.from_pretrained(directory, device="cpu")
    ids = model.token_ids(TEXTS)
    with torch.no_grad():
        got = model(model.pack(ids))
        torch.testing.assert_close(model(_padded(model, [t for t in TEXTS if t])), got[[i for i, t in
                                   enumerate(TEXTS) if t]], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, _eager_reference(directory, TEXTS, ids), atol=2e-5, rtol=2e-5)
    make_bidirectional(AutoModel.from_pretrained(str(directory)), backend="cuda", max_length=64)


def _modernbert_as_released(directory, tokenizer):
    """A tiny ModernBERT as its checkpoints were released (transformers 4.48's layout): the masked-LM model's weights
    (``model.`` prefix, and its head), a config with ``local_attention`` / ``global_rope_theta`` and no layer types."""
    from transformers import ModernBertForMaskedLM

    skip_unless_transformers_runs("modernbert")
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(_tiny_config("modernbert"))
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    config = json.loads((directory / "config.json").read_text())
    for key in ("layer_types", "rope_parameters", "dtype", "transformers_version"):
        config.pop(key, None)
    config.update(global_rope_theta=160000.0, local_rope_theta=10000.0, torch_dtype="float32",
                  transformers_version="4.48.0", architectures=["ModernBertForMaskedLM"])
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_modernbert_runs_its_local_layers_within_their_window(tmp_path, tokenizer, monkeypatch):
    """ModernBERT (gte-modernbert, modernbert-embed): a global layer and a local one, whose window (|i - j| <= 4) is
    far shorter than the longer texts, which are not cut. The same embeddings as transformers' own model one text at
    a time, packed == padded forward and backward (training), the same after a save (which transformers loads with
    the same window and layer types); the window really is used; a transformers without ModernBERT in its attention
    registry, and the windowless cuda attention, are refused."""
    import transformers
    from transformers import AutoModel

    from kalm_fast.models.bidirectional import make_bidirectional

    directory = _modernbert_as_released(tmp_path / "m", tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = EmbeddingModel.from_pretrained(directory, device="cpu")
    assert model.max_length == 128 and model.model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = [x for x in model.token_ids(TEXTS) if x]
    assert max(len(x) for x in ids) > 4 * MODERNBERT_LOCAL
    with torch.no_grad():
        got = model(model.pack(ids))
    model.save_pretrained(tmp_path / "saved")
    for path in (directory, tmp_path / "saved"):
        ref = AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()
        assert ref.config.sliding_window == MODERNBERT_LOCAL // 2
        with torch.no_grad():
            want = torch.stack([ref(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) for x in ids])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        torch.testing.assert_close(EmbeddingModel.from_pretrained(tmp_path / "saved", device="cpu")(model.pack(ids)),
                                   got, atol=1e-6, rtol=1e-6)
        model.model.layers[1].attn.sliding_window = None  # the local layer run as full attention differs
        assert (model(model.pack(ids)) - got).abs().max() > 1e-3
        model.model.layers[1].attn.sliding_window = MODERNBERT_LOCAL // 2 + 1

    _assert_packed_equals_padded(model.train(), model.model.layers[1].attn.Wqkv.weight)

    with pytest.raises(ValueError, match="attn_backend 'cuda' has no local window"):
        make_bidirectional(AutoModel.from_pretrained(str(directory)), backend="cuda")
    monkeypatch.setattr(transformers, "__version__", "5.6.2")
    with pytest.raises(ValueError, match=r"modernbert model needs transformers >= 5.7 \(found 5.6.2, whose "):
        EmbeddingModel.from_pretrained(directory, device="cpu")


# The custom-code layouts that NomicBERT and GTE checkpoints were released in (nomic-embed-text, gte-*-v1.5), which
# transformers converts as it loads them: per layer, its native tensor names -> the released ones; q/k/v (and GTE's
# up/gate) are stacked into one tensor there.
_RELEASED_NAMES = {
    "nomic_bert": dict(layers="encoder.layers", stacked={"attn.Wqkv": ("self_attn.q_proj", "self_attn.k_proj",
                                                                        "self_attn.v_proj")},
                       renamed={"self_attn.o_proj": "attn.out_proj", "mlp.up_proj": "mlp.fc11",
                                "mlp.gate_proj": "mlp.fc12", "mlp.down_proj": "mlp.fc2",
                                "post_attention_layernorm": "norm1", "post_mlp_layernorm": "norm2",
                                "embeddings.LayerNorm": "emb_ln"}),
    "gte": dict(layers="encoder.layer", stacked={"attention.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj",
                                                                          "self_attn.v_proj"),
                                                  "mlp.up_gate_proj": ("mlp.up_proj", "mlp.gate_proj")},
                renamed={"self_attn.o_proj": "attention.o_proj", "post_attention_layernorm": "attn_ln",
                         "post_mlp_layernorm": "mlp_ln"}),
}


def _as_released(kind, directory):
    """Rewrite the weights of a transformers-saved ``kind`` model in ``directory`` in their released layout."""
    import re

    from safetensors.torch import load_file, save_file

    names = _RELEASED_NAMES[kind]
    state = load_file(str(directory / "model.safetensors"))
    out = {}
    for key in sorted(state):
        match = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        prefix, name, kind_of = (f"{names['layers']}.{match[1]}.", match[2], match[3]) if match else (
            "", key.rsplit(".", 1)[0], key.rsplit(".", 1)[1])
        stacked = [(k, parts) for k, parts in names["stacked"].items() if name in parts]
        if stacked:
            target, parts = stacked[0]
            if name == parts[0]:
                out[f"{prefix}{target}.{kind_of}"] = torch.cat([state[key.replace(name, part)] for part in parts])
            continue
        out[f"{prefix}{names['renamed'].get(name, name)}.{kind_of}"] = state[key]
    (directory / "model.safetensors").unlink()
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return sorted(out)


@pytest.mark.parametrize("kind", ["nomic_bert", "gte"])
def test_rotary_encoders_load_in_their_released_layout(tmp_path, tokenizer, kind):
    """NomicBERT and GTE checkpoints as released (custom-code tensor names, q/k/v stacked), which transformers
    converts as it loads them: the same embeddings as the native layout, packed, and as transformers' own model one
    text at a time; the same after a save by kalm_fast (native layout); a training step's gradients reach them."""
    from transformers import AutoModel

    native = _save_tiny(kind, tmp_path / "native", tokenizer)
    released = tmp_path / "released"
    shutil.copytree(native, released)
    names = _as_released(kind, released)
    layout = _RELEASED_NAMES[kind]
    assert {f"{layout['layers']}.0.{k}.weight" for k in layout["stacked"]} <= set(names)
    assert not any(n.startswith("layers.") or ".self_attn." in n for n in names)
    model = EmbeddingModel.from_pretrained(released, device="cpu")
    ids = [x for x in model.token_ids(TEXTS) if x]
    ref = AutoModel.from_pretrained(str(released), attn_implementation="sdpa").eval()
    with torch.no_grad():
        got = model(model.pack(ids))
        want = torch.stack([ref(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) for x in ids])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        plain = EmbeddingModel.from_pretrained(native, device="cpu")
        torch.testing.assert_close(plain(plain.pack(ids)), got, atol=0, rtol=0)
        model.save_pretrained(tmp_path / "saved")
        again = EmbeddingModel.from_pretrained(tmp_path / "saved", device="cpu")
        torch.testing.assert_close(again(again.pack(ids)), got, atol=0, rtol=0)
    _assert_packed_equals_padded(model.train(), model.model.layers[0].self_attn.q_proj.weight)


def test_gemma3_refuses_the_windowless_cuda_attention(tmp_path, tokenizer):
    from kalm_fast.models.bidirectional import make_bidirectional
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(_save_tiny("gemma3", tmp_path, tokenizer)))
    with pytest.raises(ValueError, match="attn_backend 'cuda' has no local window"):
        make_bidirectional(model, backend="cuda", max_length=64)


def test_albert_gradient_checkpointing_is_refused_by_name(tmp_path, tokenizer):
    """By the model, and by the trainer before it writes anything."""
    from train_utils import make_records

    from kalm_fast.train.config import config_from_dict
    from kalm_fast.train.data import write_jsonl
    from kalm_fast.train.trainer import Trainer

    directory = _save_tiny("albert", tmp_path / "model", tokenizer)
    message = "gradient_checkpointing: transformers' AlbertModel .* does not support it"
    with pytest.raises(ValueError, match=message):
        EmbeddingModel.from_pretrained(directory, device="cpu").gradient_checkpointing_enable()
    write_jsonl(tmp_path / "train.jsonl", make_records(8))
    raw = dict(model=str(directory), output_dir=str(tmp_path / "run"), gradient_checkpointing=True,
               stages=[dict(name="s", data=[str(tmp_path / "train.jsonl")], steps=1, batch_size=2)])
    with pytest.raises(ValueError, match=message):
        Trainer(config_from_dict(raw), show_progress=False).train()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sliding_layers", [0, 2])
def test_a_sliding_window_only_matters_where_a_layer_slides(tmp_path, tokenizer, sliding_layers):
    """Qwen2's window applies to the layers past ``max_window_layers``: with none of them the model is the one
    without a window; with both, texts are not cut at it and training through transformers' modules gives a packed
    batch the padded batch's embeddings and gradients, which differ from full attention's."""
    from transformers import AutoModel, Qwen2Config

    kw = dict(vocab_size=30522, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    config = Qwen2Config(**kw, use_sliding_window=True, sliding_window=16, max_window_layers=2 - sliding_layers)
    assert config.layer_types.count("sliding_attention") == sliding_layers
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(tmp_path / "window"))
    torch.manual_seed(0)
    AutoModel.from_config(Qwen2Config(**kw)).save_pretrained(str(tmp_path / "full"))
    models = {}
    for name in ("window", "full"):
        tokenizer.save_pretrained(str(tmp_path / name))
        models[name] = EmbeddingModel.from_pretrained(tmp_path / name, device="cpu", max_length=64).train()
    assert models["window"].max_length == 64
    texts = ["hello world", "x " * 30, "a somewhat longer sentence with more tokens in it, and a comma"]
    with torch.no_grad():
        got, full = (m(m.tokenize(texts)) for m in (models["window"], models["full"]))
    if sliding_layers:
        _assert_packed_equals_padded(models["window"], models["window"].model.layers[1].self_attn.q_proj.weight)
        assert (got - full).abs().max() > 1e-3
    else:
        torch.testing.assert_close(got, full, atol=0, rtol=0)


def test_multimodal_gemma3_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    """model_type "gemma3" (the vision tower and the language model): a clear error naming what to load instead."""
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="gemma3", text_config=dict(hidden_size=64))))
    monkeypatch.setattr("kalm_fast.models.loading.check_weight_files", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="model_type 'gemma3' is Gemma 3 with its vision tower; .* 'gemma3_text'"):
        EmbeddingModel.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("kind", ["mpnet", "deberta-v2", "roformer", "t5", "mt5", "umt5", "longt5"])
def test_encoders_with_their_own_attention_run_padded_through_it(tmp_path, tokenizer, kind):
    """MPNet (all-mpnet-base-v2), DeBERTa-v2, RoFormer and T5 / mT5 / UMT5 / LongT5 encoders (sentence-t5, GTR) keep
    their own attention (relative position biases, rotary inside it, local blocks): their packed batches run padded
    through their own
    modules. The same embeddings as transformers' forward one text at a time (MPNet's positions after its padding
    index included), packed == padded forward and backward (training); a text longer than MPNet's positions is cut
    at them; another attention backend is refused."""
    import transformers

    directory = _save_tiny(kind, tmp_path, tokenizer)
    model = EmbeddingModel.from_pretrained(directory, device="cpu")
    # MPNet counts positions from pad_token_id + 1 = 2; T5's relative positions have no limit: the tokenizer's
    assert model.max_length == {"mpnet": 126, "t5": 32768, "mt5": 32768, "umt5": 32768, "longt5": 32768}.get(kind, 128)
    encoder_class = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                     "longt5": "LongT5EncoderModel"}.get(kind, "AutoModel")
    ref = getattr(transformers, encoder_class).from_pretrained(str(directory)).eval()
    pad = model.config.pad_token_id
    ids = model.token_ids(TEXTS) + [[5, 9, pad, 7, pad, 11]]  # the pad token inside a text (MPNet: position pad)
    assert [] in ids and max(len(x) for x in ids) > 16

    def loss(embeddings):
        return (F.normalize(embeddings, dim=-1) @ torch.linspace(-1, 1, embeddings.shape[1])).square().sum()

    got = model(model.pack(ids))  # eval mode (these configs have dropout), with autograd: the training forward
    want = torch.stack([ref(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0) if x else torch.zeros(64)
                        for x in ids])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    loss(got).backward()
    loss(want).backward()
    weights = dict(ref.named_parameters())
    for name, p in model.model.named_parameters():
        if ".0." in name and p.dim() == 2:  # the first layer's matrices: the same gradients
            torch.testing.assert_close(p.grad, weights[name].grad, atol=1e-4, rtol=1e-4)
            assert p.grad.abs().sum() > 0
    assert len(model.token_ids(["x " * 300])[0]) == min(model.max_length, 301)
    shapes = []
    forward = model.model.forward
    model.model.forward = lambda input_ids, **kw: shapes.append(tuple(input_ids.shape)) or forward(input_ids, **kw)
    out = model.embed(["x " * 300] + ["y"] * 50 + ["a b c d e f g h"] * 20, max_tokens=64)
    assert torch.isfinite(out).all()  # the last position fits
    assert shapes[0] == (1, len(model.token_ids(["x " * 300])[0]))  # the long text alone, then padding counted
    assert all(b * n <= 64 for b, n in shapes[1:]) and sum(b for b, _ in shapes) == 71
    with pytest.raises(ValueError, match=f"the {kind} model runs its own attention .* attn_backend must be 'auto', "
                                         "got 'triton'"):
        EmbeddingModel.from_pretrained(directory, device="cpu", attn_backend="triton")
    from kalm_fast.models.bidirectional import make_bidirectional

    with pytest.raises(ValueError, match=f"causal attention is for decoder LLMs .*, not '{kind}'"):
        make_bidirectional(ref, causal=True)


def test_an_mpnet_model_trains(tmp_path, tokenizer):
    """Fine-tuning all-mpnet-base-v2-style models (their own attention, padded): a training stage runs and saves a
    model that loads again; gradient checkpointing, which transformers' MPNet lacks, is refused by name."""
    from train_utils import make_records

    from kalm_fast.train.config import config_from_dict
    from kalm_fast.train.data import write_jsonl
    from kalm_fast.train.trainer import Trainer

    directory = _save_tiny("mpnet", tmp_path / "model", tokenizer)
    write_jsonl(tmp_path / "train.jsonl", make_records(8))
    raw = dict(model=str(directory), output_dir=str(tmp_path / "run"),
               stages=[dict(name="s", data=[str(tmp_path / "train.jsonl")], steps=2, batch_size=4, hard_negatives=1)])
    final = Trainer(config_from_dict(raw), show_progress=False).train()
    trained = EmbeddingModel.from_pretrained(final, device="cpu")
    with torch.no_grad():
        before = EmbeddingModel.from_pretrained(directory, device="cpu")
        assert (trained(trained.tokenize(TEXTS[:2])) - before(before.tokenize(TEXTS[:2]))).abs().max() > 1e-4
    raw.update(gradient_checkpointing=True, output_dir=str(tmp_path / "run2"))
    with pytest.raises(ValueError, match="gradient_checkpointing: transformers' MPNetModel .* does not support it"):
        Trainer(config_from_dict(raw), show_progress=False).train()


def test_a_nomic_bert_model_trains_with_gradient_checkpointing(tmp_path, tokenizer):
    """A rotary encoder (NomicBERT) through transformers' modules in training: gradient checkpointing gives the same
    gradients, and a training stage with it runs and saves a model that loads again, changed."""
    from train_utils import make_records

    from kalm_fast.train.config import config_from_dict
    from kalm_fast.train.data import write_jsonl
    from kalm_fast.train.trainer import Trainer

    directory = _save_tiny("nomic_bert", tmp_path / "model", tokenizer)
    grads = []
    for checkpointing in (False, True):
        model = EmbeddingModel.from_pretrained(directory, device="cpu").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(model.tokenize(TEXTS)).square().sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    write_jsonl(tmp_path / "train.jsonl", make_records(8))
    raw = dict(model=str(directory), output_dir=str(tmp_path / "run"), gradient_checkpointing=True,
               stages=[dict(name="s", data=[str(tmp_path / "train.jsonl")], steps=2, batch_size=4, hard_negatives=1)])
    trained = EmbeddingModel.from_pretrained(Trainer(config_from_dict(raw), show_progress=False).train(), device="cpu")
    with torch.no_grad():
        before = EmbeddingModel.from_pretrained(directory, device="cpu")
        assert (trained(trained.tokenize(TEXTS[:2])) - before(before.tokenize(TEXTS[:2]))).abs().max() > 1e-4


def test_unsupported_families_are_refused(tmp_path):
    """Families kalm_fast has not tested are refused before their weights load, naming what is tested."""
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="bart")))
    with pytest.raises(ValueError, match="model_type 'bart' is not supported by kalm_fast \\(tested: bert, .*mpnet"):
        EmbeddingModel.from_pretrained(tmp_path, device="cpu")


def test_layer_tensors_the_config_has_no_place_for_are_refused(tmp_path, tokenizer):
    """Weights of more layers than config.json builds, or biases the built layers lack (what a config under names
    transformers does not read, e.g. nomic's custom-code n_layer / qkv_proj_bias, would leave behind), are a
    ValueError naming a tensor, not silently dropped; heads, buffers older transformers saved and an
    encoder-decoder's decoder (also under a head's prefix, as mT5 for sequence classification saves it) stay
    allowed."""
    from safetensors.torch import load_file, save_file

    directory = _save_tiny("nomic_bert", tmp_path / "m", tokenizer)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1)))
    with pytest.raises(ValueError, match=r"tensor\(s\) of the model's layers .* such as 'layers\.1\."):
        EmbeddingModel.from_pretrained(directory, device="cpu")
    (directory / "config.json").write_text(json.dumps(config))
    state = load_file(str(directory / "model.safetensors"))
    save_file(dict(state, **{"layers.0.self_attn.q_proj.bias": torch.zeros(64)}), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"such as 'layers.0.self_attn.q_proj.bias': the config does not describe"):
        EmbeddingModel.from_pretrained(directory, device="cpu")
    save_file(dict(state, **{"lm_head.dense.weight": torch.zeros(64, 64),  # a head; buffers old versions saved
                             "layers.0.self_attn.rotary_emb.cos_cached": torch.zeros(8, 16),
                             "layers.1.self_attn.rotary_emb.inv_freq": torch.zeros(8)}),
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    EmbeddingModel.from_pretrained(directory, device="cpu")
    from transformers import MT5ForSequenceClassification  # an encoder-decoder under a head's prefix: its decoder

    torch.manual_seed(0)
    MT5ForSequenceClassification(_tiny_config("mt5")).save_pretrained(str(tmp_path / "mt5"))
    tokenizer.save_pretrained(str(tmp_path / "mt5"))
    EmbeddingModel.from_pretrained(tmp_path / "mt5", device="cpu")


def test_a_nomic_config_in_its_released_keys(tmp_path, tokenizer):
    """nomic-embed-text's custom-code config.json names its settings as GPT-2 does (n_head, rotary_emb_base, prenorm,
    ...), which transformers does not read: where they agree with the model transformers builds, it loads; where one
    disagrees and config.json lacks the key transformers reads instead, it is a ValueError naming it (else another
    model would run silently). A config that transformers saved (its own keys beside stale custom-code ones, e.g.
    after pruning layers) loads as transformers reads it."""
    directory = _save_tiny("nomic_bert", tmp_path / "m", tokenizer)
    config = json.loads((directory / "config.json").read_text())
    released = dict(n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=8192, layer_norm_epsilon=1e-12,
                    rotary_emb_base=1000, rotary_emb_fraction=1.0, rotary_emb_interleaved=False, prenorm=False,
                    rotary_scaling_factor=None, activation_function="swiglu", qkv_proj_bias=False)

    def write(changed, without=()):
        data = {k: v for k, v in {**config, **released, **changed}.items() if k not in without}
        (directory / "config.json").write_text(json.dumps(data))

    write({})
    want = EmbeddingModel.from_pretrained(directory, device="cpu")
    for key, value, without in (("n_head", 8, ["num_attention_heads"]), ("n_layer", 3, ["num_hidden_layers"]),
                                ("rotary_emb_base", 10000, ["rope_parameters"]),
                                ("layer_norm_epsilon", 1e-5, ["layer_norm_eps"]),
                                ("prenorm", True, []), ("rotary_emb_fraction", 0.5, [])):
        write({key: value}, without)
        with pytest.raises(ValueError, match=rf"{key} = {value!r}, which transformers' nomic_bert model does not read"):
            EmbeddingModel.from_pretrained(directory, device="cpu")
    write(dict(n_layer=4, n_head=8, rotary_emb_base=10000, layer_norm_epsilon=1e-5))  # stale: its own keys win
    got = EmbeddingModel.from_pretrained(directory, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(got(got.tokenize(TEXTS)), want(want.tokenize(TEXTS)), atol=0, rtol=0)


@pytest.mark.parametrize("kind, oldest", [("eurobert", "5.5"), ("jina_embeddings_v3", "5.4"), ("nomic_bert", "5.5"),
                                         ("gte", "5.18")])
def test_rotary_encoders_name_the_transformers_they_need(tmp_path, monkeypatch, kind, oldest):
    """A transformers older than the one that built the family in is refused by name, whether or not it knows the
    model_type (a real old one does not); GTE's custom-code config (model_type 'new') points to the built-in one."""
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(dict(model_type=kind)))
    older = f"{oldest.split('.')[0]}.{int(oldest.split('.')[1]) - 1}.0"
    monkeypatch.setattr(transformers, "__version__", older)
    for known in (True, False):
        if not known:
            monkeypatch.delitem(transformers.CONFIG_MAPPING._extra_content, kind, raising=False)
            monkeypatch.delitem(transformers.CONFIG_MAPPING._mapping, kind, raising=False)
        with pytest.raises(ValueError, match=rf"a {kind} model needs transformers >= {oldest} \(found {older}, "):
            EmbeddingModel.from_pretrained(tmp_path, device="cpu")
    if kind == "gte":
        (tmp_path / "config.json").write_text(json.dumps(dict(model_type="new")))
        with pytest.raises(ValueError, match=r"not supported\); it is Alibaba-NLP's GTE .* as model_type 'gte'"):
            EmbeddingModel.from_pretrained(tmp_path, device="cpu")


def test_kalm_layout_loads_without_running_remote_code(tmp_path, tokenizer):
    plain = _save_tiny("qwen2", tmp_path / "plain", tokenizer)
    kalm = tmp_path / "kalm"
    shutil.copytree(plain, kalm)
    config = json.loads((kalm / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_bidir.BidirQwen2Model", "AutoConfig": "modeling_bidir.Cfg"}
    config["architectures"] = ["BidirQwen2Model"]
    (kalm / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote_code_ran"
    (kalm / "modeling_bidir.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('ran')\n")
    a = EmbeddingModel.from_pretrained(plain, device="cpu")
    b = EmbeddingModel.from_pretrained(kalm, device="cpu")
    assert not marker.exists()
    with torch.no_grad():
        torch.testing.assert_close(a(a.tokenize(TEXTS)), b(b.tokenize(TEXTS)), atol=0, rtol=0)


def test_pickled_weights_refused_unless_allowed(tmp_path, tokenizer):
    from safetensors.torch import load_file

    directory = _save_tiny("llama", tmp_path, tokenizer)
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        EmbeddingModel.from_pretrained(directory, device="cpu")
    model = EmbeddingModel.from_pretrained(directory, device="cpu", allow_pickle=True)
    with torch.no_grad():
        assert torch.isfinite(model(model.tokenize(TEXTS))).all()


def test_unknown_path_and_custom_model_type_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a local model directory"):
        EmbeddingModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my-secret-arch"}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        EmbeddingModel.from_pretrained(tmp_path)


def test_bad_arguments_name_the_argument(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        EmbeddingModel.from_pretrained(tmp_path / "nope", attn_backend="flash")
    with pytest.raises(ValueError, match="device 'cuda:99'"):
        EmbeddingModel.from_pretrained(tmp_path / "nope", device="cuda:99")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/config.json: not a valid JSON file"):
        EmbeddingModel.from_pretrained(tmp_path / "bad")
    model = EmbeddingModel.from_pretrained(_save_tiny("qwen2", tmp_path / "m", tokenizer), device="cpu")
    with pytest.raises(TypeError, match="texts must be a list of strings, got one str"):
        model.embed("one text")
    with pytest.raises(TypeError, match="texts must be strings, item 1 is NoneType"):
        model.embed(["a", None])
    for key, value in (("max_tokens", 0), ("max_tokens", -5), ("max_sequences", 0), ("max_sequences", 2.5)):
        with pytest.raises(ValueError, match=f"{key} must be a positive int or None, got {value}"):
            model.embed(["a", "b"], **{key: value})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file; save writes a model directory"):
        model.save_pretrained(tmp_path / "file")


def test_save_pretrained_reloads_in_kalm_fast_and_sentence_transformers(tmp_path, tokenizer):
    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.from_pretrained(_save_tiny("qwen2", tmp_path / "src", tokenizer), device="cpu")
    model.prompts = {"query": "Instruct: find it \n Query: "}
    model.save_pretrained(tmp_path / "out")
    again = EmbeddingModel.from_pretrained(tmp_path / "out", device="cpu")
    assert again.prompts == model.prompts
    texts = [t for t in TEXTS if t]
    with torch.no_grad():
        want = model(model.tokenize(texts))
        torch.testing.assert_close(again(again.tokenize(texts)), want, atol=0, rtol=0)
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    got = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert F.cosine_similarity(got, want).min() > 0.9999


def test_gradient_checkpointing_keeps_gradients(decoder_dir):
    model = EmbeddingModel.from_pretrained(decoder_dir, device="cpu").train()
    batch = model.tokenize(TEXTS[:3])
    model(batch).sum().backward()
    want = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(batch).sum().backward()
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad, want, atol=1e-5, rtol=1e-5)


def _pooled_by_transformers_modules(model, batch):
    """Mean-pooled last hidden states of the transformers modules themselves on a packed batch (the oracle), with
    flash-attention's varlen keyword arguments (raw tensors, checked in every layer)."""
    from kalm_fast.ops import mean_pool

    cu, m = batch.cu_seqlens, batch.max_seqlen
    with torch.no_grad():
        hidden = model.model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                             cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m).last_hidden_state[0]
    return mean_pool(hidden, cu_seqlens=cu)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "addmm"])
def test_packed_bert_fast_path_matches_transformers_modules(monkeypatch, onednn):
    """The BERT inference fast path (fused QKV, oneDNN or addmm linears, attention per run of equal lengths: matmul
    for short runs, SDPA past MATMUL_ATTENTION_MAX_LEN) equals the transformers modules on packed input, for
    unsorted lengths, runs of equal lengths and an empty sequence."""
    from kalm_fast.models import bert_packed

    model = EmbeddingModel.from_pretrained(None, device="cpu")
    assert model._packed_bert is not None
    if onednn and not bert_packed.onednn_linear_available(torch.float32):
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(model._packed_bert, "onednn", onednn)
    texts = TEXTS + ["the same length", "the same width", "one"] + ["long text " * 60, "longer text " * 90]
    ids = model.token_ids(texts)
    ids.insert(2, [])
    lengths = [len(x) for x in ids]
    assert max(lengths) > bert_packed.MATMUL_ATTENTION_MAX_LEN >= sorted(lengths)[-2]
    assert lengths[-5] == lengths[-4] and lengths[-3] == 3
    batch = model.pack(ids)
    with torch.no_grad():
        fast = model(batch)
    torch.testing.assert_close(fast, _pooled_by_transformers_modules(model, batch), atol=1e-5, rtol=1e-5)
    assert fast[2].abs().max() == 0  # the empty sequence pools to zeros


def test_packed_bert_weight_cache_follows_the_parameters():
    """Packed weights are rebuilt when a parameter changes in place (e.g. loading a soup into the same model)."""
    model = EmbeddingModel.from_pretrained(None, device="cpu")
    batch = model.tokenize(["a sentence to embed", "and another one"])
    with torch.no_grad():
        before = model(batch)
        model.model.encoder.layer[0].intermediate.dense.weight.mul_(0.5)
        after = model(batch)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, _pooled_by_transformers_modules(model, batch), atol=1e-5, rtol=1e-5)


def test_equal_length_runs():
    from kalm_fast.models.bert_packed import equal_length_runs

    assert equal_length_runs([]) == []
    assert equal_length_runs([3, 3, 0, 2, 3, 3, 3, 1]) == [(0, 2, 3), (6, 1, 2), (8, 3, 3), (17, 1, 1)]
    assert equal_length_runs([0, 0]) == []


@pytest.mark.gpu
@pytest.mark.skipif(not (INTERPRET or DEVICE == "cuda"), reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["qwen3", "modernbert", "eurobert", "gemma2"])
def test_triton_attention_backend_matches_torch(tmp_path, tokenizer, kind):
    """The registered attention function drives the Triton kernels too (CPU interpreter here, the GPU there):
    Qwen3 (head dim 32, GQA 4:1), ModernBERT (head dim 16, a local layer's band, texts longer than it), EuroBERT (a
    rotary encoder, GQA 4:2), Gemma 2 (soft-capped logits, a local layer's band)."""
    directory = _save_tiny(kind, tmp_path, tokenizer)
    texts = TEXTS[:3] + TEXTS[-1:]
    want = EmbeddingModel.from_pretrained(directory, device=DEVICE, attn_backend="torch")
    got = EmbeddingModel.from_pretrained(directory, device=DEVICE, attn_backend="triton")
    a, b = want(want.tokenize(texts)), got(got.tokenize(texts))
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    b.square().sum().backward()
    grads = [p.grad for p in got.model.layers[-1].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and grads[0].abs().sum() > 0


def _tiny_bert(directory, tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128)).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def test_bert_fast_path_honours_the_attention_backend(tmp_path, tokenizer, monkeypatch):
    """attn_backend="reference" runs the BERT fast path's attention through the op with that backend."""
    from kalm_fast.models import bert_packed

    directory = _tiny_bert(tmp_path, tokenizer)
    default = EmbeddingModel.from_pretrained(directory, device="cpu")
    chosen = EmbeddingModel.from_pretrained(directory, device="cpu", attn_backend="reference")
    assert chosen._packed_bert is not None
    calls = []
    real = bert_packed.ops.flash_attention
    monkeypatch.setattr(bert_packed.ops, "flash_attention",
                        lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
    with torch.no_grad():
        want, got = default(default.tokenize(TEXTS)), chosen(chosen.tokenize(TEXTS))
    assert calls == ["reference", "reference"]  # one call per layer, none from the default model's per-run path
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_packed_batch_is_validated_once_not_per_layer(decoder_dir, monkeypatch):
    """From texts to the attention kernels, the batch boundaries are checked when the batch is built: no layer
    re-validates cu_seqlens (each raw validation is a device-to-host copy, a synchronization on a GPU)."""
    from kalm_fast.ops import Varlen

    built, validated = [], []
    from_lengths, from_cu_seqlens = Varlen.from_lengths.__func__, Varlen.from_cu_seqlens.__func__
    monkeypatch.setattr(Varlen, "from_lengths", classmethod(lambda cls, *a, **kw: built.append(1) or
                                                            from_lengths(cls, *a, **kw)))
    monkeypatch.setattr(Varlen, "from_cu_seqlens", classmethod(lambda cls, *a, **kw: validated.append(1) or
                                                               from_cu_seqlens(cls, *a, **kw)))
    model = EmbeddingModel.from_pretrained(decoder_dir, device="cpu")
    out = model.embed(TEXTS * 3, max_tokens=64)
    assert out.shape == (18, model.hidden_size) and validated == [] and len(built) >= 2
    model.train()
    model(model.tokenize(TEXTS)).sum().backward()  # training too
    assert validated == []


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("attn_backend", ["auto", "torch"])
def test_packed_forward_has_no_host_synchronization_on_gpu(decoder_dir, attn_backend):
    """No device-to-host synchronization inside the model's forward (CUDA's sync debug mode raises on one)."""
    model = EmbeddingModel.from_pretrained(decoder_dir, device="cuda", dtype="bfloat16", attn_backend=attn_backend)
    batch = model.tokenize(TEXTS)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.float()).all()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encoder_on_gpu_matches_cpu(decoder_dir, dtype):
    """``Encoder`` on the GPU (Triton attention and pooling) against the same model on the CPU in fp32."""
    from kalm_fast import Encoder

    texts = [t for t in TEXTS if t] * 5
    want = Encoder(decoder_dir, device="cpu").encode(texts, convert_to_tensor=True)
    got = Encoder(decoder_dir, device="cuda", dtype=dtype).encode(texts, convert_to_tensor=True).cpu()
    assert F.cosine_similarity(got, want).min() > (0.9999 if dtype == "float32" else 0.99)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["modernbert", "mpnet", "nomic_bert"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encoders_on_gpu_match_cpu(tmp_path, tokenizer, kind, dtype):
    """ModernBERT (packed, the Triton band of its local layers), MPNet (padded, its own attention) and NomicBERT
    (packed, rotary) encode on the GPU as on the CPU in fp32. (EmbeddingGemma 2 needs a newer transformers than the
    H200 machine's 5.17: a GPU test of it would skip there.)"""
    from kalm_fast import Encoder

    directory = _save_tiny(kind, tmp_path, tokenizer)
    texts = [t for t in TEXTS if t] * 5
    want = Encoder(directory, device="cpu").encode(texts, convert_to_tensor=True)
    got = Encoder(directory, device="cuda", dtype=dtype).encode(texts, convert_to_tensor=True).cpu().float()
    assert F.cosine_similarity(got, want).min() > (0.9999 if dtype == "float32" else 0.99)


@pytest.fixture(scope="module")
def bf16_decoder_dir(decoder_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bf16") / "model"
    EmbeddingModel.from_pretrained(decoder_dir, dtype="bfloat16").save_pretrained(directory)
    return directory


def test_dtype_auto_keeps_the_checkpoints_dtype(bf16_decoder_dir):
    """``"auto"``: the saved dtype (as transformers 5 loads); None: float32 weights (training, and Encoder on CPU)."""
    from kalm_fast import Encoder

    assert EmbeddingModel.from_pretrained(bf16_decoder_dir, dtype="auto").dtype == torch.bfloat16
    assert EmbeddingModel.from_pretrained(bf16_decoder_dir).dtype == torch.float32
    assert Encoder(bf16_decoder_dir, device="cpu").model.dtype == torch.float32
    with pytest.raises(ValueError, match="'auto'"):
        EmbeddingModel.from_pretrained(bf16_decoder_dir, dtype="half-ish")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_encoder_on_gpu_loads_the_checkpoints_dtype(bf16_decoder_dir):
    """On a GPU ``Encoder`` keeps a bf16 checkpoint in bf16, as sentence-transformers loads it."""
    from kalm_fast import Encoder

    assert Encoder(bf16_decoder_dir, device="cuda").model.dtype == torch.bfloat16
    assert Encoder(bf16_decoder_dir, device="cuda", dtype="float32").model.dtype == torch.float32


@pytest.mark.parametrize("value, message", [
    (-5, "a positive int up to 128"), (2.5, "a positive int up to 128"), ("abc", "a positive int up to 128"),
    (0, "a positive int up to 128"), (10_000, "a positive int up to 128 .the model's position table. or None, got "
                                             "10000"), (True, "a positive int")])
def test_save_pretrained_refuses_a_max_seq_length_it_could_not_load(tmp_path, tokenizer, value, message):
    """What would save a model that fails to load (or, past a BERT's position table, crashes sentence-transformers)
    is refused before anything is written; a rotary decoder has no such bound."""
    bert = EmbeddingModel.from_pretrained(_save_tiny("distilbert", tmp_path / "bert", tokenizer), device="cpu")
    with pytest.raises(ValueError, match=f"max_seq_length must be {message}"):
        bert.save_pretrained(tmp_path / "out", max_seq_length=value)
    assert not (tmp_path / "out").exists()
    decoder = EmbeddingModel.from_pretrained(_save_tiny("qwen2", tmp_path / "qwen2", tokenizer), device="cpu")
    decoder.save_pretrained(tmp_path / "long", max_seq_length=10_000)
    assert json.loads((tmp_path / "long/sentence_bert_config.json").read_text())["max_seq_length"] == 10_000
