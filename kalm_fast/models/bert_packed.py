"""Inference fast path for BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa) on packed tokens.

The transformers module's own weights and embedding/LayerNorm modules are reused; what changes is the
execution: every linear layer runs on the packed ``[T, H]`` tokens (no padding FLOPs), Q/K/V are one fused GEMM,
and attention runs per run of equal-length sequences on CPU (zero-copy views of the packed Q/K/V, no masks) or
through ``ops.flash_attention`` (varlen) with the model's attention backend on GPU, or on CPU when a backend other
than "auto" / "torch" was asked for. On CPU the linear layers go through oneDNN with weights packed
once into its blocked layout and the GELU fused into the up-projection (measured ~15% faster than ``addmm``
plus a separate GELU, see ``benchmarks/encode.py``); ``addmm`` is the fallback where oneDNN is missing.
Used without autograd only; training goes through the transformers modules and the registered attention function.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from .. import ops

# CPU: runs of sequences up to this length use matmul-softmax-matmul (cheaper than SDPA's flash kernel for short
# rows, measured), longer ones SDPA.
MATMUL_ATTENTION_MAX_LEN = 128


def supports(model) -> bool:
    """True for transformers BERT-like models with the standard layer layout and an exact-GELU MLP."""
    if model.config.model_type not in ("bert", "roberta", "xlm-roberta", "camembert"):
        return False
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None or len(layers) == 0:
        return False
    layer = layers[0]
    return (getattr(model.config, "hidden_act", None) == "gelu"
            and getattr(model.config, "position_embedding_type", "absolute") == "absolute"
            and hasattr(layer, "attention") and hasattr(layer.attention, "self")
            and hasattr(layer.attention.self, "query") and hasattr(layer, "intermediate"))


@functools.lru_cache(maxsize=None)
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU run ``mkldnn::_linear_pointwise`` on packed ``dtype`` weights (fp32: x86 and
    most aarch64 builds; bf16 / fp16 only where the CPU has the instructions)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2, dtype=dtype), None)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2, dtype=dtype), weight, torch.zeros(2, dtype=dtype),
                                                 "gelu", [], "none")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(out.float(), F.gelu(torch.full((1, 2), 2.0)), atol=1e-2))


def equal_length_runs(lengths: list) -> list:
    """``(first token, sequences, length)`` per maximal run of consecutive equal-length, non-empty sequences."""
    runs, start = [], 0
    for length, group in itertools.groupby(lengths):
        count = len(list(group))
        if length > 0:
            runs.append((start, count, length))
        start += count * length
    return runs


def layer_weights(cache: dict, layer, groups: list, onednn: bool) -> tuple:
    """``(onednn, [(weight, bias)] per group)`` of one layer's linear modules, each group fused into one GEMM
    (weights and biases concatenated; biases may be None) and packed for oneDNN when ``onednn``.

    Cached in ``cache`` per layer, keyed on every parameter's storage and version: rebuilt when a parameter changes
    (in place too), so no copy outlives a change."""
    key = (onednn, tuple((p.data_ptr(), p._version, p.dtype) for group in groups for m in group
                         for p in (m.weight, m.bias) if p is not None))
    cached = cache.get(id(layer))
    if cached is None or cached[0] != key:
        weights = []
        for group in groups:
            weight = torch.cat([m.weight for m in group]) if len(group) > 1 else group[0].weight
            bias = group[0].bias
            if len(group) > 1 and bias is not None:
                bias = torch.cat([m.bias for m in group])
            if onednn:
                weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            weights.append((weight, bias))
        cached = (key, (onednn, weights))
        cache[id(layer)] = cached
    return cached[1]


class PackedBert:
    """Callable ``(PackedBatch) -> hidden [T, H]``."""

    def __init__(self, model, onednn: bool = True):
        self.model = model
        self.onednn = onednn  # CPU linears through oneDNN where the torch build and the CPU have it for the dtype
        self.weight_cache = {}  # layer_weights' copies; EmbeddingModel.train clears it

    def _layer_weights(self, layer, x) -> tuple:
        """``(packed, [(weight, bias)])``: the layer's QKV (fused), attention output, up and down projections."""
        s = layer.attention.self
        return layer_weights(self.weight_cache, layer, [(s.query, s.key, s.value), (layer.attention.output.dense,),
                                                    (layer.intermediate.dense,), (layer.output.dense,)],
                             self.onednn and x.device.type == "cpu" and onednn_linear_available(x.dtype))

    @staticmethod
    def _linear(x, weight, bias, packed: bool, gelu: bool = False):
        if packed:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                      "none" if gelu else "")
        y = torch.addmm(bias, x, weight.t())
        return F.gelu(y) if gelu else y

    @staticmethod
    def _cpu_attention(qkv, runs, heads, head_dim):
        """``qkv [T, 3 * heads * D]`` -> context ``[T, heads * D]``, one attention call per run of equal lengths."""
        ctx = torch.empty(qkv.shape[0], heads * head_dim, dtype=qkv.dtype)
        for start, count, length in runs:
            rows = slice(start, start + count * length)
            q, k, v = qkv[rows].view(count, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if length <= MATMUL_ATTENTION_MAX_LEN:  # in fp32 whatever the model dtype, as SDPA accumulates
                scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(1 / math.sqrt(head_dim))
                o = torch.matmul(torch.softmax(scores, -1), v.float())
            else:
                o = F.scaled_dot_product_attention(q, k, v)                    # [count, heads, length, D]
            ctx[rows].view(count, length, heads, head_dim).copy_(o.transpose(1, 2))
        return ctx

    def __call__(self, batch):
        model = self.model
        heads = model.config.num_attention_heads
        head_dim = model.config.hidden_size // heads
        backend = getattr(model.config, "kalm_attn_backend", "auto")
        per_run = batch.input_ids.device.type == "cpu" and backend in ("auto", "torch")
        runs = equal_length_runs(batch.varlen.lengths) if per_run else None
        x = model.embeddings(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                             token_type_ids=torch.zeros_like(batch.input_ids)[None])[0]  # not the 512-long buffer
        for layer in model.encoder.layer:
            packed, ((w_qkv, b_qkv), (w_o, b_o), (w_up, b_up), (w_down, b_down)) = self._layer_weights(layer, x)
            qkv = self._linear(x, w_qkv, b_qkv, packed)
            if per_run:
                ctx = self._cpu_attention(qkv, runs, heads, head_dim)
            else:
                q, k, v = qkv.view(-1, 3, heads, head_dim).unbind(1)
                ctx = ops.flash_attention(q, k, v, cu_seqlens=batch.varlen, backend=backend).flatten(1)
            x = layer.attention.output.LayerNorm(self._linear(ctx, w_o, b_o, packed).add_(x))
            h = self._linear(x, w_up, b_up, packed, gelu=True)
            x = layer.output.LayerNorm(self._linear(h, w_down, b_down, packed).add_(x))
        return x
