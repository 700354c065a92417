"""Encoder vs SentenceTransformer: texts/s, tokens/s and GFLOP/s on the same model, texts, dtype and threads.

    python -m benchmarks.encode                  # CPU: embedded MiniLM, fp32 (+ bf16 where the CPU has it), 2 threads
    python -m benchmarks.encode --quick          # fewer texts and rounds
    python -m benchmarks.encode --qwen2          # GPU: a random-init Qwen2-0.5B-shaped model, fp16

The two implementations run alternately (``--rounds`` times each, median reported) so load on a shared machine
hits both alike. Agreement is the minimum cosine between the two on every text. GFLOP/s counts the FLOPs of the
real tokens only (linear layers 2 * params per token plus attention 4 * L * heads * head_dim per token); the
ceiling is the fastest plain ``[4096, H] x [H, 4H]`` matmul in the same dtype and threads (``F.linear`` or, on
CPU, oneDNN on packed weights).
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kalm_fast.cli.demo import DATA_DIR

from .harness import device_info, write_report

DATA = DATA_DIR / "sample_corpus.txt"


def workloads(n_longtail: int, sample_repeat: int) -> dict:
    """The sample corpus (repeated) and a long-tailed length mix cut from its words (lognormal, 1..450 words)."""
    lines = [line.rstrip("\n") for line in open(DATA, encoding="utf-8") if line.strip()]
    rng = random.Random(0)
    words = " ".join(lines).split()
    longtail = []
    for _ in range(n_longtail):
        n = max(1, min(int(rng.lognormvariate(2.8, 0.9)), 450))
        start = rng.randrange(len(words))
        longtail.append(" ".join((words * 2)[start:start + n]))
    return {"sample": lines * sample_repeat, "longtail": longtail}


def flops(model, lengths) -> float:
    """FLOPs of one forward over sequences of ``lengths`` real tokens (no padding)."""
    layers = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layer" in name]
    per_token = 2 * sum(m.in_features * m.out_features for m in layers)
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attention = 4 * heads * head_dim * cfg.num_hidden_layers * sum(n * n for n in lengths)
    return per_token * sum(lengths) + attention


def matmul_ceiling(hidden: int, dtype, device) -> float:
    """GFLOP/s of the fastest plain linear layer [4096, H] x [H, 4H] here: ``F.linear`` and, on CPU, oneDNN on packed
    weights (what the Encoder's fast path runs), best of 8 each."""
    from kalm_fast.models.bert_packed import onednn_linear_available

    a = torch.randn(4096, hidden, device=device, dtype=dtype)
    w = torch.randn(4 * hidden, hidden, device=device, dtype=dtype)
    linears = [lambda: torch.nn.functional.linear(a, w)]
    if device.type == "cpu" and onednn_linear_available(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        linears.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    best = float("inf")
    for linear in linears:
        for _ in range(8):
            seconds, _ = _timed(linear, device)
            best = min(best, seconds)
    return 2 * 4096 * hidden * 4 * hidden / best / 1e9


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def compare(model_dir, texts, dtype, device, rounds, st_batch_size) -> list:
    """Alternating timed runs of SentenceTransformer and Encoder on ``texts``; one row per implementation."""
    from sentence_transformers import SentenceTransformer

    from kalm_fast.encode import Encoder
    from kalm_fast.models.loading import resolve_model_dir

    model_dir = resolve_model_dir(model_dir)
    encoder = Encoder(model_dir, device=device, dtype=dtype)
    st = SentenceTransformer(str(model_dir), device=str(device))
    autocast = None
    if device.type == "cuda" and dtype != torch.float32:
        st = st.to(dtype)  # GPU: sentence-transformers in half precision
    elif dtype != torch.float32:
        autocast = dtype  # CPU: sentence-transformers under bf16 autocast, as users run it

    def run_st():
        if autocast is None:
            return st.encode(texts, batch_size=st_batch_size, normalize_embeddings=True)
        with torch.autocast(device.type, dtype=autocast):
            return st.encode(texts, batch_size=st_batch_size, normalize_embeddings=True)

    def run_kf():
        return encoder.encode(texts)

    run_st(), run_kf()  # warm-up
    times = {"sentence-transformers": [], "kalm_fast": []}
    outs = {}
    for _ in range(rounds):
        for name, fn in (("sentence-transformers", run_st), ("kalm_fast", run_kf)):
            seconds, outs[name] = _timed(fn, device)
            times[name].append(seconds)
    lengths = [len(x) for x in encoder.model.token_ids(texts)]
    work = flops(encoder.model.model, lengths)
    ceiling = matmul_ceiling(encoder.model.hidden_size, dtype, device)
    a, b = (np.asarray(outs[k], dtype=np.float32) for k in ("sentence-transformers", "kalm_fast"))
    min_cos = float(((a * b).sum(1) / np.linalg.norm(a, axis=1).clip(1e-12) / np.linalg.norm(b, axis=1).clip(1e-12)).min())
    base = statistics.median(times["sentence-transformers"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"impl": name, "dtype": str(dtype).replace("torch.", ""), "texts": len(texts),
                     "tokens": sum(lengths), "median_s": med, "min_s": min(ts), "texts/s": len(texts) / med,
                     "tokens/s": sum(lengths) / med, "GFLOP/s": work / med / 1e9, "matmul GFLOP/s": ceiling,
                     "% of matmul": 100 * work / med / 1e9 / ceiling, "x ST": base / med,
                     "min cos vs ST": f"{min_cos:.6f}" if name == "kalm_fast" else ""})
    return rows


def qwen2_shaped_dir(directory: Path) -> Path:
    """A random-init Qwen2-0.5B-shaped model (24 layers, 896 hidden, 14/2 heads) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    from kalm_fast.models.loading import default_model_dir

    config = Qwen2Config(vocab_size=30522, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)
    Qwen2Model(config).save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(default_model_dir())).save_pretrained(str(directory))
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both implementations")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    parser.add_argument("--qwen2", action="store_true", help="also a random-init Qwen2-0.5B-shaped model (GPU)")
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' batch_size")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.dtypes:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    elif device.type == "cuda":
        dtypes = [torch.float32, torch.float16]
    else:
        bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        dtypes = [torch.float32] + ([torch.bfloat16] if bf16 else [])
    rounds = args.rounds or (2 if args.quick else 5)
    texts = workloads(300 if args.quick else 1000, 1 if args.quick else 3)
    rows = []
    for dtype in dtypes:
        for name, items in texts.items():
            for row in compare(None, items, dtype, device, rounds, args.st_batch_size):
                rows.append({"model": "all-MiniLM-L6-v2", "workload": name, **row})
    if args.qwen2 or (device.type == "cuda" and not args.quick):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = qwen2_shaped_dir(Path(tmp))
            for row in compare(model_dir, texts["longtail"], torch.float16 if device.type == "cuda" else torch.float32,
                               device, rounds, args.st_batch_size):
                rows.append({"model": "qwen2-0.5B-shaped", "workload": "longtail", **row})
    columns = ["model", "workload", "impl", "dtype", "texts/s", "tokens/s", "GFLOP/s", "matmul GFLOP/s", "% of matmul",
               "x ST", "min cos vs ST", "median_s", "min_s"]
    for row in rows:
        row["series"] = f"{row['impl']} {row['dtype']}"
    write_report("encode", rows, columns=columns,
                 plot=dict(x="workload", y="texts/s", series="series", logx=False, title="encode throughput"),
                 meta=dict(threads=torch.get_num_threads() if device.type == "cpu" else None, rounds=rounds,
                           device=device_info().get("device")))


if __name__ == "__main__":
    main()
