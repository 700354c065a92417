"""transformers' own decoder modules (Qwen2, Qwen3, Llama, Mistral) with fused elementwise ops, training included.

With ``KALM_FUSED_DECODER=1`` (read at each call; off by default until a GPU run shows it faster:
``python -m benchmarks.train_step`` and ``python -m benchmarks.encode`` time it), on CUDA tensors (or in the Triton
interpreter), the modules of a decoder model run:
- RMSNorm as torch's ``F.rms_norm`` in the promoted dtype of input and weight instead of transformers' six ops with
  fp32 intermediates;
- the gated MLP's ``silu(gate) * up`` as ``decoder_kernels.silu_mul`` (one pass, its backward one pass);
- RoPE on Q and K as ``decoder_kernels.rope`` (one pass each way; Qwen3's q/k norms before it), then kalm_fast's
  attention function, as transformers' attention module does;
- the residual add after attention and the RMSNorm before the MLP as ``decoder_kernels.add_rms_norm`` (one pass each
  way). Under autocast the two norms' outputs come in the autocast dtype, which the projections after them would
  cast to each (the residual stream stays fp32).
Elsewhere, and for what they do not handle (a KV cache, partial rotary angles, a model switched off kalm_fast's
attention, hooks on the norm after attention), the modules run their own forward. Parameters, state dicts, hooks and
checkpointing are unchanged: ``install`` only gives each module instance a forward of its own. This is the path of
training and of GPU inference off the packed decoder (``decoder_packed``, which takes the same kernels on its own
layout).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .._registry import triton_interpreting, triton_unavailable
from .bidirectional import NAME, kalm_attention_forward, layer_window

SETTING = "KALM_FUSED_DECODER"


def enabled(x: torch.Tensor) -> bool:
    """Whether a module called on ``x`` takes its fused forward: ``KALM_FUSED_DECODER=1``, ``x`` on CUDA or the
    Triton interpreter on, Triton importable."""
    setting = os.environ.get(SETTING, "0")
    if setting not in ("0", "1"):
        raise ValueError(f"{SETTING} must be 0 or 1, got {setting!r}")
    return setting == "1" and (x.is_cuda or triton_interpreting()) and triton_unavailable() is None


def _is_rms_norm(module) -> bool:
    """transformers' RMSNorm of these families (``weight * x / rms(x)``, eps in ``variance_epsilon``)."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _rms_norm_forward(self, hidden_states):
    """transformers' RMSNorm as one ``F.rms_norm`` in the promoted dtype of input and weight (the dtype transformers
    returns; torch fuses it only where the two agree: Qwen3's q/k norms under autocast get a half-precision input)."""
    if not enabled(hidden_states):
        return type(self).forward(self, hidden_states)
    dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
    with torch.autocast(hidden_states.device.type, enabled=False):  # CUDA autocast would run (and return) it in fp32
        return F.rms_norm(hidden_states.to(dtype), self.weight.shape, self.weight.to(dtype), self.variance_epsilon)


def _mlp_forward(self, x):
    if enabled(x):
        from .decoder_kernels import silu_mul

        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """transformers' decoder attention (projections, Qwen3's q/k norms, RoPE, attention, output projection) on
    ``hidden_states [B, L, H]`` with ``position_embeddings`` = (cos, sin) ``[B, L, head_dim]``."""
    head_dim = self.head_dim
    fused = (enabled(hidden_states) and position_embeddings is not None and self.config._attn_implementation == NAME
             and position_embeddings[0].shape[-1] == head_dim
             and kwargs.get("past_key_values") is None and kwargs.get("cache") is None)
    if not fused:
        return type(self).forward(self, hidden_states=hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, **kwargs)
    from .decoder_kernels import rope

    lead = hidden_states.shape[:-1]
    q, k, v = (proj(hidden_states).view(*lead, -1, head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
    if hasattr(self, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    half = head_dim // 2  # cos/sin [B or 1, L, head_dim] (both halves alike) -> [B * L, head_dim / 2]
    cos, sin = (c[..., :half].expand(*lead, half).reshape(-1, half) for c in position_embeddings)
    q, k = (rope(x.reshape(-1, *x.shape[-2:]), cos, sin).view(x.shape) for x in (q, k))
    out, _ = kalm_attention_forward(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                                    scaling=self.scaling, sliding_window=layer_window(self), **kwargs)
    return self.o_proj(out.reshape(*lead, -1)), None


def _layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    """transformers' decoder layer (RMSNorm, attention, residual add, RMSNorm, MLP, residual add) on
    ``hidden_states [B, L, H]``, the add after attention and the RMSNorm after it fused; every keyword goes to the
    attention module, as the layer passes it on. With gradient checkpointing on, the layer is checkpointed as
    transformers does it (newer transformers checkpoint in the class's ``forward``, which this one replaces). With a
    KV cache, or hooks on the norm after attention (which the fused kernel would skip), the layer's own forward runs."""
    norm = self.post_attention_layernorm
    if (not enabled(hidden_states) or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
            or norm._forward_hooks or norm._forward_pre_hooks):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
    if (getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled()
            and not _checkpoints_in_call(self)):
        return self._gradient_checkpointing_func(
            functools.partial(_fused_layer, self, attention_mask=attention_mask, **kwargs), hidden_states)
    return _fused_layer(self, hidden_states, attention_mask=attention_mask, **kwargs)


def _fused_layer(self, hidden_states, attention_mask=None, **kwargs):
    """The body of ``_layer_forward``."""
    from .decoder_kernels import add_rms_norm

    device_type = hidden_states.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    normed = self.input_layernorm(hidden_states)
    if out_dtype is not None:  # cast once for the Q/K/V projections (autocast would cast it for each)
        normed = normed.to(out_dtype)
    attended, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, **kwargs)
    norm = self.post_attention_layernorm
    normed, residual = add_rms_norm(hidden_states, attended, norm.weight, norm.variance_epsilon, out_dtype)
    return residual + self.mlp(normed)


def _checkpoints_in_call(layer) -> bool:
    """Whether transformers checkpoints ``layer`` in ``GradientCheckpointingLayer.__call__`` (up to 5.17 at least:
    an instance ``forward`` runs inside the checkpoint) rather than in the class's ``forward`` (5.24)."""
    base = next((c for c in type(layer).__mro__ if c.__name__ == "GradientCheckpointingLayer"), None)
    return base is not None and "__call__" in vars(base)


def install(model) -> None:
    """Bind the fused forwards to the decoder layers and their RMSNorm, gated-MLP and attention modules of a decoder
    base model that ``decoder_packed.supports`` (idempotent; partials, which pickle and deep-copy with their
    module)."""
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = functools.partial(_rms_norm_forward, module)
    for layer in model.layers:
        if _is_rms_norm(getattr(layer, "input_layernorm", None)) and _is_rms_norm(
                getattr(layer, "post_attention_layernorm", None)):
            layer.forward = functools.partial(_layer_forward, layer)
        layer.mlp.forward = functools.partial(_mlp_forward, layer.mlp)
        layer.self_attn.forward = functools.partial(_attention_forward, layer.self_attn)
