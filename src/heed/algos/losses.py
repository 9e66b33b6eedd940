"""Losses: reward-model ranking, DPO family, clipped policy and value losses, language-model NLL.

Every loss returns UNREDUCED values (per group, per pair or per token) and, where useful,
a frozen dataclass of detached scalar statistics; :func:`heed.algos.ops.aggregate`
(or a plain ``.mean()`` for per-pair losses) does the reduction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from heed.algos.ops import DEFAULT_CHUNK_SIZE, masked_mean, selective_log_softmax

DPOLossType = Literal["sigmoid", "ipo", "hinge"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")
RatioLevel = Literal["token", "sequence"]


# Log-ratios are clamped to ±this before exp in the policy loss: exp(20) ≈ 4.9e8 stays finite in fp32.
MAX_LOG_RATIO = 20.0


class _Stats:
    """Mixin: the stats as plain floats, ready for ``MetricsLogger.log``."""

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class RankingStats(_Stats):
    """Reward-model statistics over all compared pairs of a batch (detached scalars)."""

    accuracy: Tensor
    """Fraction of pairs (better, worse) with r_better > r_worse; 0 when there is no pair."""
    num_pairs: Tensor
    """Number of compared pairs (ties and masked responses excluded)."""


@dataclass(frozen=True)
class PolicyStats(_Stats):
    """PPO policy-update statistics, masked means (detached scalars)."""

    clipfrac: Tensor
    """Fraction of tokens where the clipped term is active (its gradient is zero)."""
    approx_kl_k1: Tensor
    """KL(old ‖ new) estimated by k1 = log(old/new) on tokens sampled from the old policy."""
    approx_kl_k3: Tensor
    """KL(old ‖ new) estimated by k3 = (ratio − 1) − log ratio (≥ 0, low variance)."""
    ratio_mean: Tensor
    """Mean importance ratio new/old (1 on the first epoch over a batch)."""


@dataclass(frozen=True)
class ValueStats(_Stats):
    """Value-update statistics (detached scalars)."""

    clipfrac: Tensor
    """Fraction of entries where the clipped value error is the larger one (0 without clipping)."""


def _as_batch(x: float | Tensor | None, like: Tensor) -> Tensor:
    """A float, a scalar or a (B,) tensor (or None -> 0) as a tensor broadcastable to ``like`` (B,)."""
    if x is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: float | Tensor | None = None) -> Tensor:
    """Pairwise reward-model loss: −log σ(r_chosen − r_rejected − margin).

    The Bradley-Terry likelihood of the human preference (InstructGPT https://arxiv.org/abs/2203.02155
    eq. 1 with K = 2); the margin is Llama 2's (https://arxiv.org/abs/2307.09288).
    Shapes: ``chosen``, ``rejected`` (B,); ``margin`` a float or (B,). Returns per-pair loss (B,).
    """
    return -F.logsigmoid(chosen - rejected - _as_batch(margin, chosen))


def ranking_loss(
    rewards: Tensor,
    ranks: Tensor,
    response_mask: Tensor,
    margin: float | Tensor | None = None,
    weights: Tensor | None = None,
    centering_coef: float = 0.0,
) -> tuple[Tensor, RankingStats]:
    """K-wise ranking loss of InstructGPT (https://arxiv.org/abs/2203.02155 eq. 1), one value per group.

        loss_g = w_g · [ 1/|P_g| Σ_{(i,j)∈P_g} −log σ(r_i − r_j − m_g)  +  c · mean_{i valid} r_i² ]

    P_g holds every pair of valid responses with rank_i < rank_j (lower rank = better; equal
    ranks are ties and are skipped), so with K responses and no ties |P_g| = C(K, 2), the
    paper's normaliser; a group without pairs contributes only its centering term. The
    centering term (c = ``centering_coef``) keeps rewards near 0, the auxiliary loss of
    https://arxiv.org/abs/2312.09244 taken per response (TRL's ``center_rewards_coefficient``
    penalises (r_c + r_r)² per pair instead). With K = 2 and c = 0 it is exactly
    :func:`bradley_terry_loss`.

    Shapes: ``rewards`` (G, K) floats; ``ranks`` (G, K) ints or floats; ``response_mask`` (G, K)
    bool, True for real responses; ``margin`` a float or (G,); ``weights`` (G,).
    Returns ``(loss (G,), RankingStats)``.
    """
    valid = response_mask.to(device=rewards.device, dtype=torch.bool)  # (G, K)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    r = torch.where(valid, rewards, zero)  # padded rewards may be garbage: keep them out of grads
    diff = r.unsqueeze(-1) - r.unsqueeze(-2)  # (G, K, K): r_i − r_j
    better = ranks.unsqueeze(-1) < ranks.unsqueeze(-2)  # (G, K, K): i ranked above j
    pairs = better & valid.unsqueeze(-1) & valid.unsqueeze(-2)  # (G, K, K)
    m = _as_batch(margin, rewards)
    m = m.view(-1, 1, 1) if m.dim() == 1 else m
    pair_loss = torch.where(pairs, -F.logsigmoid(diff - m), zero)  # (G, K, K)
    num_pairs = pairs.sum(dim=(-2, -1))  # (G,)
    loss = pair_loss.sum(dim=(-2, -1)) / num_pairs.clamp(min=1).to(rewards.dtype)  # (G,)
    if centering_coef:
        loss = loss + centering_coef * masked_mean(r**2, valid, dim=-1)
    if weights is not None:
        loss = loss * weights.to(device=loss.device, dtype=loss.dtype)
    with torch.no_grad():
        total_pairs = num_pairs.sum()
        correct = (pairs & (diff > 0)).sum()
        accuracy = correct.to(rewards.dtype) / total_pairs.clamp(min=1).to(rewards.dtype)
    return loss, RankingStats(accuracy=accuracy, num_pairs=total_pairs)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation and its IPO / hinge variants, per pair.

    With h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)) (sequence log-probs):
        sigmoid: −(1 − ε)·log σ(βh) − ε·log σ(−βh)    DPO https://arxiv.org/abs/2305.18290,
                 ε = ``label_smoothing`` is conservative DPO (cDPO); ε = 0 is TRL's "sigmoid" loss
        ipo:     (h − 1/(2β))²                        IPO https://arxiv.org/abs/2310.12036 eq. 17
                 (TRL divides each log-ratio by the completion length first; pass average
                 log-probs to get that variant)
        hinge:   relu(1 − βh)                         SLiC https://arxiv.org/abs/2305.10425
    Implicit rewards β·(log π − log π_ref) are returned detached for logging (accuracy, margins).

    Shapes: all four inputs (B,). Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    beta: float,
    gamma: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO, reference-free and length-normalised (https://arxiv.org/abs/2405.14734 eq. 6).

        loss = −log σ(β·avg_c − β·avg_r − γ),   avg = (1/|y|) Σ_t log π(y_t | x, y_<t)

    Rewards β·avg are returned detached. Same as TRL's CPO trainer with ``loss_type="simpo"``.
    Shapes: ``chosen_avg_logps``, ``rejected_avg_logps`` (B,) average per-token log-probs.
    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,).
    """
    chosen_rewards = beta * chosen_avg_logps
    rejected_rewards = beta * rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Kahneman-Tversky optimisation from unpaired thumbs up / down, per example
    (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306 eq. 8).

        r = log π(y|x) − log π_ref(y|x),   z_0 = max(0, KL) (detached: the reference point)
        desirable:    λ_D · (1 − σ(β·(r − z_0)))
        undesirable:  λ_U · (1 − σ(β·(z_0 − r)))

    ``kl`` is the batch estimate of KL(π ‖ π_ref): the mean of r over mismatched pairs (each prompt
    with another example's answer), averaged over processes by the caller; it is clamped at 0 and
    carries no gradient, as in the paper and TRL's ``KTOTrainer``. Implicit rewards β·r are returned
    detached for logging.

    Shapes: ``policy_logps``, ``ref_logps`` (B,) sequence log-probs; ``desirable`` (B,) bool.
    Returns ``(losses, rewards)``, each (B,).
    """
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps
    good = desirable.to(device=r.device, dtype=torch.bool)
    losses = torch.where(
        good,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return losses, beta * r.detach()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
    ratio_level: RatioLevel = "token",
) -> tuple[Tensor, PolicyStats]:
    """PPO clipped surrogate, per element (https://arxiv.org/abs/1707.06347 eq. 7).

        ratio = exp(clamp(logprobs − old_logprobs, −M, M))
        loss  = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε_high)·A)
        with dual_clip c (A < 0 only):  loss = min(loss, −c·A)

    ``ε_high`` (``clip_eps_high``) defaults to ε; a larger one is DAPO's clip-higher
    (https://arxiv.org/abs/2503.14476). Dual-clip PPO (Ye et al. 2020,
    https://arxiv.org/abs/1912.09729) bounds the loss of a negative advantage by ``−c·A``
    (``c > 1``), so a token whose ratio has run far above 1 cannot dominate the batch. The
    log-ratio is clamped to ``±M`` (``max_log_ratio``) before ``exp``, so an fp32 log-ratio of
    100 gives a large finite loss instead of ``inf`` (its gradient is then 0).

    ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025, https://arxiv.org/abs/2507.18071): one
    ratio per answer, the geometric mean of its token ratios,
    ``s_b = exp(Σ_t m_bt (logπ − logπ_old)_bt / Σ_t m_bt)``, clipped like a token ratio and shared
    by every token of the answer; it needs ``mask`` and sequence advantages. Otherwise ``mask``
    only affects the statistics: reduce the loss with :func:`heed.algos.ops.aggregate`.

    Shapes: ``logprobs``, ``old_logprobs`` (B, T) (or (N,) for classic control); ``advantages``
    broadcastable to them, e.g. (B, 1) for one advantage per sequence; ``mask`` like ``logprobs``.
    Returns ``(loss like logprobs, PolicyStats)``.
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        if mask is None:
            raise ValueError("policy_loss: ratio_level='sequence' needs the answer mask")
        m = mask.to(log_ratio.dtype)
        seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
        log_ratio = seq.expand_as(log_ratio)
    elif ratio_level != "token":
        raise ValueError(f"policy_loss: ratio_level must be token or sequence, got {ratio_level!r}")
    ratio = torch.exp(log_ratio.clamp(-max_log_ratio, max_log_ratio))
    surrogate = ratio * advantages
    clipped_surrogate = torch.clamp(ratio, 1 - clip_eps, 1 + high) * advantages
    loss = -torch.minimum(surrogate, clipped_surrogate)
    adv = torch.as_tensor(advantages, dtype=ratio.dtype).expand_as(ratio)
    dual_clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual_clipped = (adv < 0) & (loss > bound)
        loss = torch.where(dual_clipped, bound, loss)
    with torch.no_grad():
        adv = adv.detach()
        # the clipped branch is the smaller one exactly where the gradient is cut off
        clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0)) | dual_clipped
        stats = PolicyStats(
            clipfrac=masked_mean(clipped.to(ratio.dtype), mask),
            approx_kl_k1=masked_mean(-log_ratio, mask),
            approx_kl_k3=masked_mean(torch.expm1(log_ratio.clamp(max=max_log_ratio)) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    clip_eps: float | None = None,
) -> tuple[Tensor, ValueStats]:
    """Squared value error, optionally clipped around the rollout-time values (as in PPO2 / TRL / CleanRL).

        unclipped: 0.5·(v − R)²
        clipped:   0.5·max((v − R)², (v_old + clip(v − v_old, −ε, ε) − R)²)

    ``mask`` only affects the statistics: reduce the loss with :func:`heed.algos.ops.aggregate`.
    Shapes: ``values``, ``old_values``, ``returns``, ``mask`` (B, T) or (N,) alike.
    Returns ``(loss like values, ValueStats)``.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped, ValueStats(clipfrac=torch.zeros((), dtype=values.dtype, device=values.device))
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, ValueStats(clipfrac=clipfrac)


def lm_loss(logits: Tensor, labels: Tensor, mask: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Per-token negative log-likelihood: −log p(labels_t | logits_t), 0 where ``mask`` is False.

    Labels are already aligned (position t predicts ``labels[t]``); masked labels may hold
    anything (e.g. −100). Chunked like :func:`heed.algos.ops.selective_log_softmax`, so bf16
    logits never become a float32 (B, T, V) log-softmax. Reduce with
    :func:`heed.algos.ops.aggregate` (``token_mean`` is the usual SFT loss).
    Shapes: ``logits`` (B, T, V); ``labels``, ``mask`` (B, T). Returns (B, T) float32.
    """
    valid = mask.to(device=labels.device, dtype=torch.bool)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -selective_log_softmax(logits, safe_labels, chunk_size=chunk_size)
    return torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
