"""Value head for PPO: a linear map from a causal LM's final hidden states to a scalar V(s_t).

Two placements: on the policy's own trunk (``critic: shared``, one forward gives log-probs and
values), or on a separate critic model's trunk (``critic: separate``, its own weights).
Convention as in :mod:`heed.models.lm`: the value of the state *before* response token t is read
from the hidden state at t − 1, the same position whose logits predict token t.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from heed.models.lm import feature_size, hidden_states


class ValueHead(nn.Module):
    """V(h) = w·h + b; zero-initialised so early values are 0 and the first advantages are the returns."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...). Features wider than H (hidden states followed by the model's own logits,
        see :func:`heed.models.lm.hidden_states`) are read up to H."""
        hidden = hidden[..., : self.summary.in_features]
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def hidden_size(model: Any) -> int:
    """Width of the hidden states a value head reads: those the LM head reads, which differ from
    ``config.hidden_size`` when the body projects its output (OPT's ``word_embed_proj_dim``)."""
    return feature_size(model)


class Critic(nn.Module):
    """A separate critic: a causal LM's trunk plus a :class:`ValueHead` (the LM head is unused)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.head = ValueHead(hidden_size(model))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        """Values (B, T) of the states before each target token, 0 elsewhere."""
        hidden = hidden_states(self.model, input_ids, attention_mask)  # (B, T, H)
        return values_at_targets(self.head, hidden, target_mask)


def values_at_targets(head: ValueHead, hidden: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """values[:, t] = V(hidden[:, t − 1]) on target positions, 0 elsewhere. (B, T, H) -> (B, T)."""
    values = torch.zeros(target_mask.shape, dtype=torch.float32, device=hidden.device)
    sel = target_mask[:, 1:].bool()  # (B, T-1): hidden t-1 is the state before token t
    values[:, 1:][sel] = head(hidden[:, :-1][sel]).float()
    return values
