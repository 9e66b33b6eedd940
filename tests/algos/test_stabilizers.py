"""Hand-derived values for the GRPO/PPO stabilisers: reward scaling, DAPO's overlong penalty, GSPO's
sequence ratio, engine-mismatch importance weights (and the unbiased gradient they give), the best-of-n KL,
DAPO's dynamic-sampling filter, process rewards on step-end tokens and the adaptive entropy bonus."""

from __future__ import annotations

import math

import pytest
import torch

from heed.algos import (
    EntropyController,
    best_of_n_kl,
    engine_importance_weights,
    grpo_advantages,
    informative_groups,
    overlong_penalty,
    policy_loss,
    step_token_rewards,
)


def T(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def close(a: torch.Tensor | float, b: list | float, tol: float = 1e-6) -> None:
    assert torch.allclose(
        torch.as_tensor(a, dtype=torch.float64),
        T(b) if isinstance(b, list) else torch.tensor(b, dtype=torch.float64),
        atol=tol,
    ), (a, b)


def test_grpo_scale_group_batch_none() -> None:
    # rewards [1, 3 | 2, 2], K = 2: group means 2, 2 -> centred [-1, 1, 0, 0]
    r = T([1.0, 3.0, 2.0, 2.0])
    close(grpo_advantages(r, 2, scale="none"), [-1.0, 1.0, 0.0, 0.0])
    # group std (unbiased): sqrt(((−1)² + 1²) / 1) = √2 for group 1, 0 for group 2
    close(grpo_advantages(r, 2, scale="group", eps=1e-12), [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0])
    # batch std (unbiased) of [1, 3, 2, 2]: mean 2, squares 1 + 1 + 0 + 0 = 2, var 2/3
    s = math.sqrt(2 / 3)
    close(grpo_advantages(r, 2, scale="batch", eps=1e-12), [-1 / s, 1 / s, 0.0, 0.0])
    # the old boolean spelling still means group / none
    close(
        grpo_advantages(r, 2, scale=True, eps=1e-12), grpo_advantages(r, 2, scale="group", eps=1e-12).tolist()
    )
    close(grpo_advantages(r, 2, scale=False), [-1.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(r, 2, scale="batches")  # type: ignore[arg-type]


def test_overlong_penalty_ramps_over_the_cache() -> None:
    # L_max = 10, L_cache = 4: free up to 6, then (6 − |y|)/4, −1 past 10
    lengths = torch.tensor([5, 6, 7, 8, 10, 11])
    close(overlong_penalty(lengths, 10, 4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="cache"):
        overlong_penalty(lengths, 10, 0)


def test_gspo_sequence_ratio() -> None:
    # row 1: token log-ratios [ln 2, 0] -> s = exp(ln 2 / 2) = √2 ≈ 1.414 > 1.2, A = +1: clipped, loss −1.2
    # row 2: one valid token, log-ratio ln 0.9 -> s = 0.9, A = −1: inside the band, loss −s·A = 0.9
    old = T([[0.0, 0.0], [0.0, 0.0]])
    logprobs = T([[math.log(2.0), 0.0], [math.log(0.9), 5.0]]).requires_grad_(True)
    mask = torch.tensor([[True, True], [True, False]])
    adv = T([[1.0], [-1.0]])
    loss, stats = policy_loss(logprobs, old, adv, mask, ratio_level="sequence")
    close(loss, [[-1.2, -1.2], [0.9, 0.9]])
    close(stats.clipfrac, 2 / 3)  # both valid tokens of row 1 are clipped, row 2's one is not
    (loss * mask).sum().backward()
    # row 1 clipped: no gradient; row 2: d(s)/d logπ_0 = s · 1/1 = 0.9; the padded token gets none
    close(logprobs.grad, [[0.0, 0.0], [0.9, 0.0]])
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logprobs, old, adv, ratio_level="sequence")


def test_engine_importance_weights_tis_and_mis() -> None:
    # w = exp(old − engine) = [2, 1, 0.25]; cap 1.5
    old = T([[0.0, 0.0, 0.0]])
    engine = T([[math.log(0.5), 0.0, math.log(4.0)]])
    w, stats = engine_importance_weights(old, engine, cap=1.5, mode="tis")
    close(w, [[1.5, 1.0, 0.25]])
    close(stats["capped_frac"], 1 / 3)
    w, _ = engine_importance_weights(old, engine, cap=1.5, mode="mis")
    close(w, [[0.0, 1.0, 0.25]])
    mask = torch.tensor([[True, True, False]])
    w, stats = engine_importance_weights(old, engine, mask, cap=1.5)
    close(w, [[1.5, 1.0, 0.0]])
    close(stats["weight_mean"], 1.25)


def test_engine_importance_weights_remove_the_sampling_bias() -> None:
    # Tokens drawn from the engine μ = [0.4, 0.4, 0.2] while the trainer's policy is
    # π_old = [0.5, 0.3, 0.2]; f = [1, 0, 0]. E_μ[f] = 0.4 is biased; E_π[f] = 0.5 is the target.
    # Reweighted: Σ_y μ(y) w(y) f(y) = 0.4 · (0.5/0.4) = 0.5 (no weight reaches the cap of 2).
    mu, pi, f = T([0.4, 0.4, 0.2]), T([0.5, 0.3, 0.2]), T([1.0, 0.0, 0.0])
    w, _ = engine_importance_weights(pi.log().unsqueeze(0), mu.log().unsqueeze(0), cap=2.0)
    close((mu * f).sum(), 0.4)
    close((mu * w[0] * f).sum(), 0.5)
    close((mu * w[0]).sum(), 1.0)  # the weights integrate to one under μ


def test_best_of_n_kl() -> None:
    close(best_of_n_kl(1), 0.0)
    close(best_of_n_kl(2), math.log(2) - 0.5)  # 0.19315
    close(best_of_n_kl(4), math.log(4) - 0.75)  # 0.63629
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_informative_groups_need_two_different_valid_rewards() -> None:
    # K = 3: [1, 0, 1] varies; [1, 1, 1] all right; [0, 0, 0] all wrong; [NaN, 1, 1] equal among the valid;
    # [NaN, NaN, 2] one valid answer; [NaN, 0, 1] varies among the valid
    nan = math.nan
    r = T([1, 0, 1, 1, 1, 1, 0, 0, 0, nan, 1, 1, nan, nan, 2, nan, 0, 1])
    assert informative_groups(r, 3).tolist() == [True, False, False, False, False, True]
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups(r, 4)


def test_step_token_rewards_land_on_the_step_ends() -> None:
    # row 0: steps end at tokens 1 and 4 with scores 0.5, −1; row 1: two steps end on token 2 (they add),
    # its third step is padding (−1: nowhere)
    ends = torch.tensor([[1, 4, -1], [2, 2, -1]])
    scores = T([[0.5, -1.0, 0.0], [0.25, 0.5, 9.0]])
    close(
        step_token_rewards(ends, scores, 5),
        [[0.0, 0.5, 0.0, 0.0, -1.0], [0.0, 0.0, 0.75, 0.0, 0.0]],
    )
    with pytest.raises(ValueError, match="past the width"):
        step_token_rewards(ends, scores, 4)


def test_entropy_controller_moves_toward_the_target() -> None:
    ctl = EntropyController(0.0, target=1.0, lr=0.1, max_coef=0.25)
    # entropy 0.4 < 1: α ← 0 + 0.1·(1 − 0.4) = 0.06; again: 0.12
    assert ctl.update(0.4) == pytest.approx(0.06)
    assert ctl.update(0.4) == pytest.approx(0.12)
    # entropy 2.0 > 1: α ← 0.12 + 0.1·(1 − 2) = 0.02; then 0.02 − 0.1 < 0 -> 0
    assert ctl.update(2.0) == pytest.approx(0.02)
    assert ctl.update(2.0) == 0.0
    # far below: 0 + 0.1·(1 − (−9)) = 1 -> capped at 0.25; NaN (nothing measured) leaves it
    assert ctl.update(-9.0) == 0.25
    assert ctl.update(math.nan) == 0.25
    fixed = EntropyController(0.03)  # no target: the plain fixed bonus
    assert fixed.update(0.0) == 0.03 and not fixed.adaptive
    with pytest.raises(ValueError):
        EntropyController(-1.0)


def test_tis_weighted_policy_gradient_is_the_on_policy_gradient() -> None:
    """The trainer's step-6 loss (clipped surrogate × the off-policy weight) on tokens drawn from a
    mismatched engine μ: its expectation under μ has the on-policy gradient under π_old.

    One token over 3 choices, π = softmax(θ) at θ = log π_old (ratio 1, inside the clip), advantages A:
    the on-policy gradient of E_{y∼π_old}[−ρ(y)·A(y)] is −Σ_y π_old(y)·A(y)·∇log π(y). Sampling from μ
    without the weights gives −Σ_y μ(y)·A(y)·∇log π(y) instead; with w = π_old/μ (no weight at the cap)
    each term μ(y)·w(y) = π_old(y): the same gradient. With the cap at 1.2 the token y = 0 (w = 0.5/0.3)
    is truncated: its term becomes μ(0)·1.2·A(0)·∇log π(0) = 0.36 instead of 0.5 — hand-derived below.
    """
    pi_old, mu, adv = T([0.5, 0.3, 0.2]), T([0.3, 0.5, 0.2]), T([1.0, -0.5, 2.0])

    def expected_grad(probs: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        theta = pi_old.log().clone().requires_grad_(True)
        logp = torch.log_softmax(theta, -1)
        total = torch.zeros((), dtype=torch.float64)
        for y in range(3):  # enumerate the token: the exact expectation
            loss, _ = policy_loss(logp[y].view(1, 1), pi_old.log()[y].view(1, 1), adv[y].view(1, 1))
            if weights is not None:
                loss = loss * weights[y]  # what micro_batch_loss does with part.loss_weights
            total = total + probs[y] * loss.sum()
        total.backward()
        return theta.grad

    on_policy = expected_grad(pi_old, None)
    # ∇_θ log π(y) = e_y − π, so −Σ_y π(y)A(y)(e_y − π) = −(π⊙A) + π·Σ π A; Σ π A = 0.5 − 0.15 + 0.4 = 0.75
    close(on_policy, (-(pi_old * adv) + pi_old * 0.75).tolist())
    w, _ = engine_importance_weights(pi_old.log().view(1, 3), mu.log().view(1, 3), cap=2.0)
    close(expected_grad(mu, w[0]), on_policy.tolist())
    biased = expected_grad(mu, None)
    assert float((biased - on_policy).abs().max()) > 0.05  # without the weights the gradient is off
    # cap 1.2: effective probabilities μ·w = [0.3·1.2, 0.3, 0.2] = [0.36, 0.3, 0.2];
    # −(q⊙A) + π·Σ q A with Σ q A = 0.36 − 0.15 + 0.4 = 0.61
    w_cap, _ = engine_importance_weights(pi_old.log().view(1, 3), mu.log().view(1, 3), cap=1.2)
    q = T([0.36, 0.3, 0.2])
    close(expected_grad(mu, w_cap[0]), (-(q * adv) + pi_old * 0.61).tolist())
