"""Inference fast path for BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa) on packed tokens.

The transformers module's own weights and embedding/LayerNorm modules are reused; what changes is the
execution: every linear layer runs on the packed ``[T, H]`` tokens (no padding FLOPs), Q/K/V are one fused GEMM,
and attention runs per length bucket of the batch with ``scaled_dot_product_attention`` on CPU (the bucket plan is
built once per batch, not once per layer) or through ``ops.flash_attention`` (varlen) on GPU. Used without
autograd only; training goes through the transformers modules and the registered attention function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops

# A bucket groups consecutive (length-sorted) sequences whose lengths are within this ratio of its longest.
BUCKET_RATIO = 0.8


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


def _bucket_plan(lengths: list, device) -> list:
    """Per bucket of consecutive sequences: ``(gather index [n, Lb], key mask [n, 1, 1, Lb] or None, valid rows)``.

    ``gather index`` reads each sequence's tokens (padding positions repeat a real token); ``valid rows`` picks
    the real rows of the flattened ``[n * Lb]`` bucket output (None: all real), in packed order. Empty sequences
    have no rows and are left out.
    """
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    plan, i = [], 0
    while i < len(lengths):
        if lengths[i] == 0:
            i += 1
            continue
        j, hi, lo = i + 1, lengths[i], lengths[i]
        while j < len(lengths) and lengths[j] > 0 and min(lo, lengths[j]) >= BUCKET_RATIO * max(hi, lengths[j]):
            hi, lo = max(hi, lengths[j]), min(lo, lengths[j])
            j += 1
        lens = torch.tensor(lengths[i:j], device=device)
        pos = torch.arange(hi, device=device)
        valid = pos[None, :] < lens[:, None]
        index = torch.tensor(starts[i:j], device=device)[:, None] + torch.minimum(pos[None, :], lens[:, None] - 1)
        if lo == hi:
            plan.append((index, None, None))
        else:
            plan.append((index, valid[:, None, None, :], valid.flatten().nonzero().flatten()))
        i = j
    return plan


class PackedBert:
    """Callable ``(input_ids [T], position_ids [T], cu_seqlens [N+1], max_seqlen) -> hidden [T, H]``."""

    def __init__(self, model):
        self.model = model
        self._fused = {}

    def _qkv(self, layer):
        """``(weight [3H, H], bias [3H])`` of the layer's Q, K, V linears, cached until a weight changes."""
        s = layer.attention.self
        parts = (s.query, s.key, s.value)
        key = tuple((p.weight.data_ptr(), p.weight._version, p.bias._version) for p in parts)
        cached = self._fused.get(id(layer))
        if cached is None or cached[0] != key:
            weight = torch.cat([p.weight for p in parts]).contiguous()
            bias = torch.cat([p.bias for p in parts]).contiguous()
            cached = (key, weight, bias)
            self._fused[id(layer)] = cached
        return cached[1], cached[2]

    def _attention(self, qkv, plan, cu_seqlens, max_seqlen, heads, head_dim):
        """``qkv [T, 3, heads, D]`` -> context ``[T, heads * D]``."""
        T = qkv.shape[0]
        if qkv.device.type != "cpu":
            q, k, v = qkv.unbind(1)
            return ops.flash_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).reshape(T, -1)
        outs = []
        for index, mask, valid in plan:
            n, L = index.shape
            q, k, v = qkv[index].permute(2, 0, 3, 1, 4).unbind(0)            # each [n, heads, L, D]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)      # [n, heads, L, D]
            o = o.transpose(1, 2).reshape(n * L, heads * head_dim)
            outs.append(o if valid is None else o[valid])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, input_ids, position_ids, cu_seqlens, max_seqlen):
        model = self.model
        config = model.config
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        plan = None
        if input_ids.device.type == "cpu":
            plan = _bucket_plan((cu_seqlens[1:] - cu_seqlens[:-1]).tolist(), input_ids.device)
        x = model.embeddings(input_ids=input_ids[None], position_ids=position_ids[None])[0]
        for layer in model.encoder.layer:
            weight, bias = self._qkv(layer)
            qkv = F.linear(x, weight, bias).view(-1, 3, heads, head_dim)
            ctx = self._attention(qkv, plan, cu_seqlens, max_seqlen, heads, head_dim)
            out = layer.attention.output
            x = out.LayerNorm(torch.addmm(out.dense.bias, ctx, out.dense.weight.t()).add_(x))
            h = F.gelu(torch.addmm(layer.intermediate.dense.bias, x, layer.intermediate.dense.weight.t()))
            out = layer.output
            x = out.LayerNorm(torch.addmm(out.dense.bias, h, out.dense.weight.t()).add_(x))
        return x
