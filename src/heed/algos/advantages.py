"""Advantage estimators: GAE (classic control and per-token LM), RLOO, GRPO, REINFORCE baseline.

They return raw advantages; whether to whiten is the trainer's choice (``heed.algos.whiten``).
Time is the last dimension. Termination and truncation stay separate: a per-step
``discounts`` (0 at a terminal step) says whether to bootstrap, ``continues`` says
whether the next step belongs to the same episode.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from heed.algos.ops import masked_mean, masked_var

ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    discounts: Tensor | float,
    lam: float,
    continues: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the last dimension (https://arxiv.org/abs/1506.02438).

        δ_t = r_t + discounts_t · next_values_t − values_t
        A_t = δ_t + discounts_t · λ · continues_t · A_{t+1}        (A_T = 0)
        returns_t = A_t + values_t

    ``discounts_t`` = γ·(1 − terminated_t): 0 at a terminal step, so it does not bootstrap.
    ``continues_t`` = 0 where the episode ends at t (terminated OR truncated), so the
    recursion never links across episodes, while a truncated step still bootstraps
    through ``next_values_t``, the value of its final observation (which differs from
    ``values_{t+1}``, the first observation of the next episode). Default
    ``continues = discounts > 0`` (right when only termination ends episodes).
    Notation follows rlax's ``truncated_generalized_advantage_estimation`` with an explicit
    ``next_values`` instead of a ``values`` of length T+1.

    Shapes: ``rewards``, ``values``, ``next_values``, ``discounts``, ``continues`` (..., T)
    (``discounts`` may be a float). Returns ``(advantages, returns)``, each (..., T).
    """
    discounts_t = torch.as_tensor(discounts, dtype=rewards.dtype, device=rewards.device).expand_as(rewards)
    if continues is None:
        continues_t = (discounts_t > 0).to(rewards.dtype)
    else:
        continues_t = continues.to(device=rewards.device, dtype=rewards.dtype).expand_as(rewards)
    deltas = rewards + discounts_t * next_values - values  # (..., T)
    carry = discounts_t * lam * continues_t  # (..., T): how much of A_{t+1} flows into A_t
    advantages = torch.empty_like(deltas)
    last = torch.zeros_like(deltas[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        last = deltas[..., t] + carry[..., t] * last
        advantages[..., t] = last
    return advantages, advantages + values


def token_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """GAE for language-model responses: one step per response token, right-padded.

    The last valid token is terminal (its next value is 0 and nothing follows it), so with
    token rewards r_t (e.g. from :func:`heed.algos.kl.kl_penalized_rewards`):
        δ_t = r_t + γ·V_{t+1}·1[t+1 valid] − V_t,   A_t = δ_t + γλ·1[t+1 valid]·A_{t+1}.
    Invalid (padding) positions give advantage 0 and return 0. The sequence score sits in the
    last token's reward, as in InstructGPT-style PPO (https://arxiv.org/abs/2203.02155).

    Treating the last token as terminal is a choice: a loop that instead runs GAE over the padded
    row and keeps the value V_{T+1} of the position after the last token gets
    A_T = r_T + γ·V_{T+1} − V_T + γλ·(−V_{T+1}) = r_T − V_T + γ(1 − λ)·V_{T+1}, which equals this
    function's A_T = r_T − V_T only when λ = 1 (or that value is 0).

    Shapes: ``rewards``, ``values``, ``mask`` (B, T), ``mask`` True on response tokens,
    which must form a prefix of each row (right padding). Returns ``(advantages, returns)``, (B, T).
    """
    valid = mask.to(device=rewards.device, dtype=torch.bool)
    if valid.shape[-1] > 1 and (valid[..., 1:] & ~valid[..., :-1]).any():
        raise ValueError("token_gae expects right-padded masks: a valid token follows a padding token")
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(valid, rewards, zero)
    values = torch.where(valid, values, zero)
    next_valid = torch.zeros_like(valid)
    next_valid[..., :-1] = valid[..., 1:]  # (B, T): does token t+1 exist in this response?
    next_values = torch.zeros_like(values)
    next_values[..., :-1] = values[..., 1:]
    discounts = gamma * next_valid.to(rewards.dtype)  # 0 at the last valid token: terminal
    advantages, returns = gae(rewards, values, next_values, discounts, lam, continues=next_valid)
    return torch.where(valid, advantages, zero), torch.where(valid, returns, zero)


def _grouped(rewards: Tensor, group_size: int, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rewards and validity as (G, K); NaN rewards are invalid (a reward function returned None)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    ok = ~torch.isnan(rewards)
    if valid is not None:
        ok = ok & valid.to(device=rewards.device, dtype=torch.bool)
    return rewards.view(-1, group_size), ok.view(-1, group_size)  # (G, K), rows ordered prompt-major


def rloo_advantages(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out advantages (https://arxiv.org/abs/2402.14740).

        A_i = r_i − mean_{j ≠ i, j valid} r_j     within each consecutive group of K samples

    Invalid rewards (``valid`` False, or NaN, e.g. a reward function returned None) are left
    out of the baselines and get advantage 0; so does a valid sample with no other valid
    sample in its group (no baseline exists). With K = 2: A = ±(r_1 − r_2).

    Shapes: ``rewards`` (N,) with N = G·K, samples of one prompt adjacent; ``valid`` (N,) bool.
    Returns (N,).
    """
    r, ok = _grouped(rewards, group_size, valid)
    r0 = torch.where(ok, r, torch.zeros((), dtype=r.dtype, device=r.device))
    total = r0.sum(dim=-1, keepdim=True)  # (G, 1)
    count = ok.sum(dim=-1, keepdim=True)  # (G, 1)
    others = (count - 1).clamp(min=1).to(r.dtype)
    baseline = (total - r0) / others  # (G, K): mean of the other valid samples
    has_baseline = ok & (count > 1)
    advantages = torch.where(has_baseline, r0 - baseline, torch.zeros_like(r0))
    return advantages.reshape(-1)


def grpo_advantages(
    rewards: Tensor,
    group_size: int,
    scale: bool | ScaleRewards = True,
    eps: float = 1e-4,
    valid: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages of GRPO (https://arxiv.org/abs/2402.03300).

        A_i = (r_i − mean_g) / (std_g + eps)      ``scale="group"`` (or True): std of the group, unbiased as in TRL
        A_i = (r_i − mean_g) / (std_B + eps)      ``scale="batch"``: one std over every valid reward of the batch
        A_i = r_i − mean_g                        ``scale="none"`` (or False): Dr. GRPO, https://arxiv.org/abs/2503.20783

    mean_g and std_g are over the valid samples of the group; invalid samples (``valid``
    False or NaN reward) get 0, and std_g is 0 for a group with one valid sample. The batch
    std (https://arxiv.org/abs/2508.08221) keeps a group whose answers all but agree from being
    blown up to unit scale.

    Shapes: ``rewards`` (N,) with N = G·K, samples of one prompt adjacent; ``valid`` (N,) bool.
    Returns (N,).
    """
    mode = {True: "group", False: "none"}.get(scale, scale) if isinstance(scale, bool) else scale
    if mode not in SCALE_REWARDS:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALE_REWARDS)}")
    r, ok = _grouped(rewards, group_size, valid)
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    r0 = torch.where(ok, r, zero)
    count = ok.sum(dim=-1, keepdim=True).to(r.dtype)  # (G, 1)
    mean = masked_mean(r0, ok, dim=-1).unsqueeze(-1)  # (G, 1)
    advantages = r0 - mean
    if mode == "group":
        sq = torch.where(ok, advantages**2, zero).sum(dim=-1, keepdim=True)
        std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), zero)  # (G, 1)
        advantages = advantages / (std + eps)
    elif mode == "batch":
        n = ok.sum()
        std = masked_var(r0, ok).sqrt() if n > 1 else zero  # scalar, over all valid rewards
        advantages = advantages / (std + eps)
    return torch.where(ok, advantages, zero).reshape(-1)


def overlong_penalty(lengths: Tensor, max_length: int, cache: int) -> Tensor:
    """DAPO's soft overlong punishment (https://arxiv.org/abs/2503.14476, eq. 13).

        R(|y|) = 0                              |y| ≤ L_max − L_cache
               = ((L_max − L_cache) − |y|) / L_cache    L_max − L_cache < |y| ≤ L_max
               = −1                             |y| > L_max

    Added to the task reward, it ramps linearly from 0 to −1 over the last ``cache`` tokens
    before ``max_length``. Shapes: ``lengths`` (N,) answer lengths in tokens; returns (N,) float.
    """
    if not 0 < cache <= max_length:
        raise ValueError(
            f"overlong_penalty: need 0 < cache <= max_length, got cache={cache}, max={max_length}"
        )
    lengths = lengths.to(torch.float32)
    start = float(max_length - cache)
    ramp = (start - lengths) / cache
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Groups whose rewards differ: DAPO's dynamic-sampling filter (https://arxiv.org/abs/2503.14476, eq. 11).

        keep_g = max_{i valid} r_gi > min_{i valid} r_gi

    A group whose valid rewards are all equal (all right, all wrong; or fewer than two valid ones)
    has zero group-relative advantage for every answer (GRPO, RLOO), so it adds nothing to the
    policy gradient but still dilutes the batch. NaN rewards (a source returned None) are invalid.
    Shapes: ``rewards`` (N,) with N = G·K, samples of one prompt adjacent. Returns (G,) bool.
    """
    r, ok = _grouped(rewards, group_size, None)
    high = torch.where(ok, r, torch.full_like(r, -torch.inf)).amax(dim=-1)  # (G,)
    low = torch.where(ok, r, torch.full_like(r, torch.inf)).amin(dim=-1)  # (G,)
    return (ok.sum(dim=-1) > 1) & (high > low)


def step_token_rewards(ends: Tensor, scores: Tensor, width: int) -> Tensor:
    """Process rewards as token rewards: each step's score at the token that ends the step.

        r_{b,t} = Σ_s scores_{b,s} · 1[ends_{b,s} = t]

    (Lightman et al. 2023, https://arxiv.org/abs/2305.20050; Math-Shepherd,
    https://arxiv.org/abs/2312.08935, feeds them to PPO's GAE this way.) Steps that end on the same
    token add up; an end of −1 marks a padding step (no reward placed).
    Shapes: ``ends`` (B, S) int positions in [−1, width); ``scores`` (B, S). Returns (B, width).
    """
    if ends.shape != scores.shape:
        raise ValueError(
            f"step_token_rewards: ends {tuple(ends.shape)} and scores {tuple(scores.shape)} differ"
        )
    if ends.numel() and int(ends.max()) >= width:
        raise ValueError(
            f"step_token_rewards: a step ends at token {int(ends.max())}, past the width {width}"
        )
    real = ends >= 0
    out = torch.zeros((ends.shape[0], width + 1), dtype=scores.dtype, device=scores.device)
    slot = torch.where(real, ends, torch.full_like(ends, width))  # padding steps land in a spare column
    out.scatter_add_(1, slot, torch.where(real, scores, torch.zeros_like(scores)))
    return out[:, :width]


def reinforce_advantages(rewards: Tensor, baseline: float | Tensor) -> Tensor:
    """REINFORCE with a baseline (Williams 1992): A_i = r_i − b.

    NaN rewards (a reward function returned None) get advantage 0.
    Shapes: ``rewards`` (N,); ``baseline`` a float, a scalar tensor or (N,). Returns (N,).
    """
    baseline_t = torch.as_tensor(baseline, dtype=rewards.dtype, device=rewards.device)
    advantages = rewards - baseline_t
    return torch.where(torch.isnan(rewards), torch.zeros_like(advantages), advantages)


def ema_update(baseline: float | Tensor, rewards: Tensor, decay: float) -> Tensor:
    """Moving-average baseline for REINFORCE: b ← decay · b + (1 − decay) · mean(r).

    NaN rewards are left out of the mean; with no valid reward the baseline is unchanged.
    Shapes: ``baseline`` a float or scalar tensor; ``rewards`` (N,). Returns a detached scalar tensor.
    """
    rewards = rewards.detach()
    b = torch.as_tensor(baseline, dtype=rewards.dtype, device=rewards.device).detach()
    ok = ~torch.isnan(rewards)
    new = decay * b + (1 - decay) * masked_mean(rewards, ok)
    return torch.where(ok.any(), new, b)
