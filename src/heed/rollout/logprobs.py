"""One forward of the policy over (prompt + completion) rows: token log-probs, entropies and,
with a shared value head, values — from a single trunk pass.

Logits are computed only at response positions, in chunks, and reduced at once to the sampled
token's log-prob (gather − logsumexp, :func:`heed.algos.ops.selective_log_softmax`); no float32
(B, T, V) log-softmax is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heed.algos.ops import entropy_from_logits, selective_log_softmax
from heed.models.lm import head_logits, hidden_states
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
    sel = target_mask[:, 1:].bool()  # (B, T-1): hidden t-1 predicts token t
    h = hidden[:, :-1][sel]  # (N, H)
    targets = input_ids[:, 1:][sel]  # (N,)
    lps, ents = [], []
    for start in range(0, h.shape[0], chunk_size):
        logits = head_logits(model, h[start : start + chunk_size])  # (n, V)
        if temperature != 1.0:
            logits = logits / temperature
        lps.append(selective_log_softmax(logits.unsqueeze(0), targets[start : start + chunk_size].unsqueeze(0))[0])
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ents.append(entropy_from_logits(logits if entropy_grad else logits.detach()))
    logprobs = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    if lps:
        logprobs[:, 1:][sel] = torch.cat(lps).float()
        if entropy is not None:
            entropy[:, 1:][sel] = torch.cat(ents).float()
    values = values_at_targets(value_head, hidden, target_mask) if value_head is not None else None
    return TokenOutputs(logprobs, entropy, values)
