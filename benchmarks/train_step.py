"""Training-step throughput: samples/s and peak memory of one full contrastive step (`python -m benchmarks.train_step`).

One step = GradCache embedding of B queries and B x (1 + M) documents (random token ids, lengths
``--query-len`` / ``--doc-len``), focal-InfoNCE with in-batch + M hard negatives, backward through the
model mini-batch by mini-batch, AdamW update: the loop of ``kalm_fast.train.Trainer``. Compared across
loss backends (``auto`` against ``reference``, which materializes the similarity matrix) and against
sentence-transformers' own GradCache step (``st-cached-mnrl``: ``CachedMultipleNegativesRankingLoss`` with
``mini_batch_size = --chunk`` and ``scale = 1 / temperature``, the same weights saved by ``EmbeddingModel``, the same
padded token ids; the loss and its backward under the same autocast, as the Hugging Face Trainer runs it).
``--max-batch`` also doubles B until the step runs out of memory, per backend.

GPU default: a Qwen2-0.5B-shaped model (24 layers, hidden 896, 14/2 heads; random init), fp32 weights with
bf16 autocast, B in {256, 1024}, M = 7. CPU default: a 2-layer toy of the same family so the script runs
anywhere (the numbers only show the loop works).
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch

from .harness import on_gpu, print_profile, progress, time_fn, write_report

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


ST_BASELINE = "st-cached-mnrl"
TEMPERATURE = 0.01


def _autocast(device):
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext


def st_baseline(model, chunk: int, device, workdir):
    """``(SentenceTransformer over a copy of the model's weights, its CachedMultipleNegativesRankingLoss)``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    from kalm_fast.models import EmbeddingModel

    from .encode import bpe_tokenizer

    EmbeddingModel(model.model, bpe_tokenizer(), max_length=model.model_max_length,
                   normalize=False).save_pretrained(workdir)
    st = SentenceTransformer(str(workdir), device=str(device)).train()
    return st, CachedMultipleNegativesRankingLoss(st, scale=1 / TEMPERATURE, mini_batch_size=chunk)


def padded_features(seqs, device) -> dict:
    """Token-id lists -> sentence-transformers' features ``{input_ids, attention_mask}`` [n, longest]."""
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def run_st_step(loss_fn, optimizer, features, device):
    with _autocast(device)():
        loss = loss_fn(features, None)
        loss.backward()  # GradCache's second pass runs in the backward hook
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_step(model, optimizer, loss_fn, texts, chunk, device):
    from kalm_fast.train.gradcache import contrastive_step

    loss, _ = contrastive_step(model, model.pack, texts[0], texts[1], loss_fn, chunk_size=chunk,
                               generator=torch.Generator(device).manual_seed(0), autocast=_autocast(device),
                               device=device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def measure(model, optimizer, backend, batch, args, device, repeats, st=None):
    """One row: ``backend`` is a focal-InfoNCE loss backend run by kalm_fast's step, or ST_BASELINE with
    ``st = (its optimizer, its loss)``. Both run mini-batches of ``min(chunk, batch)`` texts (sentence-transformers'
    cached loss embeds each column of the batch in such mini-batches). ``peak_gib``: the step's peak above what was
    allocated before it (both models' weights and optimizer states)."""
    from kalm_fast.train.losses import FocalInfoNCELoss

    chunk = min(args.chunk, batch)
    texts = make_texts(batch, args.negatives, args.query_len, args.doc_len, model.config.vocab_size)
    if backend == ST_BASELINE:
        st_optimizer, st_loss = st
        features = [padded_features(texts[0], device)]
        features += [padded_features([docs[j] for docs in texts[1]], device) for j in range(1 + args.negatives)]
        step = lambda: run_st_step(st_loss, st_optimizer, features, device)  # noqa: E731
    else:
        loss_fn = FocalInfoNCELoss(temperature=TEMPERATURE, gamma=0.5, num_synthetic=args.synthetic, backend=backend)
        step = lambda: run_step(model, optimizer, loss_fn, texts, chunk, device)  # noqa: E731
    step()  # warm-up: compiles, autotunes, creates the optimizer states
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time_fn(step, warmup=0, repeats=repeats)
    row = dict(backend=backend, batch=batch, negatives=args.negatives, chunk=chunk,
               step_ms=t["median_ms"], samples_per_s=batch / (t["median_ms"] / 1e3))
    if device.type == "cuda":
        row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    progress(row)
    if args.profile:  # after the row is printed (a run cut short keeps it)
        print_profile(f"one {backend} step, B = {batch}", step, device)
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
    parser.add_argument("--backends", nargs="+", default=["auto", "reference", ST_BASELINE],
                        help=f"focal-InfoNCE loss backends of kalm_fast's step, and {ST_BASELINE} "
                             "(sentence-transformers' CachedMultipleNegativesRankingLoss step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", action="store_true", help="double B until out of memory, per backend")
    parser.add_argument("--max-batch-cap", type=int, default=65536)
    parser.add_argument("--profile", action="store_true", help="print each step's top ops (torch.profiler)")
    parser.add_argument("--report", default="train_step", help="results name: benchmarks/results/<report>-<device>.*")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")
    model = build_model(QWEN2_05B if gpu else TOY, device)
    st = None
    with tempfile.TemporaryDirectory() as workdir:
        if ST_BASELINE in args.backends:  # a copy of the same initial weights, before any kalm_fast step
            st_model, st_loss = st_baseline(model, args.chunk, device, workdir)
            st = (torch.optim.AdamW(st_model.parameters(), lr=1e-5), st_loss)
        rows = run_all(model, st, args, device)
    columns = ["backend", "batch", "negatives", "chunk", "step_ms", "samples_per_s"] + (["peak_gib"] if gpu else []) + [
        "note"]
    write_report(args.report, rows, columns=columns, meta=dict(model="qwen2-0.5b-shaped" if gpu else "toy-qwen2",
                                                                query_len=args.query_len, doc_len=args.doc_len),
                 plot=dict(x="batch", y="samples_per_s", series="backend", logx=True,
                           title="training step throughput (GradCache, focal-InfoNCE)"))
    return 0


def run_all(model, st, args, device) -> list:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []
    for backend in args.backends:
        for batch in args.batch:
            try:
                rows.append(measure(model, optimizer, backend, batch, args, device, args.repeats, st))
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                if st is not None:
                    st[0].zero_grad(set_to_none=True)
                rows.append(progress(dict(backend=backend, batch=batch, note="out of memory")))
    if args.max_batch:
        for backend in args.backends:
            batch, fits = max(args.batch), None
            while batch <= args.max_batch_cap:
                try:
                    row = measure(model, optimizer, backend, batch, args, device, 1, st)
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    if st is not None:
                        st[0].zero_grad(set_to_none=True)
                    break
                fits = row
                batch *= 2
            if fits is not None:
                rows.append(dict(fits, backend=f"{backend} (largest fitting B, cap {args.max_batch_cap})"))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
