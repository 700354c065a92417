"""sentence-transformers parity: every layout from 2.x to 6.x loads with the same settings, the same embeddings for
the same arguments (an encoder and a bidirectional decoder), its call shapes, its evaluators on an ``Encoder``.

Layouts are written by the installed sentence-transformers' own ``save`` where it can, by hand for older ones.
"""
import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import BPE_TOKENIZER, skip_unless_transformers_reads_is_causal, skip_unless_transformers_runs
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

from kalm_fast.cli.demo import DATA_DIR
from kalm_fast.encode import Encoder, quantize_embeddings
from kalm_fast.models.loading import default_model_dir

QUERY = "Instruct: Given a question, retrieve passages that answer it \n Query: "
TEXTS = [line.rstrip("\n") for line in open(DATA_DIR / "sample_corpus.txt", encoding="utf-8")][:6] + [
    "", " ", "x", "🙂 emoji", "人工智能正在改变世界。" * 30, "A LONGER TEXT, IN CAPITALS, WITH SEVERAL CLAUSES " * 4]


def _old_modules(*kinds):
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    return [dict(idx=i, name=str(i), path=paths[k], type=f"sentence_transformers.models.{k}")
            for i, k in enumerate(kinds)]


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _link_files(src, dst):
    """A copy of a Hugging Face directory's files as symbolic links (no 90 MB copies)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors", ".txt") and f.name not in (
                "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
            os.symlink(f, dst / f.name)
    return dst


def _save_spread(model, directory, tokenizer=None):
    """Save a random-init transformers ``model`` with its weights spread out (random init gives near-identical
    tokens) and ``tokenizer`` (default: the committed BPE one) to ``directory``."""
    from transformers import AutoTokenizer

    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.save_pretrained(str(directory))
    (tokenizer or AutoTokenizer.from_pretrained(str(BPE_TOKENIZER))).save_pretrained(str(directory))


@pytest.fixture(scope="module")
def decoder_hf(tmp_path_factory):
    """A tiny random Qwen2 with the committed BPE tokenizer, its config marked bidirectional (``is_causal: false``),
    which is how sentence-transformers runs such a decoder without its causal mask."""
    from transformers import AutoModel, Qwen2Config

    directory = tmp_path_factory.mktemp("qwen2-hf")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    config.is_causal = False
    model = AutoModel.from_config(config)
    _save_spread(model, directory)
    return directory


def _st6_minilm(tmp):
    """sentence-transformers 6's own save: new module paths, pooling_mode, max length in the tokenizer config."""
    model = SentenceTransformer(str(default_model_dir()), device="cpu", prompts={"query": "query: "},
                                default_prompt_name="query", truncate_dim=128, similarity_fn_name="dot")
    model.max_seq_length = 100
    model.save(str(tmp))
    return tmp


def _st6_decoder(tmp, decoder_hf):
    """sentence-transformers 6's own save of a decoder that pools without the prompt (include_prompt false)."""
    modules = [Transformer(str(decoder_hf), max_seq_length=48), Pooling(64, pooling_mode="mean", include_prompt=False)]
    SentenceTransformer(modules=modules, device="cpu", prompts={"query": QUERY},
                        similarity_fn_name="euclidean").save(str(tmp))
    return tmp


def _st5_decoder(tmp, decoder_hf):
    """By hand, as 3.x-5.x save: Transformer at the root, one boolean per pooling mode, max_seq_length and
    do_lower_case in sentence_bert_config.json, prompts and similarity_fn_name."""
    _link_files(decoder_hf, tmp)
    _write_json(tmp / "modules.json", _old_modules("Transformer", "Pooling"))
    _write_json(tmp / "1_Pooling" / "config.json", dict(
        word_embedding_dimension=64, pooling_mode_cls_token=False, pooling_mode_mean_tokens=True,
        pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False, pooling_mode_weightedmean_tokens=False,
        pooling_mode_lasttoken=False, include_prompt=False))
    _write_json(tmp / "sentence_bert_config.json", dict(max_seq_length=40, do_lower_case=True))
    _write_json(tmp / "config_sentence_transformers.json", dict(
        __version__=dict(sentence_transformers="3.0.1"), prompts={"query": QUERY, "passage": "passage: "},
        default_prompt_name=None, similarity_fn_name="manhattan"))
    return tmp


def _st2_minilm(tmp):
    """By hand, as 2.x saved: the Transformer in 0_Transformer/ with its own config, pooling booleans without
    include_prompt, a Normalize module, no config_sentence_transformers.json."""
    _link_files(default_model_dir(), tmp / "0_Transformer")
    _write_json(tmp / "0_Transformer" / "sentence_bert_config.json", dict(max_seq_length=200, do_lower_case=False))
    modules = _old_modules("Transformer", "Pooling", "Normalize")
    modules[0]["path"] = "0_Transformer"
    _write_json(tmp / "modules.json", modules)
    _write_json(tmp / "1_Pooling" / "config.json", dict(
        word_embedding_dimension=384, pooling_mode_cls_token=False, pooling_mode_mean_tokens=True,
        pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False))
    (tmp / "2_Normalize").mkdir()
    return tmp


BGE_QUERY = "Represent this sentence for searching relevant passages: "


def _st6_minilm_cls(tmp):
    """A BGE-style model as sentence-transformers 6 saves it: CLS pooling, Normalize, a query prompt."""
    modules = [Transformer(str(default_model_dir()), max_seq_length=128), Pooling(384, pooling_mode="cls"),
               Normalize()]
    SentenceTransformer(modules=modules, device="cpu", prompts={"query": BGE_QUERY}).save(str(tmp))
    return tmp


def _st2_minilm_cls(tmp):
    """The 2.x layout by hand with CLS pooling (``pooling_mode_cls_token``, the mean off)."""
    _st2_minilm(tmp)
    _edit_json(tmp / "1_Pooling" / "config.json", pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    return tmp


LAYOUTS = {
    "st2-minilm-0_Transformer": lambda tmp, dec: _st2_minilm(tmp),
    "st2-minilm-cls": lambda tmp, dec: _st2_minilm_cls(tmp),
    "st6-minilm-cls-saved": lambda tmp, dec: _st6_minilm_cls(tmp),
    "st5-decoder-by-hand": _st5_decoder,
    "st6-minilm-saved": lambda tmp, dec: _st6_minilm(tmp),
    "st6-decoder-saved": _st6_decoder,
    "plain-hf-decoder": lambda tmp, dec: dec,
}


def _assert_same(got, want, what):
    """Same vectors as sentence-transformers: cosine >= 0.9999 and the same norms (zero vectors where it has them)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    g, w = np.linalg.norm(got, axis=-1), np.linalg.norm(want, axis=-1)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"norms differ: {what}")
    real = w > 1e-6
    cos = (got[real] * want[real]).sum(-1) / g[real] / w[real]
    assert cos.min() >= 0.9999, (what, cos.min())


def _assert_same_settings(enc, ref):
    assert enc.max_seq_length == ref.max_seq_length
    assert enc.prompts == ref.prompts
    assert enc.default_prompt_name == ref.default_prompt_name
    assert enc.similarity_fn_name == ref.similarity_fn_name
    assert enc.truncate_dim == ref.truncate_dim
    assert enc.get_embedding_dimension() == ref.get_embedding_dimension()
    assert enc.model.include_prompt == ref[1].include_prompt
    assert enc.model.normalize == any(isinstance(m, Normalize) for m in ref)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_with_sentence_transformers_settings_and_results(layout, tmp_path, decoder_hf):
    directory = LAYOUTS[layout](tmp_path / "model", decoder_hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sentence-transformers' deprecation notes on old layouts
        ref = SentenceTransformer(str(directory), device="cpu")
    enc = Encoder(directory, device="cpu")
    _assert_same_settings(enc, ref)
    for method in ("encode", "encode_document"):  # the default prompt, if any, and the "document" one
        _assert_same(getattr(enc, method)(TEXTS), getattr(ref, method)(TEXTS), f"{layout} {method}")


def _st6_with(tmp, decoder_hf, *modules_after, **pooling):
    SentenceTransformer(modules=[Transformer(str(decoder_hf)), Pooling(64, **pooling), *modules_after],
                        device="cpu").save(str(tmp))
    return tmp


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _st5(tmp, decoder_hf, file, **changes):
    _st5_decoder(tmp, decoder_hf)
    _edit_json(tmp / file, **changes)
    return tmp


def _legacy_cls_only(tmp, decoder_hf):
    _st5_decoder(tmp, decoder_hf)
    _write_json(tmp / "1_Pooling" / "config.json", dict(word_embedding_dimension=64, pooling_mode_cls_token=True))
    return tmp


def _custom_module(tmp, decoder_hf):
    _st5_decoder(tmp, decoder_hf)
    modules = _old_modules("Transformer", "Pooling") + [dict(idx=2, name="2", path="2_X", type="my_pkg.Pooling")]
    _write_json(tmp / "modules.json", modules)
    return tmp


def _no_pooling_config(tmp, decoder_hf):
    _st5_decoder(tmp, decoder_hf)
    (tmp / "1_Pooling" / "config.json").unlink()
    return tmp


def _reorder_normalize(tmp, decoder_hf):
    _st6_with(tmp, decoder_hf, Normalize())
    modules = json.loads((tmp / "modules.json").read_text())
    modules[1]["type"], modules[2]["type"] = modules[2]["type"], modules[1]["type"]
    (tmp / "modules.json").write_text(json.dumps(modules))
    return tmp


def _dense_residual(tmp, decoder_hf):
    return _dense_edited(tmp, decoder_hf, use_residual=True)


def _dense_edited(tmp, decoder_hf, _replace=False, **changes):
    """A Dense module whose config gets ``changes`` (``_replace=None``: the config becomes a list)."""
    _st6_with(tmp, decoder_hf, Dense(64, 8))
    path = tmp / "2_Dense" / "config.json"
    if _replace is None:
        path.write_text("[]")
    else:
        _edit_json(path, **changes)
    return tmp


def _dense_pickled(tmp, decoder_hf):
    _st6_with(tmp, decoder_hf, Dense(64, 8))
    (tmp / "2_Dense" / "model.safetensors").rename(tmp / "2_Dense" / "pytorch_model.bin")
    return tmp


UNSUPPORTED = {  # layout -> (builder, the message naming the file and the key)
    "cls-pooling-without-prompt": (lambda t, d: _st6_with(t, d, pooling_mode="cls", include_prompt=False),
                                   r"1_Pooling/config.json: cls pooling with include_prompt false"),
    "lasttoken-pooling-without-prompt": (lambda t, d: _st6_with(t, d, pooling_mode="lasttoken", include_prompt=False),
                                         r"1_Pooling/config.json: lasttoken pooling with include_prompt false"),
    "mean+max-pooling": (lambda t, d: _st6_with(t, d, pooling_mode=("mean", "max")), r"pooling_mode \["),
    "legacy-cls-without-the-mean-key": (_legacy_cls_only, r"1_Pooling/config.json: pooling_mode_cls_token is true but "
                                                          r"pooling_mode_mean_tokens is missing"),
    "legacy-cls+mean-pooling": (lambda t, d: _st5(t, d, "1_Pooling/config.json", pooling_mode_cls_token=True),
                                r"1_Pooling/config.json: pooling_mode_cls_token and pooling_mode_mean_tokens are "
                                r"true"),
    "legacy-max-pooling": (lambda t, d: _st5(t, d, "1_Pooling/config.json", pooling_mode_max_tokens=True),
                           r"pooling_mode_max_tokens is true"),
    "dense-activation": (lambda t, d: _st6_with(t, d, Dense(64, 8, activation_function=torch.nn.Softplus())),
                         r"2_Dense/config.json: activation_function 'torch.nn.modules.activation.Softplus'"),
    "dense-residual": (_dense_residual, r"2_Dense/config.json: use_residual True is not supported"),
    "dense-pickled": (_dense_pickled, r"2_Dense/pytorch_model.bin: a Dense module's weights are pickled"),
    "dense-input": (lambda t, d: _dense_edited(t, d, module_input_name="token_embeddings"),
                    r"2_Dense/config.json: module_input_name 'token_embeddings' is not supported"),
    "dense-in-features": (lambda t, d: _dense_edited(t, d, in_features=48),
                          r"2_Dense/config.json: in_features 48 does not match the Pooling's word_embedding_dimension"),
    "dense-config-list": (lambda t, d: _dense_edited(t, d, None), r"2_Dense/config.json: expected a JSON object"),
    "dense-after-normalize": (lambda t, d: _st6_with(t, d, Normalize(), Dense(64, 8)),
                              r"modules.json: module 3 has type '.*Dense'"),
    "normalize-before-pooling": (_reorder_normalize, r"modules.json: module 1 has type '.*Normalize'"),
    "custom-module": (_custom_module, r"modules.json: module 2 has type 'my_pkg.Pooling'"),
    "similarity-maxsim": (lambda t, d: _st5(t, d, "config_sentence_transformers.json", similarity_fn_name="maxsim"),
                          r"config_sentence_transformers.json: similarity_fn_name 'maxsim'"),
    "default-prompt-missing": (lambda t, d: _st5(t, d, "config_sentence_transformers.json",
                                                 default_prompt_name="classification"),
                               r"config_sentence_transformers.json: default_prompt_name 'classification'"),
    "sparse-encoder": (lambda t, d: _st5(t, d, "config_sentence_transformers.json", model_type="SparseEncoder"),
                       r"config_sentence_transformers.json: model_type 'SparseEncoder'"),
    "truncate-dim-string": (lambda t, d: _st5(t, d, "config_sentence_transformers.json", truncate_dim="64"),
                            r"config_sentence_transformers.json: truncate_dim"),
    "classification-task": (lambda t, d: _st5(t, d, "sentence_bert_config.json",
                                              transformer_task="sequence-classification"),
                            r"sentence_bert_config.json: transformer_task 'sequence-classification'"),
    "eos-token-added": (lambda t, d: _st5(t, d, "sentence_bert_config.json", tokenizer_args={"add_eos_token": True}),
                        r"sentence_bert_config.json: tokenizer_args \['add_eos_token'\]"),
    "processing-kwargs": (lambda t, d: _st5(t, d, "sentence_bert_config.json",
                                            processing_kwargs={"text": {"padding_side": "left"}}),
                          r"sentence_bert_config.json: processing_kwargs\['text'\]"),
    "no-pooling-config": (_no_pooling_config, r"1_Pooling/config.json is missing"),
    "text-by-another-method": (lambda t, d: _st5(t, d, "sentence_bert_config.json", modality_config={
        "text": {"method": "get_text_features", "method_output_name": None}}),
        r"sentence_bert_config.json: modality_config \{'text': \{'method': 'get_text_features'"),
}


@pytest.mark.parametrize("layout", list(UNSUPPORTED))
def test_what_kalm_fast_cannot_run_is_a_clear_error_naming_file_and_key(layout, tmp_path, decoder_hf):
    build, message = UNSUPPORTED[layout]
    directory = build(tmp_path / "model", decoder_hf)
    with pytest.raises(ValueError, match=message):
        Encoder(directory, device="cpu")


def test_max_length_wherever_it_lives(tmp_path, decoder_hf):
    """sentence_bert_config's max_seq_length, else 6.x's processing max_length, else the tokenizer's
    model_max_length capped by the position embeddings; the Encoder's max_length caps it further."""
    d = _st5_decoder(tmp_path / "a", decoder_hf)
    assert Encoder(d, device="cpu").max_length == 40
    assert Encoder(d, device="cpu", max_length=16).max_length == 16
    _edit_json(d / "sentence_bert_config.json", max_seq_length=None, processing_kwargs={"text": {"max_length": 24}})
    assert Encoder(d, device="cpu").max_length == 24
    assert Encoder(decoder_hf, device="cpu").max_length == 128  # tokenizer 32768, 128 positions


@pytest.fixture(scope="module", params=["minilm", "qwen2-bidirectional"])
def pair(request, tmp_path_factory, decoder_hf):
    """(Encoder, SentenceTransformer) on the same directory: the embedded MiniLM (ends in Normalize) and a
    bidirectional decoder saved by sentence-transformers 6 that pools without the prompt."""
    if request.param == "minilm":
        directory = default_model_dir()
    else:
        directory = _st6_decoder(tmp_path_factory.mktemp("qwen2-st6"), decoder_hf)
    prompts = {"query": QUERY, "classification": "Classify the sentiment: "}
    enc, ref = Encoder(directory, device="cpu", prompts=prompts), SentenceTransformer(str(directory), device="cpu",
                                                                                      prompts=prompts)
    _assert_same_settings(enc, ref)
    return enc, ref


OPTIONS = {
    "defaults": {},
    "normalize": dict(normalize_embeddings=True),
    "prompt+batch_size": dict(prompt="Represent this sentence: ", batch_size=3),
    "truncate_dim": dict(truncate_dim=32),
    "truncate_dim+normalize": dict(truncate_dim=32, normalize_embeddings=True),
    "prompt+truncate_dim+normalize": dict(prompt_name="classification", truncate_dim=48, normalize_embeddings=True),
}
SHORT = TEXTS[:-2] + TEXTS[-1:]  # truncation is checked per layout above; the matrix leaves out the longest text


@pytest.mark.parametrize("option", list(OPTIONS))
def test_same_embeddings_as_sentence_transformers(pair, option):
    enc, ref = pair
    kwargs = OPTIONS[option]
    _assert_same(enc.encode(SHORT, **kwargs), ref.encode(SHORT, **kwargs), option)
    if option == "defaults":
        for method in ("encode_query", "encode_document"):
            _assert_same(getattr(enc, method)(SHORT), getattr(ref, method)(SHORT), method)


def test_defaults_and_model_settings_as_sentence_transformers(tmp_path, decoder_hf):
    """Constructor truncate_dim / default_prompt_name / similarity_fn_name, and what Encoder.save writes, are
    sentence-transformers' too."""
    d = _st6_decoder(tmp_path / "d", decoder_hf)
    kwargs = dict(truncate_dim=16, default_prompt_name="query", similarity_fn_name="dot")
    enc, ref = Encoder(d, device="cpu", **kwargs), SentenceTransformer(str(d), device="cpu", **kwargs)
    _assert_same(enc.encode(TEXTS), ref.encode(TEXTS), "constructor settings")
    np.testing.assert_allclose(np.linalg.norm(enc.encode(TEXTS[:5], normalize_embeddings=True), axis=1), 1, atol=1e-5)
    assert enc.get_embedding_dimension() == ref.get_embedding_dimension() == 16
    enc.save(tmp_path / "saved")
    again, ref_again = Encoder(tmp_path / "saved", device="cpu"), SentenceTransformer(str(tmp_path / "saved"),
                                                                                      device="cpu")
    for model in (again, ref_again):
        assert (model.truncate_dim, model.default_prompt_name, model.similarity_fn_name) == (16, "query", "dot")
        assert model.prompts == enc.prompts and model.max_seq_length == 48
    assert ref_again[1].include_prompt is False
    _assert_same(again.encode(TEXTS), ref_again.encode(TEXTS), "saved by Encoder.save")
    _assert_same(again.encode(TEXTS), enc.encode(TEXTS), "reloaded")


def test_cls_pooling_as_sentence_transformers_and_saved_back(tmp_path, decoder_hf):
    """A BGE-style model (CLS pooling): queries with their prompt, truncation, a save by kalm_fast that
    sentence-transformers loads as CLS again; a soup refuses to average it with a mean-pooled model; a decoder (no
    [CLS] token) is refused."""
    from kalm_fast import model_soup
    from kalm_fast.models import EmbeddingModel

    d = _st6_minilm_cls(tmp_path / "bge")
    enc, ref = Encoder(d, device="cpu"), SentenceTransformer(str(d), device="cpu")
    assert enc.model.pooling == "cls"
    _assert_same(enc.encode_query(TEXTS), ref.encode_query(TEXTS), "cls queries")
    _assert_same(enc.encode(TEXTS, truncate_dim=64), ref.encode(TEXTS, truncate_dim=64), "cls truncated")
    mean = Encoder(_st2_minilm(tmp_path / "mean"), device="cpu")
    assert np.abs(enc.encode(TEXTS[:3]) - mean.encode(TEXTS[:3])).max() > 1e-2  # not the mean
    mean.save(tmp_path / "mean_saved")
    enc.save(tmp_path / "saved")
    pooling = json.loads((tmp_path / "saved" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    again = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    _assert_same(Encoder(tmp_path / "saved", device="cpu").encode(TEXTS), again.encode(TEXTS), "cls saved")
    with pytest.raises(ValueError, match=r"embed differently \(pooling: 'cls' and 'mean'\)"):
        model_soup([tmp_path / "saved", tmp_path / "mean_saved"], output=tmp_path / "soup")
    with pytest.raises(ValueError, match="CLS pooling is for encoders .* a qwen2 decoder has none"):
        EmbeddingModel.from_pretrained(_st6_with(tmp_path / "dec", decoder_hf, pooling_mode="cls"), device="cpu")
    with pytest.raises(ValueError, match="prompt_length .* this model pools by cls"):
        enc.model(enc.model.tokenize(["x y"]), prompt_length=1)
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'cls', 'lasttoken'\), got 'max'"):
        EmbeddingModel(enc.model.model, enc.model.tokenizer, pooling="max")


def test_last_token_pooling_runs_a_decoder_causally_as_sentence_transformers(tmp_path):
    """A Qwen3-Embedding-style model (a causal Qwen3 checkpoint, last-token pooling, Normalize, an instruction
    prompt) runs causally, as sentence-transformers runs it: the same embeddings, packed or padded, in the packed
    inference path and in transformers' modules (training); saved back without ``is_causal: false``. With its config
    saying ``is_causal: false`` the same model runs bidirectionally, there as here."""
    from transformers import AutoModel, Qwen3Config

    from kalm_fast.models import EmbeddingModel

    torch.manual_seed(0)
    llm = AutoModel.from_config(Qwen3Config(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            max_position_embeddings=128, pad_token_id=0))
    _save_spread(llm, tmp_path / "llm")
    modules = [Transformer(str(tmp_path / "llm")), Pooling(64, pooling_mode="lasttoken"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu", prompts={"query": QUERY}).save(str(tmp_path / "q3e"))
    texts = [t for t in TEXTS if t.strip()]  # a text with no token has no last token (zeros here)
    enc, ref = Encoder(tmp_path / "q3e", device="cpu"), SentenceTransformer(str(tmp_path / "q3e"), device="cpu")
    assert enc.model.causal and enc.model.pooling == "lasttoken"
    _assert_same(enc.encode_query(texts), ref.encode_query(texts), "lasttoken queries")
    _assert_same(enc.encode(texts), ref.encode(texts), "lasttoken documents")
    model = EmbeddingModel.from_pretrained(tmp_path / "q3e", device="cpu")
    with torch.no_grad():
        packed = model(model.tokenize(texts[:4]))
        ids = model.token_ids(texts[:4])
        width = max(map(len, ids))
        padded = model(dict(input_ids=torch.tensor([x + [0] * (width - len(x)) for x in ids]),
                            attention_mask=torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])))
        torch.testing.assert_close(padded, packed, atol=2e-5, rtol=2e-5)
        # transformers' own padded forward (left padding, as Qwen3-Embedding's tokenizer pads): the attention
        # function's padded branch, causal too
        left = model.model(input_ids=torch.tensor([[0] * (width - len(x)) + x for x in ids]),
                           attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]))
        torch.testing.assert_close(left.last_hidden_state[:, -1], packed, atol=2e-5, rtol=2e-5)
        model.train()
        torch.testing.assert_close(model(model.tokenize(texts[:4])), packed, atol=2e-5, rtol=2e-5)
    enc.save(tmp_path / "saved")
    assert "is_causal" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    _assert_same(Encoder(tmp_path / "saved", device="cpu").encode(texts),
                 SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(texts), "lasttoken saved")
    _edit_json(tmp_path / "q3e" / "config.json", is_causal=False)
    bidirectional = Encoder(tmp_path / "q3e", device="cpu")
    assert not bidirectional.model.causal
    _assert_same(bidirectional.encode(texts), SentenceTransformer(str(tmp_path / "q3e"), device="cpu").encode(texts),
                 "lasttoken, is_causal false")
    assert np.abs(bidirectional.encode(texts) - enc.encode(texts)).max() > 1e-2
    bidirectional.save(tmp_path / "bidirectional_saved")
    from kalm_fast import model_soup

    with pytest.raises(ValueError, match=r"embed differently \(attention: 'causal' and 'bidirectional'\)"):
        model_soup([tmp_path / "saved", tmp_path / "bidirectional_saved"], output=tmp_path / "soup")
    _edit_json(tmp_path / "q3e" / "config.json", is_causal=True, use_bidirectional_attention=True)
    assert Encoder(tmp_path / "q3e", device="cpu").model.causal  # a key only Gemma reads


def test_a_model_without_normalize_is_not_normalized_by_default(pair):
    enc, ref = pair
    norms = np.linalg.norm(enc.encode(SHORT[:6]), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(ref.encode(SHORT[:6]), axis=1), rtol=1e-4)
    assert np.allclose(norms, 1, atol=1e-4) == enc.model.normalize


def test_precision_gives_sentence_transformers_bytes(pair):
    from sentence_transformers.util import quantize_embeddings as st_quantize

    enc, ref = pair
    floats, ours_floats = ref.encode(SHORT), enc.encode(SHORT)
    for precision in ("int8", "uint8", "binary", "ubinary"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few embeddings to calibrate int8 on
            want = st_quantize(floats, precision)
            got = quantize_embeddings(floats, precision)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # the same bytes for the same floats
        ours = enc.encode(SHORT, precision=precision)
        np.testing.assert_array_equal(ours, quantize_embeddings(ours_floats, precision))
        if precision.endswith("int8"):  # end to end the floats differ by ~1e-7: at most one bucket, at bucket edges
            assert np.abs(ours.astype(np.int16) - want.astype(np.int16)).max() <= 1
        else:  # every sign bit of a coordinate away from zero agrees
            bits = lambda x: np.unpackbits(x.view(np.uint8), axis=-1)[:, :floats.shape[1]]  # noqa: E731
            clear = np.abs(floats) > 1e-5
            np.testing.assert_array_equal(bits(ours)[clear], bits(want)[clear])


def test_similarity_by_similarity_fn_name(pair):
    enc, ref = pair
    a, b = ref.encode(SHORT[:5]), ref.encode(SHORT[5:10])
    try:
        for name in ("cosine", "dot", "euclidean", "manhattan"):
            enc.similarity_fn_name = ref.similarity_fn_name = name
            torch.testing.assert_close(enc.similarity(a, b), ref.similarity(a, b), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(enc.similarity(a[0], torch.from_numpy(b)), ref.similarity(a[0], b),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(enc.similarity_pairwise(a[:5], b), ref.similarity_pairwise(a[:5], b),
                                       atol=1e-5, rtol=1e-5)
    finally:
        enc.model.similarity_fn_name = ref.similarity_fn_name = None
    with pytest.raises(ValueError, match="similarity_fn_name"):
        enc.similarity_fn_name = "maxsim"


def test_token_embeddings_as_sentence_transformers(pair):
    enc, ref = pair
    texts = [t for t in SHORT if t]  # sentence-transformers gives an empty text one padding row
    got = enc.encode(texts, output_value="token_embeddings", prompt_name="query")
    want = ref.encode(texts, output_value="token_embeddings", prompt_name="query")
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), atol=2e-4, rtol=2e-4)
    one = enc.encode(texts[0], output_value="token_embeddings")
    assert isinstance(one, torch.Tensor) and one.dim() == 2


def test_call_shapes(pair):
    enc, ref = pair
    H = enc.get_embedding_dimension()
    batch = enc.encode(inputs=TEXTS[:3])
    np.testing.assert_allclose(enc.encode(sentences=TEXTS[:3]), batch)
    np.testing.assert_allclose(enc.encode(TEXTS[1]), batch[1], atol=1e-6)
    assert enc.encode(TEXTS[1]).shape == (H,)
    tensor = enc.encode(TEXTS[:3], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, H)
    listed = enc.encode(TEXTS[:3], convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 3 and listed[0].shape == (H,)
    one, want = enc.encode(TEXTS[1], convert_to_numpy=False), ref.encode(TEXTS[1], convert_to_numpy=False)
    assert isinstance(one, torch.Tensor) and isinstance(want, torch.Tensor) and one.shape == want.shape == (H,)
    assert enc.encode([], output_value="token_embeddings") == []
    np.testing.assert_allclose(enc.encode_queries(TEXTS[:3]), enc.encode_query(TEXTS[:3]))
    np.testing.assert_allclose(enc.encode_corpus(TEXTS[:3]), enc.encode_document(TEXTS[:3]))
    for bad, match in ((dict(precision="int4"), "precision"), (dict(output_value=None), "output_value"),
                       (dict(truncate_dim=0), "truncate_dim"), (dict(prompt_name="nope"), "prompt_name")):
        with pytest.raises(ValueError, match=match):
            enc.encode(TEXTS[:3], **bad)
    with pytest.raises(ValueError, match="at least 2"):
        enc.encode(TEXTS[0], precision="int8")


def test_max_seq_length_can_be_set_as_in_sentence_transformers(pair, tmp_path):
    enc, ref = pair
    longest = enc.max_seq_length
    try:
        enc.max_seq_length = ref.max_seq_length = 8
        long_text = TEXTS[-1]
        np.testing.assert_allclose(enc.encode([long_text]), ref.encode([long_text]), atol=2e-5)
        assert len(enc.model.token_ids([long_text])[0]) == 8
        enc.save(tmp_path / "kalm")  # saved with it, as sentence-transformers saves it
        ref.save(str(tmp_path / "st"))
        assert Encoder(tmp_path / "kalm").max_seq_length == Encoder(tmp_path / "st").max_seq_length == 8
        assert SentenceTransformer(str(tmp_path / "kalm")).max_seq_length == 8
    finally:
        enc.max_seq_length = ref.max_seq_length = longest
    assert enc.get_max_seq_length() == ref.get_max_seq_length() == longest
    assert enc.to("cpu") is enc and enc.to(torch.float64).model.model.dtype == torch.float64
    with pytest.raises(TypeError, match="the model's weights are torch.float64; encode runs float32, float16 or"):
        enc.encode(TEXTS)
    enc.to(torch.float32)
    for bad in (0, longest + 1, 2.0, True):
        with pytest.raises(ValueError, match="max_seq_length"):
            enc.max_seq_length = bad


def test_sentence_transformers_evaluators_run_on_an_encoder(pair):
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
        InformationRetrievalEvaluator,
    )

    enc, ref = pair
    queries = {f"q{i}": t for i, t in enumerate(SHORT[:6])}
    docs = [t for t in SHORT[2:] if t.strip()]  # no two documents with the same embedding: no ties to break
    corpus = {f"d{i}": t for i, t in enumerate(docs)}
    relevant = {f"q{i}": {f"d{i}", f"d{(i * 5) % len(docs)}"} for i in range(6)}
    ir = InformationRetrievalEvaluator(queries, corpus, relevant, name="sample",
                                       show_progress_bar=False, write_csv=False)
    got, want = ir(enc), ir(ref)
    assert got.keys() == want.keys() and len(got) > 10
    for key in got:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    scores = np.linspace(0, 1, 5).tolist()
    sts = EmbeddingSimilarityEvaluator(SHORT[:5], SHORT[5:10], scores, name="sts", write_csv=False)
    got, want = sts(enc), sts(ref)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert enc.evaluate(sts) == got
    assert enc.model_card_data.eval_results[-1]["metrics"] == got


def test_save_pretrained_layout_loads_in_sentence_transformers_as_saved(tmp_path, decoder_hf):
    """EmbeddingModel.save_pretrained (the trainer's output) keeps include_prompt, prompts and Normalize."""
    enc = Encoder(_st5_decoder(tmp_path / "src", decoder_hf), device="cpu")
    enc.model.normalize = True
    enc.model.save_pretrained(tmp_path / "out")
    ref = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert isinstance(ref[-1], Normalize) and ref[1].include_prompt is False
    again = Encoder(tmp_path / "out", device="cpu")
    _assert_same(again.encode_query(TEXTS), ref.encode_query(TEXTS), "save_pretrained")


def test_a_gemma3_saved_by_kalm_fast_loads_bidirectionally_in_sentence_transformers(tmp_path):
    """A Gemma 3 LLM checkpoint (causal, with local and global layers) that kalm_fast runs bidirectionally is saved
    with ``use_bidirectional_attention`` on: sentence-transformers then gives the same embeddings (its local layer's
    window, |i - j| < 8, shorter than the longer texts), and not the causal model's."""
    from transformers import AutoModel, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
                              max_position_embeddings=128, sliding_window=8, pad_token_id=0,
                              layer_types=["sliding_attention", "full_attention"])
    model = AutoModel.from_config(config)
    _save_spread(model, tmp_path / "llm")
    Encoder(tmp_path / "llm", device="cpu", max_length=64).model.save_pretrained(tmp_path / "out")
    enc, ref = Encoder(tmp_path / "out", device="cpu"), SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert ref[0].auto_model.config.use_bidirectional_attention
    _assert_same(enc.encode(TEXTS), ref.encode(TEXTS), "gemma3 saved by kalm_fast")
    causal = SentenceTransformer(str(tmp_path / "llm"), device="cpu").encode(TEXTS)
    assert np.abs(enc.encode(TEXTS) - causal).max() > 1e-2


@pytest.mark.parametrize("kind", ["gemma2", "mistral", "qwen2"])
def test_decoders_with_sliding_windows_in_sentence_transformers(tmp_path, kind):
    """A decoder LLM checkpoint whose local layers' window, 8, is shorter than the longer texts (Gemma 2 with
    soft-capped attention logits; Mistral, every layer local; Qwen2 with ``use_sliding_window``): pooled by its last
    token, as bge-multilingual-gemma2 and e5-mistral are, it runs causally (0 <= i - j < 8), as
    sentence-transformers runs it; mean-pooled, kalm_fast runs it bidirectionally (|i - j| <= 8) and saves it with
    ``is_causal: false``, which sentence-transformers then runs the same way. (sentence-transformers loads them with
    eager attention here: older transformers (5.3) run Gemma 2 with SDPA by default, which drops its cap.)"""
    import transformers
    from transformers import AutoModel

    skip_unless_transformers_reads_is_causal()
    eager = {"attn_implementation": "eager"}
    torch.manual_seed(0)
    common = dict(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, pad_token_id=0)
    if kind == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24,
                                           attn_logit_softcapping=2.0,
                                           layer_types=["sliding_attention", "full_attention"])
    elif kind == "mistral":
        config = transformers.MistralConfig(**common)
    else:
        config = transformers.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
    _save_spread(AutoModel.from_config(config), tmp_path / "llm")
    texts = [t for t in TEXTS if t.strip()]  # a text with no token has no last token (zeros here)
    modules = [Transformer(str(tmp_path / "llm")), Pooling(64, pooling_mode="lasttoken"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu", prompts={"query": QUERY}).save(str(tmp_path / "bge"))
    enc = Encoder(tmp_path / "bge", device="cpu")
    ref = SentenceTransformer(str(tmp_path / "bge"), device="cpu", model_kwargs=eager)
    assert enc.model.causal and max(len(x) for x in enc.model.token_ids(texts)) > 16
    _assert_same(enc.encode_query(texts), ref.encode_query(texts), f"{kind} lasttoken queries")
    _assert_same(enc.encode(texts), ref.encode(texts), f"{kind} lasttoken documents")
    Encoder(tmp_path / "llm", device="cpu", max_length=64).model.save_pretrained(tmp_path / "out")
    enc = Encoder(tmp_path / "out", device="cpu")
    ref = SentenceTransformer(str(tmp_path / "out"), device="cpu", model_kwargs=eager)
    assert ref[0].auto_model.config.is_causal is False
    assert ref[0].auto_model.config.sliding_window == 8
    _assert_same(enc.encode(texts), ref.encode(texts), f"{kind} saved by kalm_fast")
    causal = SentenceTransformer(str(tmp_path / "llm"), device="cpu", model_kwargs=eager).encode(texts)
    assert np.abs(enc.encode(texts) - causal).max() > 1e-2


def test_embedding_gemma2_in_sentence_transformers(tmp_path):
    """EmbeddingGemma 2's text model (global layers of head dim 512, local layers within |i - j| <= 4), as
    sentence-transformers saves it (mean pooling, Normalize): the same embeddings; from the multimodal checkpoint
    (a sentence_bert_config.json that also lists an image modality and its processing settings), kalm_fast runs and
    saves the text model, which sentence-transformers loads to the same embeddings."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    skip_unless_transformers_runs("embedding_gemma2")
    torch.manual_seed(0)
    text = dict(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=512, num_global_key_value_heads=1,
                sliding_window=4, hidden_size_per_layer_input=16, embedding_dim=48, max_position_embeddings=128,
                pad_token_id=0)
    full = AutoModel.from_config(transformers.EmbeddingGemma2Config(text_config=text))
    _save_spread(full, tmp_path / "full")
    full.language_model.save_pretrained(str(tmp_path / "text"))
    AutoTokenizer.from_pretrained(str(BPE_TOKENIZER)).save_pretrained(str(tmp_path / "text"))
    modules = [Transformer(str(tmp_path / "text")), Pooling(48, pooling_mode="mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    enc, ref = Encoder(tmp_path / "st", device="cpu"), SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert enc.get_embedding_dimension() == 48
    _assert_same(enc.encode(TEXTS), ref.encode(TEXTS), "embeddinggemma-2 text model")
    for name in ("modules.json", "1_Pooling", "2_Normalize", "sentence_bert_config.json"):
        (shutil.copytree if (tmp_path / "st" / name).is_dir() else shutil.copy)(tmp_path / "st" / name,
                                                                              tmp_path / "full" / name)
    _edit_json(tmp_path / "full" / "sentence_bert_config.json", modality_config={
        "text": {"method": "forward", "method_output_name": "last_hidden_state"},
        "image": {"method": "forward", "method_output_name": "last_hidden_state"}},
        processing_kwargs={"image": {"max_soft_tokens": 280}})
    multimodal = Encoder(tmp_path / "full", device="cpu")
    _assert_same(multimodal.encode(TEXTS), ref.encode(TEXTS), "embeddinggemma-2 multimodal checkpoint")
    multimodal.save(tmp_path / "saved")
    _assert_same(SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(TEXTS), ref.encode(TEXTS),
                 "embeddinggemma-2 saved by kalm_fast")


def _cls_sep_tokenizer():
    """The committed BPE tokenizer with [CLS] and [SEP] added around every text, as BERT-style tokenizers do (so that
    CLS pooling has a token even for an empty text)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BPE_TOKENIZER))
    tokenizer.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    cls, sep = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def test_a_modernbert_embedder_as_sentence_transformers(tmp_path):
    """A gte-modernbert-style model (ModernBERT, CLS pooling, Normalize, a query prompt; its tokenizer adds [CLS]
    and [SEP]) as sentence-transformers 6 saves it: the same embeddings, on texts longer than its local layers'
    window (|i - j| <= 4), and again after a save by kalm_fast."""
    from transformers import ModernBertConfig, ModernBertModel

    tokenizer = _cls_sep_tokenizer()
    cls, sep = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=128, local_attention=8,
                              global_attn_every_n_layers=2, pad_token_id=tokenizer.pad_token_id, bos_token_id=cls,
                              eos_token_id=sep, cls_token_id=cls, sep_token_id=sep)
    model = ModernBertModel(config)
    _save_spread(model, tmp_path / "hf", tokenizer)
    modules = [Transformer(str(tmp_path / "hf"), max_seq_length=100), Pooling(64, pooling_mode="cls"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu", prompts={"query": BGE_QUERY}).save(str(tmp_path / "st"))
    enc, ref = Encoder(tmp_path / "st", device="cpu"), SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert max(len(x) for x in enc.model.token_ids(TEXTS)) > 40
    _assert_same(enc.encode(TEXTS), ref.encode(TEXTS), "modernbert")
    _assert_same(enc.encode_query(TEXTS), ref.encode_query(TEXTS), "modernbert queries")
    enc.save(tmp_path / "saved")
    again = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    _assert_same(Encoder(tmp_path / "saved", device="cpu").encode(TEXTS), again.encode(TEXTS), "modernbert saved")
    _assert_same(again.encode(TEXTS), ref.encode(TEXTS), "modernbert saved, in sentence-transformers")


# Rotary encoders that transformers 5.x built in (custom code on the Hub before), with their release's modules:
# (model_type, config arguments, pooling mode, prompts)
ROTARY_ENCODERS = {
    "nomic-embed-text": ("nomic_bert", dict(type_vocab_size=2), "mean",
                         {"query": "search_query: ", "document": "search_document: "}),
    "gte-v1.5": ("gte", dict(type_vocab_size=0), "cls", {}),
    "jina-v3": ("jina_embeddings_v3", dict(pad_token_id=1, bos_token_id=0, eos_token_id=2), "mean",
                {"query": "Represent the query for retrieving evidence documents: "}),
    "eurobert": ("eurobert", dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, mask_token_id=3), "mean", {}),
}


@pytest.mark.parametrize("name", list(ROTARY_ENCODERS))
def test_rotary_encoders_as_sentence_transformers(tmp_path, name):
    """nomic-embed-text (NomicBERT, mean, Normalize, search prompts), gte-*-v1.5 (GTE, CLS, Normalize), jina v3 and
    EuroBERT (mean, Normalize) as sentence-transformers 6 saves them: the same embeddings, queries with their prompt,
    and again after a save by kalm_fast. Their saved max_seq_length (200, in sentence_bert_config.json) is past
    max_position_embeddings (64), as nomic-embed-text's 8192 is past the 2048 that transformers reads from its
    config: rotary models have no table of positions to outgrow, so it stands, as in sentence-transformers."""
    import transformers

    model_type, extra, pooling, prompts = ROTARY_ENCODERS[name]
    skip_unless_transformers_runs(model_type)
    tokenizer = _cls_sep_tokenizer() if pooling == "cls" else None  # gte's BERT tokenizer adds [CLS] and [SEP]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{
        "vocab_size": 8194, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0, **extra})
    _save_spread(transformers.AutoModel.from_config(config), tmp_path / "hf", tokenizer)
    modules = [Transformer(str(tmp_path / "hf"), max_seq_length=200), Pooling(64, pooling_mode=pooling), Normalize()]
    SentenceTransformer(modules=modules, device="cpu", prompts=prompts).save(str(tmp_path / "st"))
    _edit_json(tmp_path / "st" / "sentence_bert_config.json", max_seq_length=200)  # as nomic-embed-text's release
    enc, ref = Encoder(tmp_path / "st", device="cpu"), SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert enc.model.config.model_type == model_type and enc.max_seq_length == ref.max_seq_length == 200
    assert max(len(x) for x in enc.model.token_ids(TEXTS)) > 100
    _assert_same(enc.encode(TEXTS), ref.encode(TEXTS), name)
    if prompts:
        _assert_same(enc.encode_query(TEXTS), ref.encode_query(TEXTS), f"{name} queries")
    enc.save(tmp_path / "saved")
    again = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    _assert_same(Encoder(tmp_path / "saved", device="cpu").encode(TEXTS), again.encode(TEXTS), f"{name} saved")


def test_an_mpnet_embedder_as_sentence_transformers(tmp_path):
    """An all-mpnet-base-v2-style model (MPNet, which keeps its own attention: kalm_fast runs it padded through its
    own modules; mean pooling, Normalize) as sentence-transformers 6 saves it: the same embeddings, also of texts cut
    at its max length, and again after a save by kalm_fast."""
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=130, pad_token_id=0)
    model = MPNetModel(config)
    _save_spread(model, tmp_path / "hf")
    modules = [Transformer(str(tmp_path / "hf"), max_seq_length=96), Pooling(64), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    enc, ref = Encoder(tmp_path / "st", device="cpu"), SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert enc.max_seq_length == 96 and max(len(x) for x in enc.model.token_ids(TEXTS)) == 96
    _assert_same(enc.encode(TEXTS), ref.encode(TEXTS), "mpnet")
    enc.save(tmp_path / "saved")
    again = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    _assert_same(Encoder(tmp_path / "saved", device="cpu").encode(TEXTS), again.encode(TEXTS), "mpnet saved")


@pytest.mark.parametrize("kind", ["t5", "umt5", "longt5"])
def test_a_sentence_t5_embedder_as_sentence_transformers(tmp_path, kind):
    """A sentence-t5 / GTR-style model (a T5 checkpoint, of which both load the encoder; mean pooling, a Dense
    without bias or activation, Normalize) as sentence-transformers 6 saves it, also with UMT5 and LongT5 (local
    blocks of radius 4) checkpoints: the same embeddings, and again after a save by kalm_fast."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    extra = dict(encoder_attention_type="local", local_radius=4) if kind == "longt5" else {}
    config = AutoConfig.for_model(kind, vocab_size=8192, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                  pad_token_id=0, eos_token_id=0, **extra)
    _save_spread(AutoModel.from_config(config), tmp_path / "hf")
    modules = [Transformer(str(tmp_path / "hf"), max_seq_length=64), Pooling(64),
               Dense(64, 48, bias=False, activation_function=torch.nn.Identity()), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    enc, ref = Encoder(tmp_path / "st", device="cpu"), SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert max(len(x) for x in enc.model.token_ids(TEXTS)) == 64
    _assert_same(enc.encode(TEXTS), ref.encode(TEXTS), kind)
    enc.save(tmp_path / "saved")
    again = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    _assert_same(Encoder(tmp_path / "saved", device="cpu").encode(TEXTS), again.encode(TEXTS), f"{kind} saved")


def _dense_model(tmp, decoder_hf, seed=0):
    """sentence-transformers' own save of a decoder with two Dense modules (tanh 64 -> 32 with bias, identity
    32 -> 24 without) and Normalize, as distiluse-style and EmbeddingGemma-style models are laid out."""
    torch.manual_seed(seed)
    return _st6_with(tmp, decoder_hf, Dense(64, 32), Dense(32, 24, bias=False, activation_function=torch.nn.Identity()),
                     Normalize())


def test_dense_modules_as_sentence_transformers(tmp_path, decoder_hf):
    """Dense modules run after pooling, before Normalize and truncation: the same embeddings, dimension, truncation
    and normalization as sentence-transformers; saved back, sentence-transformers loads the same model."""
    from kalm_fast.train.trainer import embedding_size

    directory = _dense_model(tmp_path / "m", decoder_hf)
    enc, ref = Encoder(directory, device="cpu"), SentenceTransformer(str(directory), device="cpu")
    assert enc.get_embedding_dimension() == ref.get_embedding_dimension() == 24 == embedding_size(directory)
    _assert_same(enc.encode(TEXTS), ref.encode(TEXTS), "dense")
    _assert_same(enc.encode(TEXTS, truncate_dim=16), ref.encode(TEXTS, truncate_dim=16), "dense, truncated")
    _assert_same(enc.encode(TEXTS, truncate_dim=16, normalize_embeddings=True),
                 ref.encode(TEXTS, truncate_dim=16, normalize_embeddings=True), "dense, truncated, normalized")
    enc.model.save_pretrained(tmp_path / "out")
    again = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in again] == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    _assert_same(Encoder(tmp_path / "out", device="cpu").encode(TEXTS), again.encode(TEXTS), "dense, saved")
    _assert_same(again.encode(TEXTS), ref.encode(TEXTS), "dense, saved by kalm_fast")


def test_dense_modules_train_and_soup(tmp_path, decoder_hf):
    """The Dense weights are trained with the model (gradients reach them) and averaged by the soup."""
    from safetensors.torch import load_file

    from kalm_fast import model_soup
    from kalm_fast.models import EmbeddingModel

    a, b = _dense_model(tmp_path / "a", decoder_hf, seed=1), _dense_model(tmp_path / "b", decoder_hf, seed=2)
    model = EmbeddingModel.from_pretrained(a, device="cpu").train()
    model(model.tokenize(TEXTS)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("dense.")}
    assert set(grads) == {"dense.0.linear.weight", "dense.0.linear.bias", "dense.1.linear.weight"}
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
    model_soup([a, b], weights=[0.25, 0.75], output=tmp_path / "soup")
    for sub in ("2_Dense", "3_Dense"):
        wa, wb, got = (load_file(str(d / sub / "model.safetensors")) for d in (a, b, tmp_path / "soup"))
        assert set(got) == set(wa)
        for key in wa:
            torch.testing.assert_close(got[key], 0.25 * wa[key] + 0.75 * wb[key])


@pytest.mark.parametrize("variant", ["no-normalize", "tanh-by-default", "gelu", "pickled", "include-prompt-false"])
def test_dense_module_variants_as_sentence_transformers(tmp_path, decoder_hf, variant):
    """Without Normalize; a 2.x config with no activation_function (sentence-transformers' default, Tanh); GELU;
    weights pickled by sentence-transformers < 3.1 (refused unless allow_pickle, as the model's own); a pooling that
    leaves the prompt out."""
    torch.manual_seed(3)
    dense = Dense(64, 16, activation_function=torch.nn.GELU() if variant == "gelu" else torch.nn.Tanh())
    pooling = dict(include_prompt=False) if variant == "include-prompt-false" else {}
    modules = [Transformer(str(decoder_hf)), Pooling(64, **pooling), dense]
    model = SentenceTransformer(modules=modules + ([] if variant == "no-normalize" else [Normalize()]), device="cpu",
                                prompts={"query": QUERY})
    model.save(str(tmp_path / "m"), safe_serialization=variant != "pickled")
    if variant == "tanh-by-default":
        config = json.loads((tmp_path / "m/2_Dense/config.json").read_text())
        del config["activation_function"]
        (tmp_path / "m/2_Dense/config.json").write_text(json.dumps(config))
    ref = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    if variant == "pickled":
        with pytest.raises(ValueError, match="pickled"):
            Encoder(tmp_path / "m", device="cpu")
    enc = Encoder(tmp_path / "m", device="cpu", allow_pickle=variant == "pickled")
    _assert_same(enc.encode(TEXTS, prompt_name="query"), ref.encode(TEXTS, prompt_name="query"), variant)
    enc.model.save_pretrained(tmp_path / "out")
    saved, theirs = (json.loads((d / "2_Dense/config.json").read_text()) for d in (tmp_path / "out", tmp_path / "m"))
    assert saved == dict(in_features=64, out_features=16, bias=True, activation_function=theirs.get(
        "activation_function", "torch.nn.modules.activation.Tanh"))


def test_dense_in_bf16_as_sentence_transformers_in_bf16(tmp_path, decoder_hf):
    """The Dense modules run in the model's dtype, as sentence-transformers casts them."""
    directory = _dense_model(tmp_path / "m", decoder_hf)
    got = Encoder(directory, device="cpu", dtype="bfloat16").encode(TEXTS)
    want = SentenceTransformer(str(directory), device="cpu", model_kwargs={"dtype": torch.bfloat16}).encode(TEXTS)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.999


def test_the_soup_refuses_checkpoints_with_other_modules(tmp_path, decoder_hf):
    from kalm_fast import model_soup

    a = _dense_model(tmp_path / "a", decoder_hf)
    plain = _st6_with(tmp_path / "plain", decoder_hf, Normalize())
    for pair in ([plain, a], [a, plain]):
        with pytest.raises(ValueError, match=r"have other modules with weights \(Dense: "):
            model_soup(pair, output=tmp_path / "soup")
    b = _dense_model(tmp_path / "b", decoder_hf, seed=5)
    (b / "2_Dense/pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="2_Dense/pytorch_model.bin: module weights the soup cannot average"):
        model_soup([a, b], output=tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize("file, change, setting", [
    ("config_sentence_transformers.json", dict(prompts={"query": "q: "}), "prompts"),
    ("config_sentence_transformers.json", dict(truncate_dim=16), "truncate_dim"),
    ("config_sentence_transformers.json", dict(similarity_fn_name="dot"), "similarity_fn_name"),
    ("1_Pooling/config.json", dict(include_prompt=False), "include_prompt"),
    ("modules.json", None, "normalize"),
    ("config.json", dict(rms_norm_eps=1e-3), "config.rms_norm_eps"),
])
def test_the_soup_refuses_checkpoints_that_embed_differently(tmp_path, decoder_hf, file, change, setting):
    """Two checkpoints of one model that differ in a setting outside the weights are refused in either order, naming
    the setting (the soup would keep the first one's); a difference in metadata only (transformers version, dtype
    label, an empty prompt against none) is no difference."""
    from kalm_fast import model_soup

    a = _st6_with(tmp_path / "a", decoder_hf, Normalize())
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(a, same)
    _edit_json(same / "config.json", transformers_version="4.44.0", dtype="bfloat16")
    _edit_json(same / "config_sentence_transformers.json", prompts={"query": "", "document": ""})
    shutil.copytree(a, other)
    if change is None:  # Normalize left out
        modules = json.loads((other / "modules.json").read_text())
        (other / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    else:
        _edit_json(other / file, **change)
    for pair in ([a, other], [other, a]):
        with pytest.raises(ValueError, match=rf"embed differently \({re.escape(setting)}: "):
            model_soup(pair, output=tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    model_soup([a, same], output=tmp_path / "soup")


def test_the_soup_points_an_older_layout_to_a_fresh_save(tmp_path):
    """A sentence-transformers 2.x directory (weights in 0_Transformer/) is refused with the way out."""
    from kalm_fast import model_soup

    old = _st2_minilm(tmp_path / "old")
    with pytest.raises(ValueError, match=r"its weights are in 0_Transformer/ \(an older sentence-transformers "
                                         r"layout\): save it anew first, with Encoder\(path\).save\(new_path\)"):
        model_soup([old, old], output=tmp_path / "soup")
    Encoder(old, device="cpu").save(tmp_path / "new")
    model_soup([tmp_path / "new", tmp_path / "new"], output=tmp_path / "soup")
