"""Heed's own sampling loop: KV cache, left padding, EOS stop, finished rows dropped from the batch.

``transformers``' ``generate`` pays a large fixed cost per decoding step (logits processors,
stopping criteria, bookkeeping), which dominates with small models. This loop does only what RL
rollouts need: one prefill over the distinct left-padded prompts (logits of the last position
only; the K samples of a prompt share it), then
one token per step for the rows still running; rows that have produced EOS are removed from the
KV cache as soon as they finish (``compact_at``: the finished share that triggers it; cheap because
the cache lives in preallocated buffers), so short answers stop costing compute.

Sampling: logits / temperature, then top-k, then top-p (nucleus), then a categorical draw by
inverse CDF (one uniform per row and step, optionally a hash of a per-row key so the answers do not
depend on batching); ``do_sample=False`` takes the argmax. Each token comes with its log-prob under
the policy at that temperature, which the RL trainer uses as the behaviour policy's.

Per step the loop does one model call, one sampling pass over V and one host sync (how many rows have
finished); the draws of the whole decode are hashed up front and the attention mask is allocated once.
With ``SamplingParams.compile`` (``rollout.compile``) the steps after the prefill run a fixed-shape
step through ``torch.compile``: the cache stops growing (each step writes its position into the
preallocated buffers and attends over all of them under a 4D mask), so one compiled graph serves every
step; it is compiled once per model and reused by later rollouts. Where it cannot compile, one warning
and the eager loop. Without it, Llama-style models (``heed.rollout.lean``) run their steps after the
prefill as a lean one-token forward of a few tensor ops per layer over the same cache buffers.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from heed.rollout.generate import SamplingParams

from heed.algos.ops import inverse_cdf, selective_log_softmax
from heed.models.lm import position_ids_from_mask, unwrap
from heed.rollout.lean import LeanStep, lean_support

_LOG = logging.getLogger(__name__)


@functools.cache
def _buffered_layer_class() -> type:
    """The cache layer of :func:`_buffered_cache` (one class for the whole process, made on first use so
    that importing this module does not import transformers; ``torch.compile`` guards on its identity)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.kbuf: torch.Tensor | None = None
            self.vbuf: torch.Tensor | None = None
            self.write_at: torch.Tensor | None = None  # set in static mode

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if self.write_at is not None and self.kbuf is not None and self.vbuf is not None:
                self.kbuf.index_copy_(2, self.write_at, key_states)
                self.vbuf.index_copy_(2, self.write_at, value_states)
                return self.kbuf, self.vbuf
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = 0 if self.kbuf is None else self.keys.shape[-2]
            q = key_states.shape[-2]
            if self.kbuf is None or n + q > self.kbuf.shape[-2]:
                b, h, _, d = key_states.shape
                cap = (
                    self.capacity if n + q <= self.capacity else 2 * (n + q)
                )  # exactly capacity: static mode's width
                # zeros, not empty: static mode attends over positions not written yet (masked, but a NaN
                # left in memory would still turn 0 x NaN into NaN)
                kbuf, vbuf = key_states.new_zeros(b, h, cap, d), value_states.new_zeros(b, h, cap, d)
                if n:
                    kbuf[:, :, :n] = self.keys
                    vbuf[:, :, :n] = self.values
                self.kbuf, self.vbuf = kbuf, vbuf
            assert self.vbuf is not None
            self.kbuf[:, :, n : n + q] = key_states
            self.vbuf[:, :, n : n + q] = value_states
            self.keys, self.values = self.kbuf[:, :, : n + q], self.vbuf[:, :, : n + q]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.kbuf is not None and self.vbuf is not None:
                n = self.keys.shape[-2]
                self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
                self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

    return BufferedLayer


def _buffered_cache(capacity: int) -> Any:
    """A ``DynamicCache`` whose layers append into preallocated buffers (room for ``capacity``
    positions) instead of re-concatenating the whole cache at every step, which is quadratic in
    the answer length and was most of the decoding time of small models. (Sliding-window models
    keep every position here; their attention mask still applies the window.)

    After :func:`_make_static` the layers stop growing: each update writes its one position at the
    cache's ``write_at`` (a (1,) int64 tensor the loop advances) and returns the whole buffers, so every
    decoding step has the same shapes (what ``torch.compile`` needs); the caller's 4D mask hides the
    positions not written yet.
    """
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    # one layer per decoder layer, made on its first update
    cache.layer_class_to_replicate = functools.partial(_buffered_layer_class(), capacity)
    return cache


def _make_static(cache: Any, write_at: torch.Tensor) -> None:
    """Switch a prefilled :func:`_buffered_cache` to fixed-shape updates at ``write_at`` ((1,) int64)."""
    for layer in cache.layers:
        layer.write_at = write_at


def _cache_argument(model: Any) -> str:
    """The forward's name for the KV cache: ``cache`` where transformers has it (``past_key_values``
    is deprecated there and warns on every call), ``past_key_values`` on older versions."""
    import inspect

    for cls in type(
        unwrap(model)
    ).__mro__:  # the first forward that names either (a subclass may take **kwargs)
        params = inspect.signature(cls.forward).parameters if "forward" in vars(cls) else {}
        if "cache" in params or "past_key_values" in params:
            return "cache" if "cache" in params else "past_key_values"
    return "past_key_values"


_MASK64 = (1 << 64) - 1


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a bijective hash of 64-bit keys
    (Steele et al., "Fast splittable pseudorandom number generators", OOPSLA 2014)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _as_int64(0xBF58476D1CE4E5B9)
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _as_int64(0x94D049BB133111EB)
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _as_int64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def keyed_uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in (0, 1) per row, a pure function of (row key, step): float64 (B,) from int64 (B,).

    A row's draws therefore do not depend on which other rows share its batch (or process), so
    sampling gives the same answers for any batch size, order or number of processes.
    """
    x = _mix64(keys * _as_int64(0x9E3779B97F4A7C15) + _as_int64((step + 1) * 0xD1B54A32D192ED03))
    top53 = (x >> 11) & ((1 << 53) - 1)
    return (top53.double() + 0.5) / float(1 << 53)


def keyed_uniform_table(keys: torch.Tensor, steps: int) -> torch.Tensor:
    """:func:`keyed_uniforms` for steps 0 .. ``steps`` - 1 at once: float64 (B, steps) from int64 (B,);
    column ``t`` equals ``keyed_uniforms(keys, t)`` bit for bit (int64 products wrap like Python's mod 2^64)."""
    offsets = (torch.arange(1, steps + 1, device=keys.device) * _as_int64(0xD1B54A32D192ED03))[
        None, :
    ]  # (1, T)
    x = _mix64(keys[:, None] * _as_int64(0x9E3779B97F4A7C15) + offsets)  # (B, T)
    top53 = (x >> 11) & ((1 << 53) - 1)
    return (top53.double() + 0.5) / float(1 << 53)


def row_keys(seed: int, ids: list[int]) -> torch.Tensor:
    """int64 keys for sampling rows named by integers ``ids`` under ``seed`` (hashed, so nearby ids
    and seeds give unrelated streams)."""
    t = torch.tensor(ids, dtype=torch.long) + _as_int64(seed * 0x632BE59BD9B4E019)
    return _mix64(t)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    do_sample: bool,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from next-token logits (B, V) -> tokens (B,), log-probs (B,).

    The log-prob is log softmax(logits / temperature) at the token, before top-k / top-p (the
    policy's own probability, what the trainer's forward pass computes). Sampling is inverse-CDF
    (:func:`inverse_cdf`): the token is the first whose cumulative probability exceeds ``u`` ~ U(0, 1),
    one uniform per row, either fresh (``torch.rand``) or given (``uniforms`` (B,) from
    :func:`keyed_uniforms`). Without top-k / top-p the log-prob is read off the same softmax (one pass
    over V less; it agrees with logits - logsumexp to ~1e-7).
    """
    scaled = logits.float()
    if temperature > 0 and temperature != 1.0:
        scaled = scaled / temperature
    if not do_sample:
        tok = scaled.argmax(-1)
        return tok, selective_log_softmax(scaled, tok)
    masked = scaled
    if top_k and top_k < masked.shape[-1]:
        kth = torch.topk(masked, top_k, dim=-1).values[:, -1:]  # (B, 1)
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(masked, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        masked = masked.masked_fill(drop, float("-inf"))
    probs = masked.softmax(-1)  # (B, V)
    u = (
        uniforms.to(probs.device)
        if uniforms is not None
        else torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device)
    )
    tok = inverse_cdf(probs, u)
    # a token of probability 0 can only be hit through rounding at the very end of the CDF
    p_tok = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1)  # (B,)
    zero = p_tok == 0
    if bool(zero.any()):
        tok = torch.where(zero, masked.argmax(-1), tok)
        p_tok = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    if masked is scaled:
        return tok, p_tok.log()
    return tok, selective_log_softmax(scaled, tok)


STATIC_MODEL_TYPES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
)  # decoders whose only mask input is the causal mask


def _static_unsupported(model: Any) -> str | None:
    """Why the fixed-shape (compilable) step cannot run ``model``, or None when it can: the step hands
    the model a ready 4D mask, which only plain causal attention without a sliding window takes."""
    config = unwrap(model).config
    if config.model_type not in STATIC_MODEL_TYPES:
        return f"model type {config.model_type!r} (supported: {', '.join(STATIC_MODEL_TYPES)})"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return "sliding-window layers"
    if layer_types is None and getattr(config, "sliding_window", None) is not None:
        return "a sliding window"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention {config._attn_implementation!r} (supported: sdpa, eager)"
    return None


def _static_step(model: Any, cache_arg: str) -> Any:
    """One fixed-shape decoding step: (cache, tokens (B,), positions (B,), visible (B, C) bool) -> next-token
    logits (B, V). ``visible`` marks the cache positions each row attends to (its prompt tokens and the
    answer so far, this step's included); passed as a 4D mask, so transformers builds no mask."""
    additive = unwrap(model).config._attn_implementation == "eager"
    dtype = next(model.parameters()).dtype

    def step(cache: Any, tok: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        mask = visible[:, None, None, :]  # (B, 1, 1, C)
        if additive:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=pos[:, None],
            use_cache=True,
            **{cache_arg: cache},
        )
        return out.logits[:, -1]

    return step


def _compile_failed(model: Any, why: str) -> None:
    """One warning line; the model's later rollouts decode eagerly without another."""
    warnings.warn(f"rollout.compile: {why}; decoding eagerly", stacklevel=4)
    model._heed_compiled_step = None
    model._heed_compile_failed = True


def _error_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _compiled_step(model: Any, cache_arg: str) -> Any | None:
    """The model's compiled fixed-shape step, or None where it cannot run (then a one-line warning, once
    per model, and the eager loop). Kept on the model object (``_heed_compiled_step``), so every later
    rollout of the same model reuses it (the weights are read at each call, so updates need no recompile)."""
    if getattr(model, "_heed_compile_failed", False):
        return None
    if getattr(model, "_heed_compiled_step", None) is not None:
        return model._heed_compiled_step
    reason = _static_unsupported(model)
    if reason is not None:
        _compile_failed(model, f"not compiling the decoding step ({reason})")
        return None
    try:
        model._heed_compiled_step = torch.compile(_static_step(model, cache_arg), dynamic=None)
    except Exception as err:  # torch.compile missing or refusing this platform
        _compile_failed(model, f"torch.compile failed ({_error_line(err)})")
        return None
    return model._heed_compiled_step


def _run_compiled(model: Any, step: Any, cache_arg: str, *args: torch.Tensor) -> torch.Tensor:
    """``step(*args)``; a compile or run failure warns once, drops the compiled step and runs the same step
    eagerly (so this rollout and the next ones go on). The first call's time is logged (compile time)."""
    first = not getattr(step, "_heed_ran", False)
    t0 = time.perf_counter()
    try:
        logits = step(*args)
    except Exception as err:  # any failure of the compiler (no C++ compiler, an unsupported op)
        _compile_failed(model, f"torch.compile failed ({_error_line(err)})")
        return _static_step(model, cache_arg)(*args)
    if first:
        step._heed_ran = True
        _LOG.info("rollout.compile: decoding step compiled in %.1f s", time.perf_counter() - t0)
    return logits


@torch.inference_mode()
def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    params: SamplingParams,
    stop_ids: list[int],
    compact_at: float = 0.0,
    keys: torch.Tensor | None = None,
    lean: bool = True,
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample up to ``params.max_new_tokens`` tokens after each left-padded prompt row (temperature,
    top-k, top-p and greedy as :func:`sample_next`).

    Shapes: ``input_ids``, ``attention_mask`` (B, P); ``keys`` (B,) int64 makes each row's draws a
    function of its key (:func:`keyed_uniforms`). Returns one token list per row, ending with the
    stop token when the row stopped (no padding), and the log-prob of each token (see
    :func:`sample_next`). ``params.compile``: run the decoding steps through ``torch.compile`` (a
    fixed-shape step over the whole preallocated cache; see :func:`_compiled_step`). Otherwise, for the
    architectures :func:`heed.rollout.lean.lean_support` accepts (and ``lean``), the steps after the
    prefill run :class:`heed.rollout.lean.LeanStep` instead of the model's forward: the same arithmetic
    in a few ops per layer.
    """
    max_new_tokens, temperature, do_sample = params.max_new_tokens, params.temperature, params.do_sample
    top_k, top_p = params.top_k, params.top_p
    device = input_ids.device
    b, p = input_ids.shape
    cap = p + max_new_tokens
    cache_arg = _cache_argument(model)
    step_fn = _compiled_step(model, cache_arg) if getattr(params, "compile", False) else None
    compiled = step_fn is not None  # False once a compile failure left the eager fixed-shape step
    # the attention mask of the whole decode, allocated once: the prompt's, then ones for the answer
    attn = torch.ones((b, cap), dtype=torch.long, device=device)  # (B, P + T)
    attn[:, :p] = attention_mask
    positions = position_ids_from_mask(attn[:, :p])  # (B, P), skipping the left padding
    cache = _buffered_cache(cap)
    # prefill each distinct prompt once: a row equal to the one before it (K samples of a prompt sit
    # side by side) shares its cache rows, copied after the prefill
    same = torch.zeros(b, dtype=torch.bool, device=device)
    same[1:] = (input_ids[1:] == input_ids[:-1]).all(-1) & (attn[1:, :p] == attn[:-1, :p]).all(-1)
    first = (~same).nonzero().squeeze(-1)  # (U,) rows that run the prefill
    owner = (~same).long().cumsum(0) - 1  # (B,) the prefill row each row copies
    out = model(
        input_ids=input_ids[first],
        attention_mask=attn[first, :p],
        position_ids=positions[first],
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: cache},
    )
    cache = out[cache_arg]
    logits = out.logits[:, -1]  # (U, V)
    if len(first) < b:
        cache.batch_select_indices(owner)
        logits = logits[owner]  # (B, V)
    visible = write_at = None
    if step_fn is not None:
        # fixed shapes from here on: every step attends over all P + T cache positions, ``visible``
        # (B, P + T) says which hold this row's tokens
        write_at = torch.full((1,), p, dtype=torch.long, device=device)
        _make_static(cache, write_at)
        visible = attn.bool()
        visible[:, p:] = False
    lean_step = (
        LeanStep(model, cap, rows=b) if step_fn is None and lean and lean_support(model) is None else None
    )
    next_pos = positions[:, -1] + 1  # (B,)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    # every draw of the decode at once: column t is keyed_uniforms(keys, t)
    uniforms = (
        keyed_uniform_table(keys.to(device), max_new_tokens) if keys is not None and do_sample else None
    )
    rows: torch.Tensor | None = None  # original row of each running row; None until a row is dropped
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # (b_run,) produced a stop token
    tokens = torch.full((b, max_new_tokens), -1, dtype=torch.long, device=device)  # -1: the row had stopped
    token_logps = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    n_steps = 0
    for step in range(max_new_tokens):
        u = uniforms[:, step] if uniforms is not None else None
        tok, lp = sample_next(logits, temperature, top_k, top_p, do_sample, u)  # (b_run,)
        if rows is None:
            tokens[:, step], token_logps[:, step] = tok, lp
        else:
            tokens[rows, step], token_logps[rows, step] = tok, lp.float()
        n_steps = step + 1
        if step == max_new_tokens - 1:
            break
        if len(stop_ids):
            finished |= torch.isin(tok, stop)
            n_done = int(finished.sum())  # the loop's one host sync per step
            if n_done == len(finished):
                break
            if n_done and n_done / len(finished) >= compact_at:
                keep = (~finished).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows = keep if rows is None else rows[keep]
                tok, attn, next_pos, finished = tok[keep], attn[keep], next_pos[keep], finished[keep]
                if uniforms is not None:
                    uniforms = uniforms[keep]
                if visible is not None:
                    visible = visible[keep]
        # a row that finished but was not dropped yet keeps running on padding; its tokens are cut below
        if step_fn is not None and visible is not None and write_at is not None:
            write_at.fill_(p + step)
            visible[:, p + step] = True
            if compiled:
                logits = _run_compiled(model, step_fn, cache_arg, cache, tok, next_pos, visible)
                if getattr(model, "_heed_compile_failed", False):  # the same step, eagerly, from now on
                    step_fn, compiled = _static_step(model, cache_arg), False
            else:
                logits = step_fn(cache, tok, next_pos, visible)
        elif lean_step is not None:
            logits = lean_step(cache, tok, next_pos, p + step, attn[:, : p + step + 1].bool())
        else:
            out = model(
                input_ids=tok.unsqueeze(-1),
                attention_mask=attn[:, : p + step + 1],
                position_ids=next_pos.unsqueeze(-1),
                use_cache=True,
                **{cache_arg: cache},
            )
            cache = out[cache_arg]
            logits = out.logits[:, -1]
        next_pos = next_pos + 1
    stops = set(stop_ids)
    results: list[list[int]] = []
    logps: list[list[float]] = []
    for toks, lps in zip(tokens[:, :n_steps].tolist(), token_logps[:, :n_steps].tolist(), strict=True):
        # up to and including the first stop token (a row kept running on padding after it), or up
        # to the step the row was dropped from the batch
        end = next((j + 1 if t in stops else j for j, t in enumerate(toks) if t in stops or t < 0), len(toks))
        results.append(toks[:end])
        logps.append(lps[:end])
    return results, logps
