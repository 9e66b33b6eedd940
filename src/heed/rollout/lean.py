"""A lean decoding step for Llama-style decoders: the one-token forward written as plain tensor ops.

At small batches a decoding step of a small model is mostly per-call overhead: ``transformers``'
forward goes through ~15 module calls per layer, its mask and cache bookkeeping, and an attention
dispatcher, for a few small matmuls. This step does the same arithmetic with a handful of ops per
layer, reading the model's own weights (so a step after an optimiser update uses the new ones):

    x = embed[tok]                                                # (B, d)
    per layer:  h = rms(x) ; q, k, v = h Wq, h Wk, h Wv (+ bias) ; q, k = norm_head(q, k) (Qwen3)
                q, k = rope(q, k, position) ; cache[:, :, t] = k, v
                x = x + Wo softmax(q K^T / sqrt(D) + mask) V      # K, V: the row's cache (B, Hkv, L, D)
                h = rms(x) ; x = x + Wdown (silu(h Wgate) * h Wup)
    logits = rms(x) W_lm                                          # (B, V)

which is the Llama decoder layer (Touvron et al. 2023, https://arxiv.org/abs/2302.13971) as
``transformers`` computes it for ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` (RMSNorm with the
float32 upcast, rotate-half RoPE, grouped-query attention with the G = H / Hkv query heads of a
key-value head attending as G query rows, sliding windows from the config). On a CPU the q/k/v and
gate/up weights are concatenated and every matrix stored transposed once per decode (a copy of the
weights for its duration): one matmul where the model makes two or three, and the kernel that reads
a (d, out) row-major matrix, which is faster than ``linear``'s at a few rows on this hardware. On
other devices the model's weights are used as they are.

Anything else (another architecture, LoRA or quantised layers, hooks, sharded parameters, RoPE
variants that depend on the sequence length, dropout in training mode) is refused by
:func:`lean_unsupported`, and the sampler runs the model's own forward instead. The prefill always
runs the model's forward; this step reads and writes the same preallocated cache buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from heed.models.lm import unwrap

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class _Layer:
    qkv: torch.Tensor  # (d, (H + 2 Hkv) D) on CPU (transposed), else ((H + 2 Hkv) D, d)
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # (d, 2 I) on CPU, else (2 I, d)
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None  # (D,) Qwen3's per-head norms
    k_norm: torch.Tensor | None
    window: int | None  # sliding window (positions a query may look back, itself included)


def lean_unsupported(model: Any) -> str | None:
    """Why :class:`LeanStep` cannot run ``model``, or None when it can."""
    m = unwrap(model)
    config = getattr(m, "config", None)
    if config is None or config.model_type not in LEAN_MODEL_TYPES:
        kind = getattr(config, "model_type", type(m).__name__)
        return f"model type {kind!r} (supported: {', '.join(LEAN_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    body = getattr(m, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(m, "lm_head"):
        return "no model.layers / lm_head"
    rope = getattr(getattr(body, "rotary_emb", None), "rope_type", None)
    if rope is None or "dynamic" in rope or "longrope" in rope:
        return f"RoPE type {rope!r}"
    if m.training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout in training mode"
    for mod in m.modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"hooks on {type(mod).__name__}"
        if isinstance(mod, torch.nn.Linear) and type(mod) is not torch.nn.Linear:
            return f"{type(mod).__name__} layers"
        if type(mod).__module__.startswith(("peft", "bitsandbytes")):
            return f"{type(mod).__name__} layers"
    for p in m.parameters():
        if type(p.data) is not torch.Tensor:  # DTensor (FSDP2), quantised tensors
            return f"{type(p.data).__name__} parameters"
    for mod in (m, body, body.norm, *body.layers):
        if not type(mod).__module__.startswith("transformers.models."):
            return f"{type(mod).__name__} is not transformers' own class"
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for mod in (attn, mlp, layer.input_layernorm, layer.post_attention_layernorm):
            if not type(mod).__module__.startswith("transformers.models."):
                return f"{type(mod).__name__} is not transformers' own class"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if type(getattr(attn, name, None)) is not torch.nn.Linear:
                return f"attention without a plain {name}"
        for name in ("gate_proj", "up_proj", "down_proj"):
            if type(getattr(mlp, name, None)) is not torch.nn.Linear:
                return f"MLP without a plain {name}"
    return None


_PROBE_KEY = "_heed_lean_probe"


def lean_support(model: Any) -> str | None:
    """Why the sampler must not use :class:`LeanStep` on ``model``, or None: :func:`lean_unsupported`,
    then (once per model, cached on it) a probe: one lean step after a two-token prefill must give the
    logits of the model's own forward over the three tokens (relative error under 1e-3 in float32,
    5e-2 in half precision), so a model whose forward does more than its modules say is refused."""
    reason = lean_unsupported(model)
    if reason is not None:
        return reason
    base = unwrap(model)
    if _PROBE_KEY not in base.__dict__:
        base.__dict__[_PROBE_KEY] = _probe(base)
    return base.__dict__[_PROBE_KEY]


@torch.no_grad()
def _probe(model: Any) -> str | None:
    from heed.rollout.sampler import _buffered_cache, _cache_argument

    weight = model.lm_head.weight
    ids = torch.tensor([[3, 4, 5]], device=weight.device) % model.config.vocab_size
    mask = torch.ones_like(ids)
    full = model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
    cache_arg = _cache_argument(model)
    cache = _buffered_cache(3)
    out = model(input_ids=ids[:, :2], attention_mask=mask[:, :2], use_cache=True, **{cache_arg: cache})
    ours = LeanStep(model, 3)(out[cache_arg], ids[:, 2], torch.tensor([2], device=ids.device), 2, mask.bool())
    err = float((ours[0].float() - full).norm() / full.norm().clamp_min(1e-6))
    tol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 5e-2
    return (
        None
        if err <= tol
        else f"its forward differs from the lean step's arithmetic (relative error {err:.1e})"
    )


def _window(config: Any, index: int) -> int | None:
    size = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return size if types[index] == "sliding_attention" else None
    return size


class LeanStep:
    """One decoding step of ``model`` over a :func:`heed.rollout.sampler._buffered_cache`; built once per
    decode (the weights of that moment; on a CPU transposed copies of them).

    ``step(cache, tok (B,), pos (B,), write (int), visible (B, write + 1) bool) -> logits (B, V)``: the
    token at position ``pos`` is written at cache index ``write``; ``visible`` marks the cache indices
    each row holds (its prompt without the left padding, its answer so far, this token).
    """

    def __init__(self, model: Any, capacity: int) -> None:
        m = unwrap(model)
        config = m.config
        body = m.model
        first = body.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        self.eps = body.norm.variance_epsilon
        self.dtype = m.lm_head.weight.dtype
        device = m.lm_head.weight.device
        self.transposed = device.type == "cpu"

        def mat(*weights: torch.Tensor) -> torch.Tensor:
            w = weights[0] if len(weights) == 1 else torch.cat(weights)
            return w.t().contiguous() if self.transposed else w

        def bias(*linears: Any) -> torch.Tensor | None:
            if all(lin.bias is None for lin in linears):
                return None
            return torch.cat(
                [
                    lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                    for lin in linears
                ]
            )

        self.layers = []
        for i, layer in enumerate(body.layers):
            a, mlp = layer.self_attn, layer.mlp
            q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
            self.layers.append(
                _Layer(
                    qkv=mat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                    qkv_bias=bias(a.q_proj, a.k_proj, a.v_proj),
                    o=mat(a.o_proj.weight),
                    o_bias=a.o_proj.bias,
                    gate_up=mat(mlp.gate_proj.weight, mlp.up_proj.weight),
                    gate_up_bias=bias(mlp.gate_proj, mlp.up_proj),
                    down=mat(mlp.down_proj.weight),
                    down_bias=mlp.down_proj.bias,
                    ln1=layer.input_layernorm.weight,
                    ln2=layer.post_attention_layernorm.weight,
                    q_norm=None if q_norm is None else q_norm.weight,
                    k_norm=None if k_norm is None else k_norm.weight,
                    window=_window(config, i),
                )
            )
        self.embed = body.embed_tokens.weight
        self.norm = body.norm.weight
        self.lm_head = mat(m.lm_head.weight)
        self.lm_bias = m.lm_head.bias
        # cos / sin of every position the decode can reach, from the model's own rotary module
        positions = torch.arange(capacity, device=device)[None]
        cos, sin = body.rotary_emb(self.embed[:1][None], positions)  # (1, C, D)
        self.cos, self.sin = cos[0], sin[0]

    def _mm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.transposed:
            return x @ w if b is None else torch.addmm(b, x, w)
        return F.linear(x, w, b)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``w * (x / sqrt(mean(x^2) + eps))`` in float32, cast back before the weight (as the model)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def __call__(
        self, cache: Any, tok: torch.Tensor, pos: torch.Tensor, write: int, visible: torch.Tensor
    ) -> torch.Tensor:
        b = tok.shape[0]
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        g = h // hkv
        cos = self.cos[pos][:, None, :]  # (B, 1, D)
        sin = self.sin[pos][:, None, :]
        length = write + 1
        masks: dict[int | None, torch.Tensor] = {}

        def mask_for(window: int | None) -> torch.Tensor:
            if window not in masks:
                vis = visible
                if window is not None and length > window:
                    vis = vis.clone()
                    vis[:, : length - window] = False
                masks[window] = vis[:, None, None, :]  # (B, 1, 1, L)
            return masks[window]

        x = F.embedding(tok, self.embed)  # (B, d)
        for i, lay in enumerate(self.layers):
            qkv = self._mm(self._rms(x, lay.ln1), lay.qkv, lay.qkv_bias)  # (B, (H + 2 Hkv) D)
            qk, v = qkv.split(((h + hkv) * d, hkv * d), dim=-1)
            qk = qk.view(b, h + hkv, d)
            if lay.q_norm is not None and lay.k_norm is not None:
                qk = torch.cat((self._rms(qk[:, :h], lay.q_norm), self._rms(qk[:, h:], lay.k_norm)), dim=1)
            qk = self._rope(qk, cos, sin)  # queries and keys rotated together
            q = qk[:, :h].view(b, hkv, g, d)  # the G query heads of each key-value head as G query rows
            k = qk[:, h:].view(b, hkv, 1, d)
            layer = cache.layers[i]
            layer.kbuf[:, :, write : write + 1] = k
            layer.vbuf[:, :, write : write + 1] = v.view(b, hkv, 1, d)
            keys, values = layer.kbuf[:, :, :length], layer.vbuf[:, :, :length]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask_for(lay.window), scale=self.scaling
            )  # (B, Hkv, G, D)
            x = x + self._mm(out.reshape(b, h * d), lay.o, lay.o_bias)
            gate, up = self._mm(self._rms(x, lay.ln2), lay.gate_up, lay.gate_up_bias).chunk(2, dim=-1)
            x = x + self._mm(F.silu(gate) * up, lay.down, lay.down_bias)
        for layer in cache.layers:  # the cache now holds ``length`` positions
            layer.keys, layer.values = layer.kbuf[:, :, :length], layer.vbuf[:, :, :length]
        return self._mm(self._rms(x, self.norm), self.lm_head, self.lm_bias)
