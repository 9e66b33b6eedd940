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
key-value head attending as G query rows, sliding windows from the config). On a CPU with oneDNN
(PyTorch's ``torch.ops.mkldnn``), float32 models decode with packed weights: the q/k/v and gate/up
matrices concatenated, and every matrix reordered into oneDNN's blocked layout once per decode (the
weights of that moment; the copy is freed with the step). At a few rows a decoding step is bound by
reading the weights, and oneDNN's kernel over a packed matrix reads them 1.3-1.8x faster than
``linear`` over the layers' own on the CPUs measured (``benchmarks/decode.py``). Other devices and
dtypes use the layers' own weights, one ``linear`` each.

Anything else (another architecture, LoRA or quantised layers, hooks, sharded parameters, RoPE
variants that depend on the sequence length, dropout in training mode) is refused by
:func:`lean_unsupported`, and the sampler runs the model's own forward instead. The prefill always
runs the model's forward; this step reads and writes the same preallocated cache buffers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from heed.models.lm import _rel_err, _tolerance, attention_windows, unwrap

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class Projection:
    """``x -> x W^T + b`` for one or several linear layers side by side (their outputs concatenated).

    Where :func:`packs_weights` holds for every matrix, they are concatenated and packed for oneDNN
    (for ``rows``, the batch the decode starts with): one matmul where the model makes two or three.
    Otherwise the layers' own weights, one ``linear`` each (no extra memory)."""

    def __init__(self, linears: list[Any], rows: int) -> None:
        self.packed = all(packs_weights(lin.weight) for lin in linears)
        if self.packed:
            weights = [lin.weight.detach() for lin in linears]
            weight = torch.cat(weights) if len(weights) > 1 else weights[0].contiguous()
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            biases = [lin.bias for lin in linears]
            self.bias = (
                None
                if all(b is None for b in biases)
                else torch.cat(
                    [
                        b.detach() if b is not None else lin.weight.new_zeros(lin.out_features)
                        for b, lin in zip(biases, linears, strict=True)
                    ]
                )
            )
        else:
            self.pairs = [(lin.weight, lin.bias) for lin in linears]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        outs = [F.linear(x, w, b) for w, b in self.pairs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@functools.cache
def _onednn_linear() -> bool:
    """Whether this PyTorch build packs and applies linear weights with oneDNN on the CPU, exactly
    enough (checked once on a small matrix)."""
    if not torch.backends.mkldnn.is_available():
        return False
    w = torch.linspace(-1.0, 1.0, 96).view(8, 12)
    x = torch.linspace(0.5, -0.5, 36).view(3, 12)
    try:
        y = torch.ops.mkldnn._linear_pointwise(
            x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None, "none", [], ""
        )
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return bool(torch.allclose(y, x @ w.t(), rtol=1e-5, atol=1e-6))


def packs_weights(weight: torch.Tensor) -> bool:
    """Whether :class:`LeanStep` packs the weights of a model whose parameters look like ``weight``:
    float32 on a CPU, where oneDNN is available."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_linear()


@dataclass
class _Layer:
    qkv: Projection  # (B, d) -> (B, (H + 2 Hkv) D)
    o: Projection
    gate_up: Projection  # (B, d) -> (B, 2 I)
    down: Projection
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
    ours = LeanStep(model, 3, rows=1)(
        out[cache_arg], ids[:, 2], torch.tensor([2], device=ids.device), 2, mask.bool()
    )
    err, tol = _rel_err(ours[0], full), _tolerance(weight.dtype)
    return (
        None
        if err <= tol
        else f"its forward differs from the lean step's arithmetic (relative error {err:.1e})"
    )


class LeanStep:
    """One decoding step of ``model`` over a :func:`heed.rollout.sampler._buffered_cache`; built once per
    decode (the weights of that moment: a packed copy of them where :func:`packs_weights`) for
    ``capacity`` cache positions and a batch of ``rows``.

    ``step(cache, tok (B,), pos (B,), write (int), visible (B, write + 1) bool) -> logits (B, V)``: the
    token at position ``pos`` is written at cache index ``write``; ``visible`` marks the cache indices
    each row holds (its prompt without the left padding, its answer so far, this token).
    """

    def __init__(self, model: Any, capacity: int, rows: int) -> None:
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
        windows, types = attention_windows(m), getattr(config, "layer_types", None)
        self.layers = []
        for i, layer in enumerate(body.layers):
            a, mlp = layer.self_attn, layer.mlp
            q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
            self.layers.append(
                _Layer(
                    qkv=Projection([a.q_proj, a.k_proj, a.v_proj], rows),
                    o=Projection([a.o_proj], rows),
                    gate_up=Projection([mlp.gate_proj, mlp.up_proj], rows),
                    down=Projection([mlp.down_proj], rows),
                    ln1=layer.input_layernorm.weight,
                    ln2=layer.post_attention_layernorm.weight,
                    q_norm=None if q_norm is None else q_norm.weight,
                    k_norm=None if k_norm is None else k_norm.weight,
                    window=windows[types[i]] if types else windows["full_attention"],
                )
            )
        self.embed = body.embed_tokens.weight
        self.norm = body.norm.weight
        self.lm_head = Projection([m.lm_head], rows)
        # rotate_half(x) = x @ R: (x1, x2) -> (-x2, x1), exact (one nonzero per column)
        half = self.head_dim // 2
        eye = torch.eye(half, device=device, dtype=self.dtype)
        self.rotate = torch.zeros(self.head_dim, self.head_dim, device=device, dtype=self.dtype)
        self.rotate[half:, :half] = -eye
        self.rotate[:half, half:] = eye
        # cos / sin of every position the decode can reach, from the model's own rotary module
        positions = torch.arange(capacity, device=device)[None]
        cos, sin = body.rotary_emb(self.embed[:1][None], positions)  # (1, C, D)
        self.cos, self.sin = cos[0], sin[0]

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``w * (x / sqrt(mean(x^2) + eps))`` in float32, cast back before the weight (as the model)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, w.shape, w, self.eps)  # the same arithmetic, one call
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x cos + rotate_half(x) sin`` (Su et al. 2021, https://arxiv.org/abs/2104.09864)."""
        return torch.addcmul(x * cos, x @ self.rotate, sin)

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
                # additive, built once per step: SDPA on the CPU takes it faster than a boolean mask
                additive = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
                additive.masked_fill_(~visible, float("-inf"))
                if window is not None and length > window:
                    additive[:, : length - window] = float("-inf")
                masks[window] = additive[:, None, None, :]  # (B, 1, 1, L)
            return masks[window]

        x = F.embedding(tok, self.embed)  # (B, d)
        for i, lay in enumerate(self.layers):
            qkv = lay.qkv(self._rms(x, lay.ln1))  # (B, (H + 2 Hkv) D)
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
            x = x + lay.o(out.reshape(b, h * d))
            gate, up = lay.gate_up(self._rms(x, lay.ln2)).chunk(2, dim=-1)
            x = x + lay.down(F.silu(gate) * up)
        for layer in cache.layers:  # the cache now holds ``length`` positions
            layer.keys, layer.values = layer.kbuf[:, :, :length], layer.vbuf[:, :, :length]
        return self.lm_head(self._rms(x, self.norm))
