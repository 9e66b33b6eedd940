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
    loss_weights: torch.Tensor | None = (
        None  # (N, C) per-token weights of the policy loss (off-policy correction)
    )

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

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in every row (left of the longest
        prompt, right of the longest answer): less compute for a micro-batch of similar lengths.
        Per-token (N, C) tensors keep their first C' columns; (N, 1) tensors are unchanged."""
        real = self.attention_mask.any(0).nonzero().squeeze(-1)
        left = min(int(real[0]), self.prompt_width) if len(real) else self.prompt_width
        end = max(int(real[-1]) + 1, self.prompt_width + 1) if len(real) else self.input_ids.shape[1]
        width = self.input_ids.shape[1] - self.prompt_width  # C
        keep = end - self.prompt_width  # C'
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("input_ids", "attention_mask", "target_mask"):
                v = v[:, left:end]
            elif isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == width:
                v = v[:, :keep]
            out[f.name] = v
        out["prompt_width"] = self.prompt_width - left
        return Rollout(**out)

    def to(self, device: Any) -> Rollout:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return Rollout(**out)


def rollout_from_generation(gen: Generation, scores: torch.Tensor) -> Rollout:
    """Join prompts and completions into full rows; rows whose score is NaN do not count in the loss.
    The engine's log-probs (when it reports them) become ``old_logprobs``, the behaviour policy's."""
    p = gen.prompt_ids.shape[1]
    input_ids = torch.cat([gen.prompt_ids, gen.completion_ids], dim=1)  # (N, P + C)
    attention = torch.cat([gen.prompt_mask, gen.completion_mask], dim=1)
    target = torch.cat([torch.zeros_like(gen.prompt_mask), gen.completion_mask], dim=1)
    valid = ~torch.isnan(scores)
    return Rollout(
        input_ids,
        attention,
        target,
        gen.completion_mask & valid.unsqueeze(-1),
        p,
        scores,
        old_logprobs=gen.logprobs,
    )


def length_sorted_chunks(ro: Rollout, idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split rows ``idx`` into chunks of ``size`` rows of similar length (longest first), so that
    :meth:`Rollout.trimmed` cuts most of the padding from each chunk."""
    lengths = ro.attention_mask[idx].sum(-1)
    order = idx[torch.argsort(lengths, descending=True, stable=True)]
    return [order[s : s + size] for s in range(0, len(order), size)]


def group_chunks(ro: Rollout, groups: torch.Tensor, k: int, size: int) -> list[torch.Tensor]:
    """Split prompt groups ``groups`` (group g is rows g·k … g·k + k − 1) into chunks of whole groups,
    about ``size`` rows each (at least one group), longest groups first; returns row indices."""
    members = torch.arange(k, device=groups.device)
    rows = groups.unsqueeze(-1) * k + members  # (G', k)
    tokens = ro.attention_mask[rows.flatten()].sum(-1).view(-1, k).sum(-1)  # (G',)
    order = groups[torch.argsort(tokens, descending=True, stable=True)]
    per = max(1, size // k)
    return [(order[s : s + per].unsqueeze(-1) * k + members).flatten() for s in range(0, len(order), per)]


def scatter_response(parts: list[tuple[torch.Tensor, torch.Tensor]], n: int, width: int) -> torch.Tensor:
    """Reassemble (rows, (n_i, C_i) values) chunks into one (N, C) tensor, zero-padded on the right."""
    dev = parts[0][1].device
    out = torch.zeros((n, width), dtype=parts[0][1].dtype, device=dev)
    for rows, values in parts:
        out[rows, : values.shape[1]] = values
    return out
