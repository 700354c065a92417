"""Loading refuses what would silently give wrong embeddings: no vocabulary, missing or renamed weights, damaged
files (issue 14)."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_utils import make_tiny_model

from kalm_fast.models import EmbeddingModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _variant(tiny, tmp_path, change):
    path = tmp_path / "variant"
    shutil.copytree(tiny, path)
    weights = load_file(str(path / "model.safetensors"))
    save_file(change(weights), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_a_tokenizer_config_alone_is_refused(tiny, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny, path)
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"has no tokenizer vocabulary .*tokenizer_config.json alone cannot tokenize"):
        EmbeddingModel.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("change, message", [
    (lambda w: {k: v for k, v in w.items() if k != "encoder.layer.1.output.dense.weight"},
     r"lack 1 tensor\(s\) .*'encoder.layer.1.output.dense.weight'"),
    (lambda w: {f"model.{k}": v for k, v in w.items()},
     r"lack \d+ tensor\(s\) .*unexpected tensors such as 'model\."),
    (lambda w: {f"0.auto_model.{k}": v for k, v in w.items()}, r"unexpected tensors such as '0.auto_model\."),
])
def test_missing_or_prefixed_weights_are_refused_not_random(tiny, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingModel.from_pretrained(_variant(tiny, tmp_path, change), device="cpu")


def test_a_checkpoint_without_the_unused_pooler_loads(tiny, tmp_path):
    path = _variant(tiny, tmp_path, lambda w: {k: v for k, v in w.items() if not k.startswith("pooler.")})
    got = EmbeddingModel.from_pretrained(path, device="cpu").embed(["a short text"])
    want = EmbeddingModel.from_pretrained(tiny, device="cpu").embed(["a short text"])
    torch.testing.assert_close(got, want)


def test_a_truncated_weights_file_is_named(tiny, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        EmbeddingModel.from_pretrained(path, device="cpu")
