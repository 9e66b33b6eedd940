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

from heed.models.lm import hidden_states, logprobs_from_hidden
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
    logprobs, entropy = logprobs_from_hidden(model, hidden, input_ids, target_mask, temperature, with_entropy,
                                             entropy_grad, chunk_size)
    values = values_at_targets(value_head, hidden, target_mask) if value_head is not None else None
    return TokenOutputs(logprobs, entropy, values)
