"""The ``Rollout``: one batch of sampled answers with everything the update needs.

Rows are prompt-major (``k`` consecutive answers per prompt). Full rows are
``[left-padded prompt | right-padded completion]``: ``input_ids`` (N, P + C). Per-token
quantities (log-probs, values, rewards, advantages) cover the completion part only, (N, C),
right-padded, with ``response_mask`` (N, C) True on answer tokens (EOS included).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from heed.rollout.generate import Generation


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, P + C)
    attention_mask: torch.Tensor  # (N, P + C) True on real tokens
    target_mask: torch.Tensor  # (N, P + C) True on completion tokens (those scored by the policy)
    response_mask: torch.Tensor  # (N, C) True on completion tokens that count in the loss
    prompt_width: int  # P
    scores: torch.Tensor  # (N,) total reward per answer, NaN where a source gave None
    old_logprobs: torch.Tensor | None = None  # (N, C)
    ref_logprobs: torch.Tensor | None = None  # (N, C)
    old_values: torch.Tensor | None = None  # (N, C)
    advantages: torch.Tensor | None = None  # (N, C) or (N, 1)
    returns: torch.Tensor | None = None  # (N, C) value targets (PPO)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def response(self, full: torch.Tensor) -> torch.Tensor:
        """The completion part (N, C) of a full-row tensor (N, P + C)."""
        return full[:, self.prompt_width :]

    def select(self, idx: torch.Tensor) -> Rollout:
        """Rows ``idx`` of every tensor (a minibatch)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
        return Rollout(**out)

    def to(self, device: Any) -> Rollout:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return Rollout(**out)


def rollout_from_generation(gen: Generation, scores: torch.Tensor) -> Rollout:
    """Join prompts and completions into full rows; rows whose score is NaN do not count in the loss."""
    p = gen.prompt_ids.shape[1]
    input_ids = torch.cat([gen.prompt_ids, gen.completion_ids], dim=1)  # (N, P + C)
    attention = torch.cat([gen.prompt_mask, gen.completion_mask], dim=1)
    target = torch.cat([torch.zeros_like(gen.prompt_mask), gen.completion_mask], dim=1)
    valid = ~torch.isnan(scores)
    return Rollout(input_ids, attention, target, gen.completion_mask & valid.unsqueeze(-1), p, scores)
