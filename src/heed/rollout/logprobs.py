"""One forward of the policy over (prompt + completion) rows: token log-probs, entropies and,
with a shared value head, values — from a single trunk pass.

Logits are computed only at response positions, in chunks, and reduced at once to the sampled
token's log-prob (gather − logsumexp, :func:`heed.algos.ops.selective_log_softmax`); no float32
(B, T, V) log-softmax is ever held.

:func:`shared_prompt_forward` does the same for groups of K answers to one prompt with the prompt
computed once: each group becomes one packed sequence ``[prompt | answer 1 | ... | answer K]``
whose attention mask lets every answer see the prompt and itself only, with the positions each
answer would have on its own. The results equal :func:`policy_forward`'s up to float noise, for
``P + sum(len_k)`` tokens per group instead of ``K·(P + max len)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heed.models.lm import block_mask, forward_support, hidden_states, logprobs_from_hidden
from heed.models.value import ValueHead, values_at_targets


@dataclass
class TokenOutputs:
    """Per-token outputs aligned with ``input_ids`` (B, T); zero off the target mask."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None


def policy_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    value_head: ValueHead | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_size: int = 1024,
) -> TokenOutputs:
    """log π(token_t | prefix) at target positions (plus entropy and V(prefix) when asked).

    Shapes: ``input_ids``, ``attention_mask``, ``target_mask`` (B, T); returns (B, T) tensors.
    ``temperature`` divides the logits (the rollout's sampling temperature). Entropy carries a
    gradient only with ``entropy_grad`` (an entropy bonus).
    """
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    logprobs, entropy = logprobs_from_hidden(
        model, hidden, input_ids, target_mask, temperature, with_entropy, entropy_grad, chunk_size
    )
    values = values_at_targets(value_head, hidden, target_mask) if value_head is not None else None
    return TokenOutputs(logprobs, entropy, values)


def can_share_prompt(model: Any) -> bool:
    """Whether :func:`shared_prompt_forward` gives this model's per-row results: whether a custom
    block mask with explicit positions (sliding windows built in) keeps sequences apart, as a probe
    forward against the plain one found (:func:`heed.models.lm.forward_support`, once per model and
    said once in the log when not). Not so for ALiBi models (Bloom builds its biases from a 2-D mask)
    or attention kernels that take no mask; those run row by row."""
    return forward_support(model).no_block_mask is None


def shared_prompt_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    prompt_width: int,
    k: int,
    temperature: float = 1.0,
    value_head: ValueHead | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> TokenOutputs:
    """:func:`policy_forward` for rows in groups of ``k`` consecutive answers to one prompt, with the
    prompt run once per group.

    Rows are ``[left-padded prompt (P) | right-padded answer (C)]``: ``input_ids``, ``attention_mask``,
    ``target_mask`` (N, P + C), N = G·k, the k rows of a group sharing their prompt columns. Group g
    is packed as ``[prompt (n_g tokens) | answer 1 (l_1) | ... | answer k (l_k)]`` (right-padded to the
    longest group); token t of answer j sits at position n_g + t, as on its own; the (G, 1, L, L) mask
    allows key κ for query q when κ ≤ q and κ is in the prompt or in q's own answer (a padding
    query sees itself only), and on sliding-window layers when κ is less than the window back in q's own
    positions. A model that cannot take such a mask (:func:`can_share_prompt`) runs row by row. Returns (N, P + C) tensors like :func:`policy_forward`.
    """
    n, width = input_ids.shape
    if n % k:
        raise ValueError(f"{n} rows are not whole groups of {k}")
    if not can_share_prompt(model):  # the block mask would be wrong for this model: row by row
        return policy_forward(
            model, input_ids, attention_mask, target_mask, temperature, value_head, with_entropy, entropy_grad
        )
    g, p, c = n // k, prompt_width, width - prompt_width
    dev = input_ids.device
    prompt_mask = attention_mask[::k, :p].bool()  # (G, P)
    answer_mask = attention_mask[:, p:].bool()  # (N, C)
    n_p = prompt_mask.sum(-1)  # (G,)
    lens = answer_mask.sum(-1).view(g, k)  # (G, k)
    starts = n_p.unsqueeze(-1) + lens.cumsum(-1) - lens  # (G, k) where each answer starts in its group
    total = n_p + lens.sum(-1)  # (G,)
    width_packed = int(total.max())
    packed = torch.zeros((g, width_packed), dtype=input_ids.dtype, device=dev)
    seg = torch.full((g, width_packed), -1, dtype=torch.long, device=dev)  # -1 pad, 0 prompt, j + 1 answer j
    pos = torch.zeros((g, width_packed), dtype=torch.long, device=dev)
    # the prompt: left-padded column col -> packed column col - (P - n_p)
    gi, col = prompt_mask.nonzero(as_tuple=True)
    dest = col - (p - n_p[gi])
    packed[gi, dest] = input_ids[gi * k, col]
    seg[gi, dest] = 0
    pos[gi, dest] = dest
    # the answers: row r = g·k + j, column t -> packed column starts[g, j] + t at position n_p[g] + t
    r, t = answer_mask.nonzero(as_tuple=True)
    rg, rj = r // k, r % k
    dest = starts[rg, rj] + t
    packed[rg, dest] = input_ids[r, p + t]
    seg[rg, dest] = rj + 1
    pos[rg, dest] = n_p[rg] + t
    q_seg, k_seg = seg.unsqueeze(-1), seg.unsqueeze(-2)  # (G, L, 1), (G, 1, L)
    idx = torch.arange(width_packed, device=dev)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # (L, L): key <= query
    allowed = causal & (q_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))  # (G, L, L)
    # sliding windows apply to each answer's own positions, not to distances in the packed row
    mask4 = block_mask(model, allowed, pos)
    hidden = hidden_states(model, packed, mask4, position_ids=pos)  # (G, L, H)

    # per row: the hidden state before each answer token: the prompt's last, then answer tokens 0..C-2
    flat = hidden.reshape(g * width_packed, -1)
    base = (torch.arange(n, device=dev) // k) * width_packed  # (N,) the row's group offset
    first = base + n_p.repeat_interleave(k) - 1  # (N,) the prompt's last token
    cols = torch.arange(c, device=dev)
    inside = (starts.reshape(-1, 1) + cols).clamp(max=width_packed - 1)  # (N, C) answer token t's column
    rows_idx = torch.cat([first.unsqueeze(-1), base.unsqueeze(-1) + inside], dim=1)  # (N, 1 + C)
    rows_hidden = flat[rows_idx]  # (N, 1 + C, H): hidden[:, i] predicts token i + 1 of [., answer]
    rows_ids = torch.cat([input_ids[:, p - 1 : p], input_ids[:, p:]], dim=1)
    rows_target = torch.cat([torch.zeros_like(target_mask[:, :1]), target_mask[:, p:]], dim=1)
    logprobs, entropy = logprobs_from_hidden(
        model, rows_hidden, rows_ids, rows_target, temperature, with_entropy, entropy_grad
    )
    values = values_at_targets(value_head, rows_hidden, rows_target) if value_head is not None else None

    def full(x: torch.Tensor | None) -> torch.Tensor | None:  # (N, 1 + C) -> (N, P + C), zero on the prompt
        if x is None:
            return None
        out = torch.zeros((n, width), dtype=x.dtype, device=dev)
        out[:, p:] = x[:, 1:]
        return out

    lp = full(logprobs)
    assert lp is not None
    return TokenOutputs(lp, full(entropy), full(values))
