"""KL to the reference policy: per-token estimators, KL-penalised rewards, β controllers."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

    With d = ref_logprobs − logprobs = log(π_ref/π) (http://joschu.net/blog/kl-approx.html):
        k1 = −d                 unbiased, high variance, can be negative
        k2 = d² / 2             biased, low variance, ≥ 0
        k3 = exp(d) − 1 − d     unbiased, low variance, ≥ 0
    Shapes: ``logprobs``, ``ref_logprobs`` (...) alike; returns (...).
    """
    d = ref_logprobs - logprobs
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")


def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    beta: float,
    kind: KLKind = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards for RLHF PPO: a KL penalty on every token plus the score on the last one.

        token_rewards_t = −β · kl_t + 1[t = last valid token] · score
    (Ziegler et al. 2019 https://arxiv.org/abs/1909.08593; InstructGPT https://arxiv.org/abs/2203.02155).
    Invalid positions are 0 in both outputs; a row without valid tokens gets no score.

    Shapes: ``scores`` (B,); ``logprobs``, ``ref_logprobs``, ``mask`` (B, T), ``mask`` True on
    response tokens. Returns ``(token_rewards, kl)``, each (B, T).
    """
    valid = mask.to(device=logprobs.device, dtype=torch.bool)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(valid, kl_estimate(logprobs, ref_logprobs, kind), zero)  # (B, T)
    token_rewards = -beta * kl
    positions = torch.arange(valid.shape[-1], device=valid.device)  # (T,)
    last = torch.where(valid, positions, -1).amax(dim=-1)  # (B,), -1 for an empty row
    has_token = last >= 0
    at_last = (positions == last.unsqueeze(-1)) & has_token.unsqueeze(-1)  # (B, T)
    token_rewards = token_rewards + torch.where(at_last, scores.to(token_rewards.dtype).unsqueeze(-1), zero)
    return token_rewards, kl


class FixedKLController:
    """A constant KL coefficient β (``update`` does nothing)."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep β fixed; the signature matches :class:`AdaptiveKLController`."""


class AdaptiveKLController:
    """Proportional controller steering the measured KL toward ``target`` (Ziegler et al. 2019, §2.2).

        e = clip(KL / target − 1, −0.2, 0.2),    β ← β · (1 + e · n_steps / horizon)

    https://arxiv.org/abs/1909.08593. ``n_steps`` is the number of samples (or steps) the
    KL was measured over; ``horizon`` how many of them it takes to move β by a factor ~e.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β up when the KL is above target and down when below."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ π) of picking the best of n samples by a reward (ties aside), in nats.

        KL = log n − (n − 1) / n
    (Stiennon et al. 2020, https://arxiv.org/abs/2009.01325, appendix; exact for continuous
    rewards, an upper bound otherwise: Beirami et al. 2024, https://arxiv.org/abs/2401.01879).
    """
    if n < 1:
        raise ValueError(f"best_of_n_kl: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n
