"""Retrieval metrics on hand-computed cases, and the embedding search around them."""
import math

import pytest
import torch

from kalm_fast.train.data import EvalSet
from kalm_fast.train.evaluate import evaluate_embeddings, evaluate_encoder, evaluate_model, rank_metrics, search


def test_single_relevant_doc():
    # relevant doc at rank 3 (1-based): nDCG = 1/log2(4) = 0.5, MRR = 1/3
    m = rank_metrics([["a", "b", "c", "d"]], [{"c": 1}], ks=(1, 2, 3, 10))
    assert m["ndcg@1"] == 0 and m["ndcg@2"] == 0
    assert m["ndcg@3"] == pytest.approx(0.5) and m["ndcg@10"] == pytest.approx(0.5)
    assert m["recall@2"] == 0 and m["recall@3"] == 1
    assert m["mrr@2"] == 0 and m["mrr@10"] == pytest.approx(1 / 3)


def test_graded_relevance_and_mean_over_queries():
    # query 1: grades b=2, d=1, x=1 (never retrieved); ranking a b c d
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    # query 2: perfect ranking
    m = rank_metrics([["a", "b", "c", "d"], ["z", "y"]], [{"b": 2, "d": 1, "x": 1}, {"z": 1}], ks=(4,))
    assert m["ndcg@4"] == pytest.approx((dcg / idcg + 1.0) / 2)
    assert m["recall@4"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["mrr@4"] == pytest.approx((1 / 2 + 1.0) / 2)


def test_ideal_dcg_cut_at_k():
    # three relevant docs, k = 1, best doc first: nDCG@1 = 1 although recall@1 = 1/3
    m = rank_metrics([["a", "b", "c"]], [{"a": 1, "b": 1, "c": 1}], ks=(1,))
    assert m["ndcg@1"] == 1 and m["recall@1"] == pytest.approx(1 / 3)


def test_rank_metrics_errors():
    with pytest.raises(ValueError, match="2 queries but relevant has 1"):
        rank_metrics([["a"], ["b"]], [{"a": 1}])


def test_search_and_evaluate_embeddings():
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    queries = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # query 0: scores d1=1.0, d2=0.8, d0=0 -> ranking d1 d2 d0; query 1: d0 d2 d1
    assert search(queries, docs, 3).tolist() == [[1, 2, 0], [0, 2, 1]]
    assert search(queries, docs, 10, chunk=1).shape == (2, 3)
    ev = EvalSet(["q0", "q1"], ["x", "y"], [{"d2": 1.0}, {"d1": 1.0}], ["d0", "d1", "d2"], ["", "", ""])
    m = evaluate_embeddings(queries, docs, ev, ks=(1, 10))
    assert m["recall@1"] == 0 and m["mrr@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)


def test_no_queries_is_an_error():
    with pytest.raises(ValueError, match="at least one query"):
        rank_metrics([], [])


def test_per_query_values_in_query_order():
    """``per_query=True``: one value per query (what the ablation's paired comparisons need), not the mean."""
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ev = EvalSet(["q0", "q1"], ["x", "y"], [{"d0": 1.0}, {"d0": 1.0}], ["d0", "d1"], ["", ""])
    m = evaluate_embeddings(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), docs, ev, ks=(1, 2), per_query=True)
    assert m["recall@1"] == [1.0, 0.0] and m["mrr@2"] == [1.0, 0.5]
    assert m["ndcg@2"] == pytest.approx([1.0, 1 / math.log2(3)])


def test_evaluate_encoder_uses_the_given_ks():
    ev = EvalSet(["q0"], ["x"], [{"d1": 1.0}], ["d0", "d1"], ["a", "b"])
    vectors = {"x": [0.0, 1.0], "a": [1.0, 0.0], "b": [0.6, 0.8]}
    m = evaluate_encoder(lambda texts: torch.tensor([vectors[t] for t in texts]), ev, ks=(1, 2))
    assert m == {"ndcg@1": 1.0, "recall@1": 1.0, "mrr@1": 1.0, "ndcg@2": 1.0, "recall@2": 1.0, "mrr@2": 1.0}


def test_evaluate_model_ranks_by_cosine_of_normalized_embeddings():
    """The trainer's evaluation asks the model for normalized embeddings (cosine, not the raw dot product, which
    would rank the long document d0 first here), with ``batch_size`` as the texts per batch."""
    vectors = {"q": [1.0, 0.0], "long": [10.0, 10.0], "aligned": [1.0, 0.1]}
    calls = []

    class Model:
        default_prompt, truncate_dim = "", None

        def sentence_embeddings(self, texts, *, prompt, dim, normalize=False, max_sequences=None):
            calls.append((max_sequences, normalize))
            emb = torch.tensor([vectors[t] for t in texts])
            return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    ev = EvalSet(["q0"], ["q"], [{"d1": 1.0}], ["d0", "d1"], ["long", "aligned"])
    assert evaluate_model(Model(), ev, batch_size=3, ks=(1,))["mrr@1"] == 1.0
    assert calls == [(3, True), (3, True)]


def test_evaluate_model_embeds_as_the_saved_model_serves(monkeypatch):
    """The trainer scores a model with its default prompt and truncate_dim, the embeddings ``Encoder.encode`` (and so
    ``kalm-fast eval``) gives for it; ``ks`` are checked."""
    from kalm_fast import Encoder
    from kalm_fast.train import evaluate

    enc = Encoder(device="cpu", prompts={"web": "search: "}, default_prompt_name="web", truncate_dim=16)
    seen = []
    monkeypatch.setattr(evaluate, "evaluate_embeddings", lambda q, d, *args, **kwargs: seen.append((q, d)))
    docs = ["a cat sat on the mat", "stock markets fell today", "how to bake bread"]
    ev = EvalSet(["q0", "q1"], ["feline on a rug", "baking"], [{"d0": 1.0}, {"d2": 1.0}], ["d0", "d1", "d2"], docs)
    evaluate_model(enc.model, ev)
    (q, d), = seen
    for got, texts in ((q, ev.queries), (d, docs)):
        assert got.shape == (len(texts), 16)
        torch.testing.assert_close(got, enc.encode(texts, normalize_embeddings=True, convert_to_tensor=True))
    with pytest.raises(ValueError, match=r"ks must be one or more positive int cut-offs, got \(0,\)"):
        rank_metrics([["a"]], [{"a": 1}], ks=(0,))
    with pytest.raises(ValueError, match=r"ks must be one or more positive int cut-offs, got \(-1,\)"):
        evaluate_embeddings(torch.eye(2), torch.eye(2), EvalSet(["q"], ["x"], [{"a": 1.0}], ["a", "b"], ["x", "y"]),
                            ks=(-1,))
    with pytest.raises(ValueError, match=r"relevant\[0\] has no document with a grade > 0"):
        rank_metrics([["a"]], [{"a": 0}], ks=(1,))
