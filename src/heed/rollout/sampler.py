"""Heed's own sampling loop: KV cache, left padding, EOS stop, finished rows dropped from the batch.

``transformers``' ``generate`` pays a large fixed cost per decoding step (logits processors,
stopping criteria, bookkeeping), which dominates with small models. This loop does only what RL
rollouts need: one prefill over the left-padded prompts (logits of the last position only), then
one token per step for the rows still running; rows that have produced EOS are removed from the
KV cache once they are a quarter of the batch, so short answers stop costing compute.

Sampling: logits / temperature, then top-k, then top-p (nucleus), then a categorical draw;
``do_sample=False`` takes the argmax.
"""

from __future__ import annotations

from typing import Any

import torch

from heed.models.lm import position_ids_from_mask


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, do_sample: bool) -> torch.Tensor:
    """One token per row from next-token logits (B, V) -> (B,)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # Gumbel-max in its exponential form: argmax p_i / E_i with E_i ~ Exp(1) is a draw from p
    # (several times faster than torch.multinomial on CPU)
    probs = logits.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


@torch.no_grad()
def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    compact_at: float = 0.25,
) -> list[list[int]]:
    """Sample up to ``max_new_tokens`` tokens after each left-padded prompt row.

    Shapes: ``input_ids``, ``attention_mask`` (B, P). Returns one token list per row, ending
    with the stop token when the row stopped (no padding).
    """
    device = input_ids.device
    b = input_ids.shape[0]
    attn = attention_mask.long()
    positions = position_ids_from_mask(attn)  # (B, P), skipping the left padding
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1]  # (B, V)
    next_pos = positions[:, -1] + 1  # (B,)
    stop = torch.tensor(stop_ids, device=device)
    rows = torch.arange(b, device=device)  # original row of each running row
    results: list[list[int]] = [[] for _ in range(b)]
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, do_sample)  # (b_run,)
        for r, t in zip(rows.tolist(), tok.tolist(), strict=True):
            results[r].append(t)
        done = torch.isin(tok, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()) and done.float().mean() >= compact_at:
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tok, attn, next_pos, done = rows[keep], tok[keep], attn[keep], next_pos[keep], done[keep]
        # a row that finished but was not dropped yet keeps running on padding; its tokens are cut below
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=attn, position_ids=next_pos.unsqueeze(-1),
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    stops = set(stop_ids)
    for i, toks in enumerate(results):
        cut = next((j for j, t in enumerate(toks) if t in stops), None)
        if cut is not None:
            results[i] = toks[: cut + 1]
    return results
