"""kalm_fast.models.decoder_packed: the packed CPU fast path of decoder LLMs equals transformers' eager modules made
bidirectional (GQA, Qwen3 q/k norms, biases, sliding windows, empty and unsorted sequences, oneDNN and addmm
linears)."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRET, skip_unless_transformers_reads_is_causal

from kalm_fast.models import EmbeddingModel, decoder_packed
from kalm_fast.models.bert_packed import MATMUL_ATTENTION_MAX_LEN, onednn_linear_available
from kalm_fast.models.embedding import _cpu_has_bf16

BPE = Path(__file__).resolve().parent / "fixtures" / "bpe-8k"
# Unsorted lengths, an empty text, a run of equal lengths, a text past MATMUL_ATTENTION_MAX_LEN (SDPA branch).
TEXTS = ["hello", "a somewhat longer sentence with more tokens in it, and a comma", "", "the same", "the same",
         "word " * 150, "日本語", "short"]


def _config(kind):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, pad_token_id=0)
    if kind == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2)
    if kind == "qwen2-gqa14":  # KaLM-Embedding-V2's 14:2 heads
        return Qwen2Config(**{**common, "hidden_size": 224, "num_attention_heads": 14}, num_key_value_heads=2)
    if kind == "llama":  # biases everywhere: the fused residual-add and multiply post-ops must add them first
        return LlamaConfig(**common, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True)
    if kind == "qwen3":  # q/k norms, head_dim 32 != hidden / heads, 4:1 heads
        return Qwen3Config(**common, num_key_value_heads=1, head_dim=32)
    if kind == "mistral":  # a window longer than every text: no window
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=4096)
    if kind == "mistral-window":  # every layer local, |i - j| <= 16 once bidirectional
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=16)
    if kind == "qwen2-window":  # the second layer local (max_window_layers), |i - j| <= 16 once bidirectional
        return Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                           max_window_layers=1)
    raise ValueError(kind)


KINDS = ["qwen2", "qwen2-gqa14", "llama", "qwen3", "mistral", "mistral-window", "qwen2-window"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One random-init tiny model per kind, saved with the committed byte-level BPE tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BPE))
    dirs = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = AutoModel.from_config(_config(kind))
        for p in model.parameters():  # random init gives near-identical tokens; spread the weights out
            p.data.normal_(0, 0.2)
        dirs[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(str(dirs[kind]))
        tokenizer.save_pretrained(str(dirs[kind]))
    return dirs


def _eager_bidirectional(model_dir, ids, dtype=torch.float32):
    """The oracle: transformers' eager model, one text at a time with an all-zero (bidirectional) float mask, or,
    for a model with a sliding window, as transformers runs it with ``is_causal: false`` (local layers: |i - j| <=
    window); the last hidden states of every token concatenated in packed order ``[T, H]``."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_dir))
    windowed = getattr(config, "sliding_window", None) is not None
    if windowed:
        skip_unless_transformers_reads_is_causal()
        config.is_causal = False
    ref = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", dtype=dtype, config=config).eval()
    out = []
    with torch.no_grad():
        for x in ids:
            if x:
                mask = None if windowed else torch.zeros(1, 1, len(x), len(x), dtype=dtype)
                out.append(ref(input_ids=torch.tensor(x)[None], attention_mask=mask).last_hidden_state[0])
    return torch.cat(out)


def _modules(model, ids):
    """Last hidden states ``[T, H]`` of the transformers modules themselves on the packed tokens of ``ids``."""
    b = model.pack(ids)
    cu, m = b.cu_seqlens, b.max_seqlen
    with torch.no_grad():
        return model.model(input_ids=b.input_ids[None], position_ids=b.position_ids[None], cu_seq_lens_q=cu,
                           cu_seq_lens_k=cu, max_length_q=m, max_length_k=m).last_hidden_state[0]


def _fast(model, ids):
    with torch.no_grad():
        return model._packed_decoder(model.pack(ids))


def _branch(model) -> bool:
    """Whether the last fast-path call ran its linears through oneDNN (read from the weight cache)."""
    flags = {entry[1][0] for entry in model._packed_decoder.weight_cache.values()}
    assert len(flags) == 1
    return flags.pop()


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "addmm"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_matches_eager_bidirectional_fp32(model_dirs, kind, onednn):
    if onednn and not onednn_linear_available(torch.float32):
        pytest.skip("this torch build has no oneDNN linear")
    model = EmbeddingModel.from_pretrained(model_dirs[kind], device="cpu")
    assert model._packed_decoder is not None
    model._packed_decoder.onednn = onednn
    ids = model.token_ids(TEXTS)
    lengths = [len(x) for x in ids]
    assert lengths[2] == 0 and lengths[3] == lengths[4] and max(lengths) > MATMUL_ATTENTION_MAX_LEN
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)
    got = _fast(model, ids)
    assert _branch(model) == onednn
    want = _eager_bidirectional(model_dirs[kind], ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_eager_oracle_is_bidirectional(model_dirs):
    """The oracle really differs from the causal model, so a causal fast path would fail the tests above."""
    from transformers import AutoModel

    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    ids = [x for x in model.token_ids(TEXTS) if x]
    causal = AutoModel.from_pretrained(str(model_dirs["qwen2"]), attn_implementation="eager").eval()
    with torch.no_grad():
        want_causal = torch.cat([causal(input_ids=torch.tensor(x)[None]).last_hidden_state[0] for x in ids])
    assert (_fast(model, ids) - want_causal).abs().max() > 1e-2


@pytest.mark.skipif(not _cpu_has_bf16(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("kind", ["qwen2-gqa14", "qwen3"])
def test_fast_path_bf16_close_to_eager_fp32(model_dirs, kind):
    """bf16 runs oneDNN bf16 linears (where available); it stays within bf16 rounding of the fp32 oracle."""
    model = EmbeddingModel.from_pretrained(model_dirs[kind], device="cpu", dtype="bfloat16")
    ids = model.token_ids(TEXTS)
    got = _fast(model, ids)
    assert got.dtype == torch.bfloat16 and _branch(model) == onednn_linear_available(torch.bfloat16)
    want = _eager_bidirectional(model_dirs[kind], ids)
    torch.testing.assert_close(got.float(), want, atol=4e-2, rtol=4e-2)
    assert F.cosine_similarity(got.float(), want).min() > 0.999


@pytest.fixture
def fast_path_calls(monkeypatch) -> list:
    """A list that gets one item per call of the fast path."""
    calls = []
    fast_call = decoder_packed.PackedDecoder.__call__
    monkeypatch.setattr(decoder_packed.PackedDecoder, "__call__",
                        lambda self, *args: calls.append(1) or fast_call(self, *args))
    return calls


def test_encoder_and_forward_take_the_fast_path_only_for_inference(model_dirs, fast_path_calls):
    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    calls = fast_path_calls
    batch = model.tokenize(TEXTS)
    with torch.no_grad():
        fast = model(batch)
    assert calls == [1]
    slow = model(batch)  # autograd on: the transformers modules
    assert calls == [1] and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=2e-5, rtol=2e-5)
    assert fast[2].abs().max() == 0  # the empty text pools to zeros


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "addmm"])
def test_weight_cache_follows_in_place_parameter_changes(model_dirs, onednn):
    """Packed / concatenated weights are rebuilt when a parameter changes in place (e.g. a soup loaded into the
    same model): the fused QKV, a projection with a fused post-op and one whose residual add is fused."""
    if onednn and not onednn_linear_available(torch.float32):
        pytest.skip("this torch build has no oneDNN linear")
    model = EmbeddingModel.from_pretrained(model_dirs["llama"], device="cpu")
    model._packed_decoder.onednn = onednn
    ids = model.token_ids(TEXTS)
    before = _fast(model, ids)
    layers = model.model.layers
    with torch.no_grad():
        for p in (layers[0].self_attn.k_proj.weight, layers[1].mlp.up_proj.bias, layers[1].self_attn.o_proj.weight):
            p.mul_(0.5)
    after = _fast(model, ids)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, _modules(model, ids), atol=2e-5, rtol=2e-5)  # with the changed weights


def test_a_step_that_leaves_no_version_behind_reaches_the_packed_path(model_dirs):
    """Fused AdamW changes the weights in place without bumping their versions, the cache's key: leaving training
    mode drops the fused copies, so the next embed computes with the stepped weights (it mixed old and new)."""
    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    texts = [t for t in TEXTS if t]
    ids = model.token_ids(texts)
    _fast(model, ids)  # fills the cache
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    versions = [p._version for p in model.parameters()]
    model.train()
    model(model.tokenize(texts)).square().sum().backward()
    optimizer.step()
    assert [p._version for p in model.parameters()] == versions  # what the cache's key could not see
    model.eval()
    torch.testing.assert_close(_fast(model, ids), _modules(model, ids), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_fast_path_honours_every_rms_norm_epsilon(model_dirs, kind):
    """Every RMSNorm's variance_epsilon reaches the fast path (input, post-attention, Qwen3 q/k and final norms): at
    the configs' 1e-6 dropping one moves the output by ~1e-7, within the tolerance; at 0.5 it cannot hide."""
    model = EmbeddingModel.from_pretrained(model_dirs[kind], device="cpu")
    norms = [m for m in model.model.modules() if hasattr(m, "variance_epsilon")]
    assert len(norms) >= 2 * model.config.num_hidden_layers + 1
    for m in norms:
        m.variance_epsilon = 0.5
    ids = model.token_ids(TEXTS[:5])
    got = _fast(model, ids)
    torch.testing.assert_close(got, _modules(model, ids), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_other_attention_backends_go_through_flash_attention(model_dirs, monkeypatch, backend):
    """An attention backend other than "auto" / "torch" runs ``ops.flash_attention`` with that backend."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    model = EmbeddingModel.from_pretrained(model_dirs["qwen3"], device="cpu", attn_backend=backend)
    seen = []
    flash_attention = decoder_packed.ops.flash_attention
    monkeypatch.setattr(decoder_packed.ops, "flash_attention",
                        lambda *a, **kw: seen.append(kw["backend"]) or flash_attention(*a, **kw))
    monkeypatch.setattr(decoder_packed, "attention_per_run", None)  # must not be reached
    ids = model.token_ids(TEXTS[:5])
    got = _fast(model, ids)
    assert seen == [backend] * model.config.num_hidden_layers
    torch.testing.assert_close(got, _eager_bidirectional(model_dirs["qwen3"], ids), atol=1e-4, rtol=1e-4)


def test_packed_decoder_setting(model_dirs, monkeypatch):
    """KALM_PACKED_DECODER picks the devices of the fast path: CPU by default, also CUDA with "all"."""
    monkeypatch.delenv("KALM_PACKED_DECODER", raising=False)
    assert decoder_packed.runs_on(torch.device("cpu")) and not decoder_packed.runs_on(torch.device("cuda"))
    monkeypatch.setenv("KALM_PACKED_DECODER", "all")
    assert decoder_packed.runs_on(torch.device("cpu")) and decoder_packed.runs_on(torch.device("cuda"))
    monkeypatch.setenv("KALM_PACKED_DECODER", "gpu")
    with pytest.raises(ValueError, match="KALM_PACKED_DECODER must be one of"):
        decoder_packed.runs_on(torch.device("cpu"))


def _kernel_calls(monkeypatch, *names) -> list:
    """A list that gets the name of each call of ``decoder_kernels``' functions ``names`` (which still run)."""
    from kalm_fast.models import decoder_kernels

    calls = []
    for name in names:
        real = getattr(decoder_kernels, name)
        monkeypatch.setattr(decoder_kernels, name,
                            lambda *a, _real=real, _name=name: (calls.append(_name), _real(*a))[1])
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["qwen2-gqa14", "llama", "qwen3"])
def test_fast_path_takes_the_triton_kernels(model_dirs, monkeypatch, kind):
    """With decoder_kernels' SiLU-multiply and RoPE (``fused``: by default on a GPU; in the interpreter on CPU) the
    fast path equals its torch path in fp32: GQA 14:2, biases, Qwen3's q/k norms."""
    monkeypatch.setenv("KALM_PACKED_DECODER", "all")
    model = EmbeddingModel.from_pretrained(model_dirs[kind], device=DEVICE)
    batch = model.pack(model.token_ids(TEXTS))
    calls = _kernel_calls(monkeypatch, "silu_mul", "rope_")
    decoder = model._packed_decoder
    decoder.onednn = False  # the kernels serve the one-GEMM gate/up projection (oneDNN fuses SiLU itself on CPU)
    with torch.no_grad():
        decoder.fused = False
        want = decoder(batch)
        assert calls == []
        decoder.fused = None if DEVICE == "cuda" else True
        got = decoder(batch)
    layers = len(model.model.layers)
    assert calls.count("silu_mul") == layers and calls.count("rope_") == 2 * layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _train_step_grads(model, batch, weights):
    """Embeddings of ``batch`` in train mode and the gradients of every parameter of ``(emb * weights).sum()``."""
    model.zero_grad(set_to_none=True)
    emb = model(batch)
    (emb * weights).sum().backward()
    return emb.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["qwen2-gqa14", "llama", "qwen3", "mistral-window"])
def test_fused_modules_match_transformers_forward_and_backward(model_dirs, monkeypatch, kind):
    """KALM_FUSED_DECODER=1: transformers' modules with F.rms_norm, the Triton SiLU-multiply, RoPE and residual-add
    RMSNorm give the embeddings and every parameter gradient of their own forward (fp32, train mode): GQA 14:2,
    biases, Qwen3's q/k norms, Mistral's local layers (their window shorter than the longest text); the kernels are
    called once per MLP, twice per attention and once per layer."""
    model = EmbeddingModel.from_pretrained(model_dirs[kind], device=DEVICE).train()
    batch = model.pack(model.token_ids(TEXTS))
    weights = torch.randn(len(TEXTS), model.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    calls = _kernel_calls(monkeypatch, "silu_mul", "rope", "add_rms_norm")
    monkeypatch.setenv("KALM_FUSED_DECODER", "0")
    want, want_grads = _train_step_grads(model, batch, weights)
    assert calls == []
    monkeypatch.setenv("KALM_FUSED_DECODER", "1")
    got, got_grads = _train_step_grads(model, batch, weights)
    layers = len(model.model.layers)
    assert calls.count("silu_mul") == calls.count("add_rms_norm") == layers and calls.count("rope") == 2 * layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(model.parameters()))
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["qwen2-gqa14", "qwen3"])
def test_fused_modules_under_autocast(model_dirs, monkeypatch, kind):
    """As training runs on a GPU (fp32 weights, bf16 autocast; fp16 autocast on CPU in the interpreter): the fused
    modules' embeddings and gradients stay within half-precision rounding of transformers' own forward; the residual
    stream stays fp32 and the fused add-RMSNorm hands the MLP its input in the autocast dtype."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    model = EmbeddingModel.from_pretrained(model_dirs[kind], device=DEVICE).train()
    batch = model.pack(model.token_ids(TEXTS))
    weights = torch.randn(len(TEXTS), model.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    from kalm_fast.models import decoder_kernels

    real, dtypes = decoder_kernels.add_rms_norm, []
    monkeypatch.setattr(decoder_kernels, "add_rms_norm", lambda *a: (
        lambda out: (dtypes.append(tuple(t.dtype for t in (*a[:2], *out))), out)[1])(real(*a)))
    projected = []  # the dtype of what reaches the first layer's Q projection, per run
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: projected.append(args[0].dtype))
    runs = []
    for setting in ("0", "1"):
        monkeypatch.setenv("KALM_FUSED_DECODER", setting)
        with torch.autocast(DEVICE, dtype=dtype):
            runs.append(_train_step_grads(model, batch, weights))
    # (residual, attention output, normed, sum) per layer; the input norm's output cast once, before the projections
    assert dtypes == [(torch.float32, dtype, dtype, torch.float32)] * len(model.model.layers)
    assert projected == [torch.float32, dtype]
    (want, want_grads), (got, got_grads) = runs
    texts = want.norm(dim=1) > 0  # not the empty text's zero row
    assert F.cosine_similarity(got[texts].float(), want[texts].float()).min() > 0.999
    # relative to each gradient, plus a floor for those that are rounding noise around 0 (the key projection's bias
    # shifts every score of a query alike: softmax gives it no gradient)
    floor = 1e-3 * max(g.norm() for g in want_grads.values())
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).norm() <= 0.05 * grad.norm() + floor, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["qwen2-gqa14", "llama", "qwen3"])
def test_fused_modules_encode_bf16_on_gpu(model_dirs, monkeypatch, fast_path_calls, kind):
    """GPU inference in bf16 weights through transformers' modules with KALM_FUSED_DECODER=1 (bf16 rotary angles,
    F.rms_norm in bf16) stays within bf16 rounding of the eager fp32 oracle."""
    monkeypatch.setenv("KALM_FUSED_DECODER", "1")
    model = EmbeddingModel.from_pretrained(model_dirs[kind], device="cuda", dtype=torch.bfloat16)
    ids = model.token_ids(TEXTS)
    calls = _kernel_calls(monkeypatch, "silu_mul")
    with torch.no_grad():
        got = model.token_embeddings(model.pack(ids)).float().cpu()
    # transformers' modules ran, not the packed decoder, with the fused ops
    assert fast_path_calls == [] and len(calls) == len(model.model.layers)
    assert F.cosine_similarity(got, _eager_bidirectional(model_dirs[kind], ids)).min() > 0.999


def _padded(model, left: bool):
    """Four of TEXTS as a padded ``[B, L]`` batch (``input_ids``, ``attention_mask``), padded on the right or left."""
    ids = [x for x in model.token_ids(TEXTS) if x][:4]
    width = max(map(len, ids))
    pad = [[0] * (width - len(x)) for x in ids]
    rows = [(p + x, [0] * len(p) + [1] * len(x)) if left else (x + p, [1] * len(x) + [0] * len(p))
            for x, p in zip(ids, pad)]
    return (torch.tensor([r[0] for r in rows], device=DEVICE), torch.tensor([r[1] for r in rows], device=DEVICE))


def _padded_runs(model, monkeypatch, settings=("0", "1"), **inputs):
    """transformers' model on a padded batch for each KALM_FUSED_DECODER setting: the real tokens' last hidden states
    and every parameter's gradient of their squared sum."""
    mask = inputs["attention_mask"].bool()
    runs = []
    for setting in settings:
        monkeypatch.setenv("KALM_FUSED_DECODER", setting)
        model.zero_grad(set_to_none=True)
        out = model.model(**inputs).last_hidden_state
        out[mask].square().sum().backward()
        runs.append((out[mask].detach(), [p.grad.clone() for p in model.parameters()]))
    return runs


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("positions", ["position_ids", "no_position_ids", "left_padded"])
def test_fused_modules_on_a_padded_batch(model_dirs, monkeypatch, positions):
    """The transformers model called on a padded ``[B, L]`` batch (the 2-D key padding mask reaches kalm_fast's
    attention through the fused attention module; without position_ids transformers makes one row of rotary angles
    for the whole batch; left padding gives each row angles of its own) equals its own forward on the real tokens,
    gradients included."""
    model = EmbeddingModel.from_pretrained(model_dirs["qwen2-gqa14"], device=DEVICE)
    input_ids, mask = _padded(model, left=positions == "left_padded")
    extra = {}
    if positions == "position_ids":
        extra = dict(position_ids=torch.arange(mask.shape[1], device=DEVICE).expand(mask.shape))
    elif positions == "left_padded":
        extra = dict(position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    calls = _kernel_calls(monkeypatch, "rope", "add_rms_norm")
    (want, want_grads), (got, got_grads) = _padded_runs(model, monkeypatch, input_ids=input_ids, attention_mask=mask,
                                                         use_cache=False, **extra)
    assert calls.count("rope") == 2 * calls.count("add_rms_norm") == 2 * len(model.model.layers)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", ["kv_cache", "eager_attention", "norm_hook"])
def test_fused_modules_fall_back_where_they_do_not_apply(model_dirs, monkeypatch, case):
    """Under KALM_FUSED_DECODER=1, the layers run their own forward with a KV cache; the attention modules theirs
    with the model switched from kalm_fast's attention to another implementation; a layer whose norm after
    attention has a hook (which the fused add-RMSNorm would skip) its own: the same output and gradients as with
    the setting off."""
    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device=DEVICE)
    input_ids, mask = _padded(model, left=False)
    layers = len(model.model.layers)
    if case == "eager_attention":
        model.model.config._attn_implementation = "eager"
    if case == "norm_hook":
        model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda m, args, out: out * 1.5)
    calls = _kernel_calls(monkeypatch, "rope", "add_rms_norm")
    runs = _padded_runs(model, monkeypatch, input_ids=input_ids, attention_mask=mask, use_cache=case == "kv_cache")
    assert calls.count("rope") == {"kv_cache": 0, "eager_attention": 0, "norm_hook": 2 * layers}[case]
    assert calls.count("add_rms_norm") == {"kv_cache": 0, "eager_attention": layers, "norm_hook": layers - 1}[case]
    (want, want_grads), (got, got_grads) = runs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs a CUDA device or TRITON_INTERPRET=1")
def test_fused_layers_keep_gradient_checkpointing(model_dirs, monkeypatch):
    """With activation checkpointing on, the fused layers are still checkpointed (the backward recomputes each layer:
    a second add-RMSNorm call per layer) whichever way the installed transformers checkpoints (in the layer's
    ``__call__``, or in its class's ``forward``, which the fused layer replaces), with the same gradients."""
    monkeypatch.setenv("KALM_FUSED_DECODER", "1")
    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device=DEVICE).train()
    batch = model.pack(model.token_ids(TEXTS[:4]))
    weights = torch.randn(4, model.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    calls = _kernel_calls(monkeypatch, "add_rms_norm")
    want, want_grads = _train_step_grads(model, batch, weights)
    assert len(calls) == len(model.model.layers)
    model.gradient_checkpointing_enable()
    got, got_grads = _train_step_grads(model, batch, weights)
    assert len(calls) == 3 * len(model.model.layers)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (dynamo cannot trace the Triton interpreter)")
@pytest.mark.parametrize("fused", ["0", "1"], ids=["modules", "fused_decoder"])
def test_torch_compile_of_the_decoder_on_gpu(model_dirs, monkeypatch, fused):
    """``torch.compile`` of a decoder (inductor), with kalm_fast's attention and with KALM_FUSED_DECODER=1's
    kernels: the same embeddings and gradients as eager in train mode."""
    monkeypatch.setenv("KALM_FUSED_DECODER", fused)
    model = EmbeddingModel.from_pretrained(model_dirs["qwen2-gqa14"], device="cuda").train()
    batch = model.pack(model.token_ids(TEXTS))
    weights = torch.randn(len(TEXTS), model.hidden_size, generator=torch.Generator().manual_seed(0)).cuda()
    want, want_grads = _train_step_grads(model, batch, weights)
    model.model.compile()
    got, got_grads = _train_step_grads(model, batch, weights)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_fused_forwards_survive_pickling_and_deepcopy(model_dirs, monkeypatch):
    """A model with the fused forwards installed pickles (torch.save of the whole module) and deep-copies; each copy's
    modules run on the copy's own weights."""
    import copy
    import io

    monkeypatch.setenv("KALM_FUSED_DECODER", "1")
    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    batch = model.pack(model.token_ids(TEXTS[:2]))
    buffer = io.BytesIO()
    torch.save(model.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(model.model)
    for clone in (loaded, copied):
        layer = clone.layers[0]
        assert all(m.forward.args[0] is m for m in (layer, layer.input_layernorm, layer.mlp, layer.self_attn))
        with torch.no_grad():
            clone.norm.weight.mul_(2)
            got = clone(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                        kalm_varlen=batch.varlen, use_cache=False).last_hidden_state
            want = model.model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                               kalm_varlen=batch.varlen, use_cache=False).last_hidden_state
        torch.testing.assert_close(got, 2 * want, atol=1e-5, rtol=1e-5)


def test_fused_decoder_setting(model_dirs, monkeypatch):
    """KALM_FUSED_DECODER takes 0 or 1 (anything else is refused by name); off the GPU and the interpreter, or
    unset, the modules run their own forward."""
    from kalm_fast.models import fused_decoder

    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    batch = model.pack(model.token_ids(TEXTS[:2]))
    monkeypatch.setenv("KALM_FUSED_DECODER", "yes")
    with pytest.raises(ValueError, match="KALM_FUSED_DECODER must be 0 or 1, got 'yes'"):
        model.train()(batch)
    monkeypatch.setenv("KALM_FUSED_DECODER", "1")
    assert fused_decoder.enabled(torch.zeros(1)) == INTERPRET
    monkeypatch.delenv("KALM_FUSED_DECODER")
    assert not fused_decoder.enabled(torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["qwen2-gqa14", "llama", "qwen3"])
def test_fast_path_on_gpu_matches_eager(model_dirs, monkeypatch, fast_path_calls, kind, dtype):
    """With KALM_PACKED_DECODER=all the fast path runs on the GPU (addmm linears, ops.flash_attention) and equals
    the eager oracle (fp32), or stays within bf16 rounding of it."""
    monkeypatch.setenv("KALM_PACKED_DECODER", "all")
    model = EmbeddingModel.from_pretrained(model_dirs[kind], device="cuda", dtype=dtype)
    ids = model.token_ids(TEXTS)
    with torch.no_grad():
        got = model.token_embeddings(model.pack(ids)).float().cpu()
    assert fast_path_calls == [1] and _branch(model) is False
    want = _eager_bidirectional(model_dirs[kind], ids)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        assert F.cosine_similarity(got, want).min() > 0.999


def test_encode_benchmark_times_the_packed_decoder_under_its_setting(model_dirs, monkeypatch):
    """benchmarks.encode's "(packed decoder)" row encodes with KALM_PACKED_DECODER=all, restored afterwards."""
    from benchmarks.encode import VARIANTS, with_setting
    from kalm_fast.encode import Encoder

    monkeypatch.delenv("KALM_PACKED_DECODER", raising=False)
    encoder = Encoder(model_dirs["qwen2"], device="cpu")
    seen = []
    runs_on = decoder_packed.runs_on
    monkeypatch.setattr(decoder_packed, "runs_on",
                        lambda device: seen.append(os.environ.get("KALM_PACKED_DECODER")) or runs_on(device))
    out = with_setting(encoder, None, VARIANTS["packed decoder"])(["hello", "a longer text"])
    assert len(out) == 2 and seen and set(seen) == {"all"} and "KALM_PACKED_DECODER" not in os.environ


def test_all_empty_batch(model_dirs):
    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    with torch.no_grad():
        out = model(model.pack([[], []]))
    assert out.shape == (2, model.hidden_size) and out.abs().max() == 0


def test_supports_only_decoder_families(model_dirs):
    from transformers import AutoModel, BertConfig

    for kind in KINDS:
        assert decoder_packed.supports(AutoModel.from_config(_config(kind)))
    bert = AutoModel.from_config(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64))
    assert not decoder_packed.supports(bert)
    gelu = _config("qwen2")
    gelu.hidden_act = "gelu"
    assert not decoder_packed.supports(AutoModel.from_config(gelu))
    partial = AutoModel.from_config(_config("llama"))  # rotary angles for half of each head (partial rotary)
    partial.rotary_emb.inv_freq = partial.rotary_emb.inv_freq[: partial.layers[0].self_attn.head_dim // 4]
    assert not decoder_packed.supports(partial)


def test_saved_directory_loads_bidirectionally_in_sentence_transformers(model_dirs, tmp_path):
    """``EmbeddingModel.save_pretrained`` writes a directory that sentence-transformers runs bidirectionally, as
    kalm_fast does: with padding in the batch and without it (batch of one, equal lengths), where transformers'
    SDPA would otherwise fall back to its causal flag."""
    from sentence_transformers import SentenceTransformer

    from kalm_fast.encode import Encoder

    EmbeddingModel.from_pretrained(model_dirs["qwen2-gqa14"], device="cpu").save_pretrained(tmp_path / "out")
    encoder = Encoder(tmp_path / "out", device="cpu")
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    texts = [t for t in TEXTS if t]
    want = torch.as_tensor(encoder.encode(texts))
    for batch_size in (32, 1):
        got = torch.as_tensor(st.encode(texts, batch_size=batch_size, normalize_embeddings=True))
        assert F.cosine_similarity(got, want).min() >= 0.9999, batch_size


def test_encoder_default_token_budget_for_decoders_on_cpu(model_dirs, monkeypatch):
    """Decoder LLMs on CPU batch ``DEFAULT_TOKENS["cpu-decoder"]`` tokens by default (chosen by the benchmark)."""
    from kalm_fast.encode import Encoder
    from kalm_fast.models import embedding
    from kalm_fast.models.packing import DEFAULT_TOKENS

    budgets = []
    batches = embedding.token_budget_batches
    monkeypatch.setattr(embedding, "token_budget_batches",
                        lambda lengths, budget, *a, **kw: budgets.append(budget) or batches(lengths, budget, *a, **kw))
    Encoder(model_dirs["qwen2"], device="cpu").encode(TEXTS)
    assert budgets == [DEFAULT_TOKENS["cpu-decoder"]]


def test_no_fast_path_where_its_weight_copy_does_not_fit(model_dirs, monkeypatch):
    """The fast path copies the linear weights (oneDNN's layout, fused Q/K/V): with too little memory free the model
    runs transformers' modules instead, says so once, and gives the same embeddings."""
    from kalm_fast.models import embedding

    model = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    want = model.embed(TEXTS)
    def fast_path(self, batch):
        raise AssertionError("the fast path ran")

    monkeypatch.setattr(decoder_packed.PackedDecoder, "__call__", fast_path)
    monkeypatch.setattr(embedding, "free_memory", lambda device: 1024)
    small = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    with pytest.warns(RuntimeWarning, match="running transformers' modules instead"):
        got = small.embed(TEXTS)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(embedding, "free_memory", lambda device: 2**40)
    big = EmbeddingModel.from_pretrained(model_dirs["qwen2"], device="cpu")
    with pytest.raises(AssertionError, match="the fast path ran"):  # taken where the copy fits
        big.embed(TEXTS)
