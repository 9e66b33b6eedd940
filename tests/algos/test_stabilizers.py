"""Hand-derived values for the GRPO/PPO stabilisers: reward scaling, DAPO's overlong penalty, GSPO's
sequence ratio, engine-mismatch importance weights and the best-of-n KL."""

from __future__ import annotations

import math

import pytest
import torch

from heed.algos import (
    best_of_n_kl,
    engine_importance_weights,
    grpo_advantages,
    overlong_penalty,
    policy_loss,
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
