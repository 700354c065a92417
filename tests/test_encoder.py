"""Encoder: parity with SentenceTransformer on the embedded MiniLM, call shape, prompts, batching."""
import numpy as np
import pytest
import torch

from kalm_fast.cli.demo import DATA_DIR as DATA
from kalm_fast.encode import Encoder
from kalm_fast.models.packing import token_budget_batches
from kalm_fast.prompts import kalm_query_prompt


def varied_texts():
    corpus = [line.rstrip("\n") for line in open(DATA / "sample_corpus.txt", encoding="utf-8")]
    long_en = " ".join(corpus[:40])                        # far past max_seq_length (256 tokens)
    long_zh = "人工智能正在改变世界。" * 120
    emptyish = ["", " ", "\t", "\n", ".", "!!!", "🙂", "   spaces   around   "]
    return corpus + [long_en, long_zh, long_en[::-1]] + emptyish + [t.upper() for t in corpus[:20]]


@pytest.fixture(scope="module")
def encoder():
    return Encoder(device="cpu")


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    from kalm_fast.models.loading import default_model_dir

    return SentenceTransformer(str(default_model_dir()), device="cpu")


def test_parity_with_sentence_transformers(encoder, st_model):
    texts = varied_texts()
    assert len(texts) > 200
    got = encoder.encode(texts)
    want = st_model.encode(texts, normalize_embeddings=True)
    assert got.shape == want.shape == (len(texts), 384) and got.dtype == np.float32
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, (cos.min(), texts[int(cos.argmin())][:80])
    # the model ends in a Normalize module: unit vectors either way, as in sentence-transformers
    np.testing.assert_allclose(encoder.encode(texts[:30], normalize_embeddings=False), st_model.encode(texts[:30]),
                               atol=2e-4)


def test_batching_does_not_change_results(encoder):
    texts = varied_texts()[150:210]
    a = encoder.encode(texts)
    b = encoder.encode(texts, max_tokens_per_batch=200)
    c = encoder.encode(texts, batch_size=7)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_call_shapes(encoder):
    texts = ["first text", "second, longer text about something else", "third"]
    batch = encoder.encode(texts)
    one = encoder.encode("second, longer text about something else")
    assert one.shape == (384,)
    np.testing.assert_allclose(one, batch[1], atol=1e-5)
    tensor = encoder.encode(texts, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 384)
    assert isinstance(encoder.encode(texts, convert_to_numpy=False), list)
    assert encoder.encode([]).shape == (0, 384)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_truncate_dim_is_matryoshka(encoder):
    """As sentence-transformers: the model's Normalize module, then truncation, renormalized only if asked."""
    texts = ["matryoshka dolls nest inside each other", "a second sentence"]
    with torch.no_grad():
        full = encoder.model(encoder.model.tokenize(texts)).numpy()
    unit = full / np.linalg.norm(full, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(texts, truncate_dim=64), unit[:, :64], atol=1e-5)
    want = unit[:, :64] / np.linalg.norm(unit[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(texts, truncate_dim=64, normalize_embeddings=True), want, atol=1e-5)
    with pytest.raises(ValueError, match="truncate_dim"):
        encoder.encode(texts, truncate_dim=1000)


def test_prompts_and_kalm_query_format(encoder):
    task = "Given a question, retrieve passages that answer it"
    q = ["what is the tallest mountain"]
    want = encoder.encode([f"Instruct: {task} \n Query: {q[0]}"])
    np.testing.assert_allclose(encoder.encode_queries(q, task=task), want, atol=1e-6)
    np.testing.assert_allclose(encoder.encode(q, prompt=kalm_query_prompt(task)), want, atol=1e-6)
    assert not np.allclose(encoder.encode(q), want, atol=1e-3)
    docs = [{"title": "Everest", "text": "The highest mountain."}, "plain text doc"]
    np.testing.assert_allclose(encoder.encode_corpus(docs), encoder.encode(["Everest The highest mountain.",
                                                                           "plain text doc"]), atol=1e-6)
    with pytest.raises(ValueError, match="prompt_name"):
        encoder.encode(q, prompt_name="missing")
    prompted = Encoder(device="cpu", prompts={"query": "query: ", "passage": "passage: "})
    np.testing.assert_allclose(prompted.encode(q, prompt_name="query"), encoder.encode(["query: " + q[0]]), atol=1e-6)
    np.testing.assert_allclose(prompted.encode_query(q), encoder.encode(["query: " + q[0]]), atol=1e-6)
    np.testing.assert_allclose(prompted.encode_queries(q), encoder.encode(["query: " + q[0]]), atol=1e-6)
    # as sentence-transformers 6: "document" (always there, "" by default) comes before "passage"
    np.testing.assert_allclose(prompted.encode_document(q), encoder.encode(q), atol=1e-6)
    np.testing.assert_allclose(prompted.encode(q, prompt_name="passage"), encoder.encode(["passage: " + q[0]]),
                               atol=1e-6)


def test_bad_inputs(encoder):
    with pytest.raises(TypeError, match="item 1"):
        encoder.encode(["ok", 3])
    with pytest.raises(ValueError, match="not a local model directory"):
        Encoder("/no/such/model-dir")


def test_token_budget_batches_cover_every_index_once():
    lengths = [5, 1, 300, 0, 7, 7, 64, 2]
    batches = list(token_budget_batches(lengths, 16, max_sequences=3))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or sum(max(lengths[i], 1) for i in b) <= 16


def test_token_budget_batches_fill_the_budget_exactly():
    """Texts adding up to exactly max_tokens stay one batch: the budget is inclusive."""
    assert list(token_budget_batches([8, 8, 4, 4], 16)) == [[0, 1], [2, 3]]
    assert list(token_budget_batches([10, 6, 3], 16, max_sequences=2)) == [[0, 1], [2]]


def test_padded_batches_count_their_padding():
    """Batches that run right-padded (models with their own attention) cost texts x longest: a long text does not
    pull a crowd of short ones into a batch many times the budget."""
    assert list(token_budget_batches([10, 2, 2, 2, 2, 2], 16)) == [[0, 1, 2, 3], [4, 5]]
    assert list(token_budget_batches([10, 2, 2, 2, 2, 2], 16, padded=True)) == [[0], [1, 2, 3, 4, 5]]
    assert list(token_budget_batches([4, 4, 4, 4, 3], 16, padded=True)) == [[0, 1, 2, 3], [4]]
    assert list(token_budget_batches([20, 1], 16, padded=True)) == [[0], [1]]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no native bf16")
def test_bf16_close_to_fp32(encoder):
    texts = varied_texts()[:100]
    bf16 = Encoder(device="cpu", dtype="bfloat16")
    got = bf16.encode(texts)
    want = encoder.encode(texts)
    assert (got * want).sum(1).min() >= 0.999


def test_token_embeddings_come_back_in_input_order(encoder):
    """Batched longest first, each text's token embeddings still land at its own index (as encoded alone)."""
    texts = ["short", "a considerably longer text with quite a few more tokens in it", "", "mid length text here"]
    got = encoder.encode(texts, output_value="token_embeddings", max_tokens_per_batch=16)
    assert len(got) == len(texts)
    for text, tokens in zip(texts, got):
        want = encoder.encode(text, output_value="token_embeddings")
        assert tokens.shape == want.shape
        torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)


def test_truncate_dim_without_a_normalize_module(tmp_path):
    """A model without a Normalize module: truncation first, then normalization only if asked (as the fused pass)."""
    from train_utils import make_tiny_model

    enc = Encoder(make_tiny_model(tmp_path / "tiny"), device="cpu")
    assert not enc.model.normalize
    texts = ["matryoshka dolls nest inside each other", "a second sentence", "third"]
    with torch.no_grad():
        full = torch.stack([enc.model(enc.model.tokenize([t]))[0] for t in texts]).numpy()  # one text at a time
    np.testing.assert_allclose(enc.encode(texts, truncate_dim=8), full[:, :8], atol=1e-5)
    want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(enc.encode(texts, truncate_dim=8, normalize_embeddings=True), want, atol=1e-5)


def test_query_prompt_reaches_the_model_verbatim(encoder, monkeypatch):
    """The exact KaLM query string (its spaces and newline: MiniLM's tokenizer would not tell them apart, a Qwen
    tokenizer does) is what the model embeds; documents get no instruction."""
    task, q = "Given a question, retrieve passages that answer it", "what is the tallest mountain"
    seen = []
    real = encoder.model.embed
    monkeypatch.setattr(encoder.model, "embed", lambda texts, **kw: seen.append(list(texts)) or real(texts, **kw))
    encoder.encode_queries([q], task=task)
    encoder.encode_corpus([{"title": "Everest", "text": "The highest mountain."}])
    assert seen == [["Instruct: " + task + " \n Query: " + q], ["Everest The highest mountain."]]


def test_encode_corpus_uses_the_document_prompt_not_the_query_prompt(encoder):
    prompted = Encoder(device="cpu", prompts={"query": "query: ", "document": "doc: "})
    docs = [{"title": "Everest", "text": "The highest mountain."}, "plain text doc"]
    want = encoder.encode(["doc: Everest The highest mountain.", "doc: plain text doc"])
    np.testing.assert_allclose(prompted.encode_corpus(docs), want, atol=1e-6)
    np.testing.assert_allclose(prompted.encode_queries(["tallest?"]), encoder.encode(["query: tallest?"]), atol=1e-6)


def test_include_prompt_false_leaves_exactly_the_prompt_out(st_model):
    """Pooling without the prompt's tokens (BERT: the prompt alone is [CLS] ... [SEP]; the [SEP] is not the
    prompt's), as sentence-transformers pools them."""
    from sentence_transformers import SentenceTransformer

    from kalm_fast.models.loading import default_model_dir

    st = SentenceTransformer(str(default_model_dir()), device="cpu")
    st[1].include_prompt = False
    enc = Encoder(device="cpu")
    enc.model.include_prompt = False
    texts = ["what is the tallest mountain", "a", "rivers of the world and where they flow"]
    want = st.encode(texts, prompt="query: ")
    np.testing.assert_allclose(enc.encode(texts, prompt="query: "), want, atol=2e-5)
    assert not np.allclose(want, st_model.encode(texts, prompt="query: "), atol=1e-3)  # the prompt's tokens matter


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(inputs=123), TypeError, "inputs must be a string or a list of strings, got int"),
    (dict(inputs={"text": "a"}), TypeError, "inputs must be a string or a list of strings, got dict"),
    (dict(inputs=b"a"), TypeError, "inputs must be a string or a list of strings, got bytes"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(batch_size=2.5), ValueError, "batch_size must be a positive int"),
    (dict(batch_size=True), ValueError, "batch_size must be a positive int"),
    (dict(batch_size="32"), ValueError, "batch_size must be a positive int"),
    (dict(max_tokens_per_batch=2.5), ValueError, "max_tokens_per_batch must be a positive int"),
    (dict(max_tokens_per_batch="4096"), ValueError, "max_tokens_per_batch must be a positive int"),
    (dict(prompt=5), TypeError, "prompt must be a string"),
    (dict(prompt=["q: "]), TypeError, "prompt must be a string"),
    (dict(device="cuda:99"), ValueError, "device 'cuda:99'"),
    (dict(device="banana"), ValueError, "device 'banana' is not a device name"),
])
def test_bad_encode_arguments_name_the_argument(encoder, kwargs, error, match):
    with pytest.raises(error, match=match):
        encoder.encode(**{"inputs": ["a", "b"], **kwargs})


def test_numpy_int_batch_size_and_prompt_with_prompt_name(encoder):
    """numpy ints are ints; prompt and prompt_name together warn and take prompt, as sentence-transformers does."""
    np.testing.assert_allclose(encoder.encode(["a", "b"], batch_size=np.int64(1)), encoder.encode(["a", "b"]),
                               atol=1e-6)
    with pytest.warns(UserWarning, match="prompt_name 'query' is ignored"):
        got = encoder.encode(["a"], prompt="x: ", prompt_name="query")
    np.testing.assert_allclose(got, encoder.encode(["x: a"]), atol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompts="query: "), TypeError, "prompts must be a dict of prompt name -> prefix string"),
    (dict(prompts={"query": None}), TypeError, "prompts must be a dict of prompt name -> prefix string"),
    (dict(attn_backend="flash"), ValueError, "attn_backend must be one of"),
    (dict(device="cuda:99"), ValueError, "device 'cuda:99'"),
    (dict(device="mps"), ValueError, "device 'mps'"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        Encoder(**kwargs)


def test_encode_corpus_and_queries_check_their_arguments(encoder):
    one = encoder.encode_corpus("The highest mountain.")
    assert one.shape == (384,)
    np.testing.assert_allclose(one, encoder.encode_document("The highest mountain."), atol=1e-6)
    np.testing.assert_allclose(encoder.encode_corpus({"title": "Everest", "text": "The highest mountain."}),
                               encoder.encode_document("Everest The highest mountain."), atol=1e-6)
    for bad in ([{"title": "no text"}], [None], [{"text": 5}]):
        with pytest.raises(TypeError, match="corpus item 0 must be a string or a dict with a string 'text'"):
            encoder.encode_corpus(bad)
    for task in (5, "", " "):
        with pytest.raises(ValueError, match="task must be a non-empty string"):
            encoder.encode_queries(["q"], task=task)
    with pytest.raises(ValueError, match="pass task, prompt or prompt_name, not several"):
        encoder.encode_queries(["q"], task="t", prompt="x: ")


def test_similarity_checks_its_embeddings(encoder, tmp_path):
    emb = encoder.encode(["a", "b"])
    with pytest.raises(TypeError, match="embeddings1 must be embeddings"):
        encoder.similarity(["a"], emb)
    with pytest.raises(ValueError, match="embeddings1 and embeddings2 must have the same dimension D, got 384 and 128"):
        encoder.similarity(emb, emb[:, :128])
    with pytest.raises(ValueError, match="embeddings1 and embeddings2 must hold as many embeddings"):
        encoder.similarity_pairwise(emb, np.vstack([emb, emb[:1]]))
    q8 = encoder.encode(["a", "b", "c"], precision="int8")  # quantized embeddings compare as float32
    torch.testing.assert_close(encoder.similarity(q8, q8), encoder.similarity(q8.astype(np.float32),
                                                                              q8.astype(np.float32)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file; save writes a model directory"):
        encoder.save(tmp_path / "file")
    with pytest.raises(TypeError, match=r"directory must be a path \(str or os.PathLike\), got NoneType"):
        encoder.save(None)
