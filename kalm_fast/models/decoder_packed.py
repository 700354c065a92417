"""Inference fast path for decoder LLMs made bidirectional (Qwen2, Qwen3, Llama, Mistral; or kept causal for
last-token pooling) on packed tokens.

``EmbeddingModel`` takes it on CPU, and on a GPU with ``KALM_PACKED_DECODER=all`` (``runs_on``; off there by
default until a GPU run shows it faster than transformers' modules: ``python -m benchmarks.encode`` times both).

The transformers module's own weights, token embedding and rotary embedding are reused; what changes is the
execution. Every linear layer runs on the packed ``[T, H]`` tokens (no padding FLOPs); Q/K/V are one GEMM (gate/up
too, without oneDNN); the residual adds are fused into the output and down projections. On CPU the linear layers go
through oneDNN with weights packed once into its blocked layout (fp32, and bf16 where the CPU has it), the SiLU fused
into the gate projection and the multiply into the up projection, so the ``[T, intermediate]`` activations are
written once; ``addmm`` / ``F.linear`` is the fallback where oneDNN is missing. On a GPU the SiLU-multiply and RoPE
are ``decoder_kernels``' Triton kernels, one pass each. RMSNorm is ``F.rms_norm``, RoPE is applied in place on Q
and K. Attention is bidirectional: per run of equal-length sequences on CPU with the "auto" / "torch" backends
(zero-copy views of K and V, the query heads of one key/value head stacked so that GQA needs no repeated K/V),
otherwise ``ops.flash_attention`` (varlen) with the model's attention backend; causal (a last-token-pooled decoder,
``bidirectional.runs_causally``) and local layers whose window is shorter than a batch's longest text (Mistral's,
Qwen2's sliding windows) through ``ops.flash_attention``.
Used without autograd only; training goes through the transformers modules and the registered attention function.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import ops
from .._registry import triton_unavailable
from ..ops.attention import window_masks_nothing
from .bert_packed import MATMUL_ATTENTION_MAX_LEN, equal_length_runs, layer_weights, onednn_linear_available
from .bidirectional import layer_window, window_band

FAMILIES = ("qwen2", "qwen3", "llama", "mistral")
SETTINGS = {"cpu": ("cpu",), "all": ("cpu", "cuda")}  # KALM_PACKED_DECODER: the device types that take the path


def runs_on(device: torch.device) -> bool:
    """Whether inference on ``device`` takes this fast path: ``KALM_PACKED_DECODER`` (``cpu`` when unset)."""
    setting = os.environ.get("KALM_PACKED_DECODER", "cpu")
    if setting not in SETTINGS:
        raise ValueError(f"KALM_PACKED_DECODER must be one of {tuple(SETTINGS)}, got {setting!r}")
    return device.type in SETTINGS[setting]


def supports(model) -> bool:
    """True for a transformers Qwen2 / Qwen3 / Llama / Mistral base model with a SiLU-gated MLP whose rotary
    embedding turns every dimension of a head (not a partial rotary one).

    The fast path is bidirectional, or causal where ``make_bidirectional`` recorded it (``config.kalm_causal``):
    ``make_bidirectional`` must have run on the model."""
    config = model.config
    if config.model_type not in FAMILIES or getattr(config, "hidden_act", None) != "silu":
        return False
    layers = getattr(model, "layers", None)
    if not layers or not all(hasattr(model, name) for name in ("embed_tokens", "norm", "rotary_emb")):
        return False
    attn, mlp = getattr(layers[0], "self_attn", None), getattr(layers[0], "mlp", None)
    inv_freq = getattr(model.rotary_emb, "inv_freq", None)  # one frequency per pair of rotated dimensions
    return (all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"))
            and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and inv_freq is not None and 2 * inv_freq.numel() == attn.head_dim)


def _linear(x, weight, bias, packed: bool, add=None):
    """``x [T, in] @ weight.T + bias (+ add [T, out])``; ``weight`` packed for oneDNN when ``packed``."""
    if packed:
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, add, weight, bias, "add")
    if add is None:
        return F.linear(x, weight, bias)
    y = torch.addmm(add, x, weight.t())
    return y if bias is None else y.add_(bias)


def _gated_mlp_input(x, weights, packed: bool, fused: bool):
    """``silu(x @ Wg.T + bg) * (x @ Wu.T + bu)``: ``x [T, H]`` -> ``[T, I]``. ``weights``: the gate's and the up
    projection's (weight, bias) when ``packed``, else their concatenation (one GEMM), followed by the Triton
    SiLU-multiply when ``fused``."""
    if packed:  # SiLU and multiply as oneDNN post-ops: no extra pass over [T, I]
        (w_gate, b_gate), (w_up, b_up) = weights
        g = torch.ops.mkldnn._linear_pointwise(x, w_gate, b_gate, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, g, w_up, b_up, "mul")
    ((w_gate_up, b_gate_up),) = weights
    gate_up = F.linear(x, w_gate_up, b_gate_up)
    if fused:
        from .decoder_kernels import silu_mul

        return silu_mul(*gate_up.chunk(2, dim=1))
    gate, up = gate_up.chunk(2, dim=1)
    return F.silu(gate, inplace=True).mul_(up)  # [T, I] view with row stride 2I


def _rope_(x, cos, sin):
    """Rotate ``x [T, heads, D]`` in place by the rotary angles (``cos``, ``sin`` ``[T, D/2]``), as transformers'
    ``apply_rotary_pos_emb``: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``. One half-size temporary."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None], sin[:, None]
    x1_sin = x1 * sin
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).add_(x1_sin)


def attention_per_run(q, k, v, runs, scale: float):
    """Bidirectional attention per run of equal-length sequences on the packed layout.

    ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` (views with any row stride), ``runs`` as ``equal_length_runs``
    -> ``[T, Hq * D]``. Query head h reads key/value head ``h // (Hq // Hkv)``: the query heads of a group are
    stacked along the rows (``[n, Hkv, G * L, D]``), so K and V are used as zero-copy views, never repeated.
    Runs up to ``MATMUL_ATTENTION_MAX_LEN`` tokens use matmul-softmax-matmul in fp32, longer ones SDPA.
    """
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    ctx = q.new_empty(tokens, q_heads, head_dim)
    for start, count, length in runs:
        rows = slice(start, start + count * length)
        qr = (q[rows].view(count, length, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
              .reshape(count, kv_heads, group * length, head_dim))
        kr, vr = (x[rows].view(count, length, kv_heads, head_dim).transpose(1, 2) for x in (k, v))
        if length <= MATMUL_ATTENTION_MAX_LEN:
            scores = torch.matmul(qr.float(), kr.float().transpose(-1, -2)).mul_(scale)
            o = torch.matmul(torch.softmax(scores, -1), vr.float())
        else:
            o = F.scaled_dot_product_attention(qr, kr, vr, scale=scale)          # [count, Hkv, G * L, D]
        ctx[rows].view(count, length, kv_heads, group, head_dim).copy_(
            o.view(count, kv_heads, group, length, head_dim).permute(0, 3, 1, 2, 4))
    return ctx.view(tokens, q_heads * head_dim)


class PackedDecoder:
    """Callable ``(PackedBatch) -> last hidden state [T, H]``."""

    def __init__(self, model, onednn: bool = True, fused: "bool | None" = None):
        self.model = model
        self.onednn = onednn  # CPU linears through oneDNN where the torch build and the CPU have it for the dtype
        # SiLU-multiply and RoPE through decoder_kernels (None: on CUDA tensors, where Triton imports)
        self.fused = fused
        self.weight_cache = {}  # layer_weights' copies; EmbeddingModel.train clears it

    def _layer_weights(self, layer, x) -> tuple:
        """``(packed, [(weight, bias)])``: the layer's QKV (one GEMM), output, MLP input (gate and up for oneDNN's
        post-ops when ``packed``, else one gate-up GEMM) and down projections."""
        attn, mlp = layer.self_attn, layer.mlp
        packed = self.onednn and x.device.type == "cpu" and onednn_linear_available(x.dtype)
        mlp_input = [(mlp.gate_proj,), (mlp.up_proj,)] if packed else [(mlp.gate_proj, mlp.up_proj)]
        return layer_weights(self.weight_cache, layer, [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,),
                                                    *mlp_input, (mlp.down_proj,)], packed)

    def __call__(self, batch):
        model = self.model
        head_dim = model.layers[0].self_attn.head_dim
        q_heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        backend = getattr(model.config, "kalm_attn_backend", "auto")
        causal = getattr(model.config, "kalm_causal", False)  # a last-token-pooled decoder's (runs_causally)
        per_run = batch.input_ids.device.type == "cpu" and backend in ("auto", "torch") and not causal
        runs = equal_length_runs(batch.varlen.lengths) if per_run else None
        x = model.embed_tokens(batch.input_ids)                                                # [T, H]
        cos, sin = model.rotary_emb(x, batch.position_ids[None])                               # [1, T, D]
        cos, sin = cos[0, :, :head_dim // 2], sin[0, :, :head_dim // 2]                        # [T, D/2]
        fused = self.fused if self.fused is not None else x.is_cuda and triton_unavailable() is None
        if fused:
            from .decoder_kernels import rope_ as rotate
        else:
            rotate = _rope_
        hidden = x.shape[1]
        for layer in model.layers:
            attn = layer.self_attn
            packed, (qkv_w, o_w, *mlp_input_w, down_w) = self._layer_weights(layer, x)
            norm = layer.input_layernorm
            h = F.rms_norm(x, (hidden,), norm.weight, norm.variance_epsilon)
            qkv = _linear(h, *qkv_w, packed)
            q, k, v = (t.view(-1, n, head_dim) for t, n in zip(
                qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 1),
                (q_heads, kv_heads, kv_heads)))
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
                q = F.rms_norm(q, (head_dim,), attn.q_norm.weight, attn.q_norm.variance_epsilon)
                k = F.rms_norm(k, (head_dim,), attn.k_norm.weight, attn.k_norm.variance_epsilon)
            rotate(q, cos, sin)
            rotate(k, cos, sin)
            window = window_band(model.config, layer_window(attn))
            if per_run and window_masks_nothing(window, False, batch.varlen.max_seqlen):
                ctx = attention_per_run(q, k, v, runs, attn.scaling)
            else:
                ctx = ops.flash_attention(q, k, v, cu_seqlens=batch.varlen, causal=causal, window=window,
                                          softmax_scale=attn.scaling, backend=backend).flatten(1)
            x = _linear(ctx, *o_w, packed, add=x)
            norm = layer.post_attention_layernorm
            h = F.rms_norm(x, (hidden,), norm.weight, norm.variance_epsilon)
            x = _linear(_gated_mlp_input(h, mlp_input_w, packed, fused), *down_w, packed, add=x)
        return F.rms_norm(x, (hidden,), model.norm.weight, model.norm.variance_epsilon)
