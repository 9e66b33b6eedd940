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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from heed.rollout.generate import SamplingParams

from heed.algos.ops import selective_log_softmax
from heed.models.lm import position_ids_from_mask, unwrap


def _buffered_cache(capacity: int) -> Any:
    """A ``DynamicCache`` whose layers append into preallocated buffers (room for ``capacity``
    positions) instead of re-concatenating the whole cache at every step, which is quadratic in
    the answer length and was most of the decoding time of small models. (Sliding-window models
    keep every position here; their attention mask still applies the window.)"""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class BufferedLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self.kbuf: torch.Tensor | None = None
            self.vbuf: torch.Tensor | None = None

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = 0 if self.kbuf is None else self.keys.shape[-2]
            q = key_states.shape[-2]
            if self.kbuf is None or n + q > self.kbuf.shape[-2]:
                b, h, _, d = key_states.shape
                cap = max(capacity, 2 * (n + q))
                kbuf, vbuf = key_states.new_empty(b, h, cap, d), value_states.new_empty(b, h, cap, d)
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

    cache = DynamicCache()
    cache.layer_class_to_replicate = BufferedLayer  # one per decoder layer, made on its first update
    return cache


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
    policy's own probability, what the trainer's forward pass computes). Sampling is inverse-CDF:
    the token is the first whose cumulative probability exceeds ``u`` ~ U(0, 1), one uniform per
    row, either fresh (``torch.rand``) or given (``uniforms`` (B,) from :func:`keyed_uniforms`).
    """
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    if not do_sample:
        tok = scaled.argmax(-1)
    else:
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
        cdf = masked.softmax(-1).cumsum(-1, dtype=torch.float64)  # (B, V)
        u = (
            uniforms.to(cdf.device)
            if uniforms is not None
            else torch.rand(cdf.shape[0], dtype=torch.float64, device=cdf.device)
        )
        tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        tok = tok.clamp_max(cdf.shape[-1] - 1)
        # a token of probability 0 can only be hit through rounding at the very end of the CDF
        zero = masked.gather(-1, tok.unsqueeze(-1)).squeeze(-1) == float("-inf")
        if bool(zero.any()):
            tok = torch.where(zero, masked.argmax(-1), tok)
    return tok, selective_log_softmax(scaled, tok)


@torch.no_grad()
def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    params: SamplingParams,
    stop_ids: list[int],
    compact_at: float = 0.0,
    keys: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample up to ``params.max_new_tokens`` tokens after each left-padded prompt row (temperature,
    top-k, top-p and greedy as :func:`sample_next`).

    Shapes: ``input_ids``, ``attention_mask`` (B, P); ``keys`` (B,) int64 makes each row's draws a
    function of its key (:func:`keyed_uniforms`). Returns one token list per row, ending with the
    stop token when the row stopped (no padding), and the log-prob of each token (see
    :func:`sample_next`).
    """
    max_new_tokens, temperature, do_sample = params.max_new_tokens, params.temperature, params.do_sample
    top_k, top_p = params.top_k, params.top_p
    device = input_ids.device
    b = input_ids.shape[0]
    attn = attention_mask.long()
    positions = position_ids_from_mask(attn)  # (B, P), skipping the left padding
    cache = _buffered_cache(input_ids.shape[1] + max_new_tokens)
    # prefill each distinct prompt once: a row equal to the one before it (K samples of a prompt sit
    # side by side) shares its cache rows, copied after the prefill
    same = torch.zeros(b, dtype=torch.bool, device=device)
    same[1:] = (input_ids[1:] == input_ids[:-1]).all(-1) & (attn[1:] == attn[:-1]).all(-1)
    first = (~same).nonzero().squeeze(-1)  # (U,) rows that run the prefill
    owner = (~same).long().cumsum(0) - 1  # (B,) the prefill row each row copies
    cache_arg = _cache_argument(model)
    out = model(
        input_ids=input_ids[first],
        attention_mask=attn[first],
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
    next_pos = positions[:, -1] + 1  # (B,)
    stop = torch.tensor(stop_ids, device=device)
    rows = torch.arange(b, device=device)  # original row of each running row
    run_keys = keys
    tokens = torch.full((b, max_new_tokens), -1, dtype=torch.long, device=device)  # -1: the row had stopped
    token_logps = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    n_steps = 0
    for step in range(max_new_tokens):
        u = keyed_uniforms(run_keys, step) if run_keys is not None and do_sample else None
        tok, lp = sample_next(logits, temperature, top_k, top_p, do_sample, u)  # (b_run,)
        tokens[rows, step], token_logps[rows, step] = tok, lp.float()
        n_steps = step + 1
        done = torch.isin(tok, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()) and done.float().mean() >= compact_at:
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tok, attn, next_pos, done = rows[keep], tok[keep], attn[keep], next_pos[keep], done[keep]
            if run_keys is not None:
                run_keys = run_keys[keep.to(run_keys.device)]
        # a row that finished but was not dropped yet keeps running on padding; its tokens are cut below
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(
            input_ids=tok.unsqueeze(-1),
            attention_mask=attn,
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
