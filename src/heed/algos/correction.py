"""Off-policy correction for rollouts whose engine is not the trainer.

An inference engine (vLLM, or the trainer itself in bf16) samples from a policy μ whose
log-probs differ slightly from the trainer's π_old on the same weights. Its tokens are then
off-policy for π_old; truncated importance sampling reweights each token by the ratio π_old/μ.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from heed.algos.ops import masked_mean

CorrectionMode = Literal["tis", "mis"]


@torch.no_grad()
def engine_importance_weights(
    old_logprobs: Tensor,
    engine_logprobs: Tensor,
    mask: Tensor | None = None,
    cap: float = 2.0,
    mode: CorrectionMode = "tis",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token weights that remove the engine/trainer mismatch from the policy gradient.

        w_t = π_old(y_t) / μ(y_t) = exp(old_logprobs − engine_logprobs)
        TIS:  w_t ← min(w_t, C)                   (truncated IS, Yao et al. 2025,
                                                   https://fengyao.notion.site/off-policy-rl)
        MIS:  w_t ← w_t · 1[w_t ≤ C]              (masked IS: tokens past the cap are dropped)

    Multiply the per-token policy loss by ``w`` (detached). Returns ``(w, stats)`` with the mean
    weight, the share of capped tokens and the mean |log w| over valid tokens.
    Shapes: ``old_logprobs``, ``engine_logprobs``, ``mask`` (B, T); returns ``w`` (B, T).
    """
    if cap <= 0:
        raise ValueError(f"engine_importance_weights: cap must be > 0, got {cap}")
    log_w = (old_logprobs - engine_logprobs).clamp(-20.0, 20.0)
    w = torch.exp(log_w)
    over = w > cap
    if mode == "tis":
        weights = w.clamp(max=cap)
    elif mode == "mis":
        weights = torch.where(over, torch.zeros_like(w), w)
    else:
        raise ValueError(f"engine_importance_weights: mode must be tis or mis, got {mode!r}")
    if mask is not None:
        weights = torch.where(mask.to(torch.bool), weights, torch.zeros_like(weights))
    stats = {
        "weight_mean": masked_mean(weights, mask),
        "capped_frac": masked_mean(over.to(w.dtype), mask),
        "abs_log_ratio": masked_mean(log_w.abs(), mask),
    }
    return weights, stats
