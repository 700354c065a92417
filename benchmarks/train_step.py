"""Training-step throughput: samples/s and peak memory of one full contrastive step (`python -m benchmarks.train_step`).

One step = GradCache embedding of B queries and B x (1 + M) documents (random token ids, lengths
``--query-len`` / ``--doc-len``), focal-InfoNCE with in-batch + M hard negatives, backward through the
model mini-batch by mini-batch, AdamW update: the loop of ``kalm_fast.train.Trainer``. Compared across
loss backends (``auto`` against ``reference``, which materializes the similarity matrix), with transformers' modules
as they are or with fused ops (``auto (fused decoder)``: ``KALM_FUSED_DECODER=1``, a row by default on a GPU), and
against sentence-transformers' own GradCache step (``st-cached-mnrl``: ``CachedMultipleNegativesRankingLoss`` with
``mini_batch_size = --chunk`` and ``scale = 1 / temperature``, the same weights saved by ``EmbeddingModel``, the same
padded token ids; the loss and its backward under the same autocast, as the Hugging Face Trainer runs it).
``--max-batch`` adds, per backend, the largest B whose step fits in the same memory: B doubles from
``--max-batch-start`` while one step fits in ``--max-batch-gib`` GiB above the weights and optimizer states (a
``torch.cuda.set_per_process_memory_fraction`` limit). What grows with B at a fixed GradCache mini-batch is the
loss and the cached embeddings, not the model's activations, so this probe runs a 2-layer model of the same width
(896, the embedding size) on texts of ``--max-batch-len`` tokens, with ``--max-batch-chunk`` texts per
mini-batch: every B up to the cap takes seconds, where the 24-layer model would take minutes per step.

GPU default: a Qwen2-0.5B-shaped model (24 layers, hidden 896, 14/2 heads; random init), fp32 weights with
bf16 autocast, B in {256, 1024}, M = 7. CPU default: a 2-layer toy of the same family so the script runs
anywhere (the numbers only show the loop works; no memory limit on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import tempfile
import time
from unittest import mock

import torch

from .harness import failed_note, l2_flush_buffer, on_gpu, print_profile, progress, time_fn, write_report

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096)
MAX_BATCH_PROBE = dict(QWEN2_05B, num_hidden_layers=2, vocab_size=1000)
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
FUSED = " (fused decoder)"  # a loss backend's row with KALM_FUSED_DECODER=1 (transformers' modules with fused ops)
TEMPERATURE = 0.01


def _autocast(device):
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext


def st_baseline(model, device, workdir):
    """A SentenceTransformer over a copy of the model's weights."""
    from sentence_transformers import SentenceTransformer

    from kalm_fast.models import EmbeddingModel

    from .encode import bpe_tokenizer

    EmbeddingModel(model.model, bpe_tokenizer(), max_length=model.model_max_length,
                   normalize=False).save_pretrained(workdir)
    return SentenceTransformer(str(workdir), device=str(device)).train()


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


def make_step(model, optimizer, backend, texts, chunk, device, st=None, synthetic=0):
    """One training step of ``texts``, as a callable: ``backend`` is a focal-InfoNCE loss backend run by kalm_fast's
    step (with FUSED appended: under ``KALM_FUSED_DECODER=1``), or ST_BASELINE with ``st = (its SentenceTransformer,
    its optimizer)``. Both run mini-batches of ``chunk`` texts (sentence-transformers' cached loss embeds each column
    of the batch in such mini-batches)."""
    if backend == ST_BASELINE:
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

        st_model, st_optimizer = st
        st_loss = CachedMultipleNegativesRankingLoss(st_model, scale=1 / TEMPERATURE, mini_batch_size=chunk)
        features = [padded_features(texts[0], device)]
        features += [padded_features([docs[j] for docs in texts[1]], device) for j in range(len(texts[1][0]))]
        return lambda: run_st_step(st_loss, st_optimizer, features, device)
    from kalm_fast.train.losses import FocalInfoNCELoss

    fused = backend.endswith(FUSED)
    loss_fn = FocalInfoNCELoss(temperature=TEMPERATURE, gamma=0.5, num_synthetic=synthetic,
                               backend=backend[:-len(FUSED)] if fused else backend)

    def step():
        with mock.patch.dict(os.environ, {"KALM_FUSED_DECODER": "1"} if fused else {}):
            return run_step(model, optimizer, loss_fn, texts, chunk, device)
    return step


def measure(model, optimizer, backend, batch, args, device, repeats, st=None):
    """One row of ``make_step`` at ``batch``, mini-batches of ``min(chunk, batch)`` texts. ``peak_gib``: the step's
    peak above what was allocated before it (both models' weights and optimizer states)."""
    chunk = min(args.chunk, batch)
    texts = make_texts(batch, args.negatives, args.query_len, args.doc_len, model.config.vocab_size)
    step = make_step(model, optimizer, backend, texts, chunk, device, st, args.synthetic)
    step()  # warm-up: compiles, autotunes, creates the optimizer states
    if device.type == "cuda":  # the allocator keeps the warm-up's blocks: the timed steps allocate no new memory
        l2_flush_buffer()  # allocated before the peak is reset: not counted in it
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
    parser.add_argument("--backends", nargs="+",
                        default=["auto", *([f"auto{FUSED}"] if gpu else []), "reference", ST_BASELINE],
                        help=f"focal-InfoNCE loss backends of kalm_fast's step (a name ending in '{FUSED}': with "
                             f"KALM_FUSED_DECODER=1), and {ST_BASELINE} (sentence-transformers' "
                             "CachedMultipleNegativesRankingLoss step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", action="store_true",
                        help="add each backend's largest B that fits in --max-batch-gib (see the module docstring)")
    parser.add_argument("--max-batch-gib", type=float, default=1.0,
                        help="memory for the step above the weights and optimizer states (GiB)")
    parser.add_argument("--max-batch-start", type=int, default=1024 if gpu else 8)
    parser.add_argument("--max-batch-cap", type=int, default=16384 if gpu else 16,
                        help="the largest B tried (the loss costs B^2 (1 + M) D multiply-adds per step)")
    parser.add_argument("--max-batch-len", type=int, default=16, help="tokens per text in the --max-batch probe")
    parser.add_argument("--max-batch-chunk", type=int, default=128, help="GradCache mini-batch in the probe")
    parser.add_argument("--profile", action="store_true", help="print each step's top ops (torch.profiler)")
    parser.add_argument("--report", default="train_step", help="results name: benchmarks/results/<report>-<device>.*")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")
    with tempfile.TemporaryDirectory() as workdir:
        rows = run_all(build_model(QWEN2_05B if gpu else TOY, device), args, device, workdir)
        if args.max_batch:
            rows += largest_batches(build_model(MAX_BATCH_PROBE if gpu else TOY, device), args, device, workdir)
    columns = ["backend", "batch", "negatives", "chunk", "step_ms", "samples_per_s"] + (["peak_gib"] if gpu else []) + [
        "note"]
    write_report(args.report, rows, columns=columns, meta=dict(model="qwen2-0.5b-shaped" if gpu else "toy-qwen2",
                                                                query_len=args.query_len, doc_len=args.doc_len),
                 plot=dict(x="batch", y="samples_per_s", series="backend", logx=True,
                           title="training step throughput (GradCache, focal-InfoNCE)"))
    return 0


def optimizers(model, backends, device, workdir) -> tuple:
    """``(AdamW of the model, (SentenceTransformer copy of its weights, its AdamW) or None)``: the copy is made before
    any kalm_fast step, so both start from the same weights."""
    st = None
    if ST_BASELINE in backends:
        st_model = st_baseline(model, device, workdir)
        st = (st_model, torch.optim.AdamW(st_model.parameters(), lr=1e-5))
    return torch.optim.AdamW(model.parameters(), lr=1e-5), st


def _free_after_oom(optimizer, st):
    optimizer.zero_grad(set_to_none=True)
    if st is not None:
        st[1].zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()


def run_all(model, args, device, workdir) -> list:
    optimizer, st = optimizers(model, args.backends, device, workdir)
    rows = []
    for backend in args.backends:
        for batch in args.batch:
            try:
                rows.append(measure(model, optimizer, backend, batch, args, device, args.repeats, st))
            except torch.OutOfMemoryError:
                _free_after_oom(optimizer, st)
                rows.append(progress(dict(backend=backend, batch=batch, note="out of memory")))
            except Exception as exc:  # noqa: BLE001  (a failing backend is a row; the baselines after it still run)
                _free_after_oom(optimizer, st)
                rows.append(progress(dict(backend=backend, batch=batch, note=failed_note(exc))))
    return rows


@contextlib.contextmanager
def memory_limit(device, gib: float):
    """At most ``gib`` GiB more than what is allocated now, on a GPU (the caching allocator's limit); no limit on
    the CPU."""
    if device.type != "cuda":
        yield
        return
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    # the fraction bounds what the allocator reserves, blocks it keeps cached included
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved(device) + gib * 2**30) / total),
                                               device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def largest_batches(model, args, device, workdir) -> list:
    """``--max-batch``: per backend, the largest B from ``--max-batch-start`` doubling to ``--max-batch-cap`` whose
    step fits in ``--max-batch-gib`` GiB above the weights and optimizer states (see the module docstring)."""
    optimizer, st = optimizers(model, args.backends, device, workdir)
    vocab, length = model.config.vocab_size, args.max_batch_len
    rows = []
    for backend in args.backends:
        make_step(model, optimizer, backend, make_texts(4, args.negatives, length, length, vocab), 4, device, st,
                  args.synthetic)()  # creates the optimizer states, which the limit leaves out
        fits, batch = None, args.max_batch_start
        while batch <= args.max_batch_cap:
            chunk, texts = min(args.max_batch_chunk, batch), make_texts(batch, args.negatives, length, length, vocab)
            try:
                with memory_limit(device, args.max_batch_gib):
                    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    started = time.perf_counter()
                    make_step(model, optimizer, backend, texts, chunk, device, st, args.synthetic)()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    fits = dict(batch=batch, chunk=chunk, step_ms=(time.perf_counter() - started) * 1e3)
                    if device.type == "cuda":
                        fits["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                    progress(dict(fits, backend=f"{backend}: fits"))  # a probe cut short still shows how far it got
            except torch.OutOfMemoryError:
                _free_after_oom(optimizer, st)
                break
            batch *= 2
        last = "the cap" if batch > args.max_batch_cap else f"B = {batch} ran out of memory"
        limit = f"{args.max_batch_gib:g} GiB above the weights" if device.type == "cuda" else "no limit on the CPU"
        note = (f"largest B ({limit}; {last}; step_ms: its one step, cold): {model.config.num_hidden_layers} layers "
                f"of width {model.config.hidden_size}, {length}-token texts")
        rows.append(progress(dict(fits or {}, backend=f"{backend}: largest B", negatives=args.negatives,
                                  note=note if fits else f"B = {args.max_batch_start} ran out of memory")))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
