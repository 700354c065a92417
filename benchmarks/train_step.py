"""Training-step throughput: samples/s and peak memory of one full contrastive step (`python -m benchmarks.train_step`).

One step = GradCache embedding of B queries and B x (1 + M) documents (random token ids, lengths
``--query-len`` / ``--doc-len``), focal-InfoNCE with in-batch + M hard negatives, backward through the
model mini-batch by mini-batch, AdamW update: the loop of ``kalm_fast.train.Trainer``. Compared across
loss backends (``auto`` against ``reference``, which materializes the similarity matrix). ``--max-batch``
also doubles B until the step runs out of memory, per backend.

GPU default: a Qwen2-0.5B-shaped model (24 layers, hidden 896, 14/2 heads; random init), fp32 weights with
bf16 autocast, B in {256, 1024}, M = 7. CPU default: a 2-layer toy of the same family so the script runs
anywhere (the numbers only show the loop works).
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from .harness import on_gpu, time_fn, write_report

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096)
TOY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)


def build_model(shape: dict, device: torch.device):
    from transformers import Qwen2Config, Qwen2Model

    from kalm_fast.models import EmbeddingModel

    torch.manual_seed(0)
    model = Qwen2Model(Qwen2Config(**shape)).to(device)
    return EmbeddingModel(model, tokenizer=None, max_length=shape["max_position_embeddings"]).train()


def make_texts(batch: int, negatives: int, query_len: int, doc_len: int, vocab: int):
    """Token-id lists standing in for texts (``model.pack`` is the tokenizer); lengths vary by +-25%."""
    gen = torch.Generator().manual_seed(batch)

    def seq(n):
        length = int(n * (0.75 + 0.5 * torch.rand(1, generator=gen).item()))
        return torch.randint(10, vocab, (max(1, length),), generator=gen).tolist()

    return [seq(query_len) for _ in range(batch)], [[seq(doc_len) for _ in range(1 + negatives)] for _ in range(batch)]


def run_step(model, optimizer, loss_fn, texts, chunk, device):
    from kalm_fast.train.gradcache import contrastive_step

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    loss, _ = contrastive_step(model, model.pack, texts[0], texts[1], loss_fn, chunk_size=chunk,
                               generator=torch.Generator(device).manual_seed(0), autocast=autocast, device=device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def measure(model, optimizer, backend, batch, args, device, repeats):
    from kalm_fast.train.losses import FocalInfoNCELoss

    loss_fn = FocalInfoNCELoss(temperature=0.01, gamma=0.5, num_synthetic=args.synthetic, backend=backend)
    texts = make_texts(batch, args.negatives, args.query_len, args.doc_len, model.config.vocab_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = time_fn(lambda: run_step(model, optimizer, loss_fn, texts, args.chunk, device), warmup=1, repeats=repeats)
    row = dict(backend=backend, batch=batch, negatives=args.negatives, chunk=args.chunk,
               step_ms=t["median_ms"], samples_per_s=batch / (t["median_ms"] / 1e3))
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv=None) -> int:
    gpu = on_gpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024] if gpu else [8, 32])
    parser.add_argument("--negatives", type=int, default=7)
    parser.add_argument("--synthetic", type=int, default=0, help="mixed negatives per query")
    parser.add_argument("--chunk", type=int, default=512 if gpu else 64, help="GradCache mini-batch (texts)")
    parser.add_argument("--query-len", type=int, default=32)
    parser.add_argument("--doc-len", type=int, default=128 if gpu else 32)
    parser.add_argument("--backends", nargs="+", default=["auto", "reference"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", action="store_true", help="double B until out of memory, per backend")
    parser.add_argument("--max-batch-cap", type=int, default=65536)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")
    model = build_model(QWEN2_05B if gpu else TOY, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = [measure(model, optimizer, b, n, args, device, args.repeats) for b in args.backends for n in args.batch]
    if args.max_batch:
        for backend in args.backends:
            batch, fits = max(args.batch), None
            while batch <= args.max_batch_cap:
                try:
                    row = measure(model, optimizer, backend, batch, args, device, repeats=1)
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    break
                fits = row
                batch *= 2
            if fits is not None:
                rows.append(dict(fits, backend=f"{backend} (largest fitting B, cap {args.max_batch_cap})"))
    columns = ["backend", "batch", "negatives", "chunk", "step_ms", "samples_per_s"] + (["peak_gib"] if gpu else [])
    write_report("train_step", rows, columns=columns, meta=dict(model="qwen2-0.5b-shaped" if gpu else "toy-qwen2",
                                                                query_len=args.query_len, doc_len=args.doc_len),
                 plot=dict(x="batch", y="samples_per_s", series="backend", logx=True,
                           title="training step throughput (GradCache, focal-InfoNCE)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
