"""heed.algos.advantages: GAE (termination vs truncation), token GAE, RLOO, GRPO, REINFORCE."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heed.algos import ema_update, gae, grpo_advantages, reinforce_advantages, rloo_advantages, token_gae

T = torch.tensor
NAN = float("nan")
FAST = settings(max_examples=30, deadline=None)


def close(actual: torch.Tensor, expected, **kw) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


# ---------------------------------------------------------------- gae

GAMMA, LAM = 0.9, 0.8
REWARDS = T([1.0, 2.0, 3.0])
VALUES = T([0.5, 1.0, 1.5])


def test_gae_three_steps_with_termination():
    # One episode of 3 steps that terminates at t=2: discounts = γ·(1 − terminated) = (0.9, 0.9, 0).
    next_values = T([1.0, 1.5, 2.0])  # V(s_{t+1}); the 2.0 after the terminal step must be ignored
    discounts = T([0.9, 0.9, 0.0])
    # δ0 = 1 + 0.9·1.0 − 0.5 = 1.4
    # δ1 = 2 + 0.9·1.5 − 1.0 = 2.35
    # δ2 = 3 + 0·2.0  − 1.5 = 1.5
    # A2 = 1.5
    # A1 = 2.35 + 0.9·0.8·1.5  = 2.35 + 1.08   = 3.43
    # A0 = 1.4  + 0.9·0.8·3.43 = 1.4  + 2.4696 = 3.8696
    # returns = A + V = (4.3696, 4.43, 3.0)
    adv, ret = gae(REWARDS, VALUES, next_values, discounts, LAM)
    close(adv, [3.8696, 3.43, 1.5])
    close(ret, [4.3696, 4.43, 3.0])
    # λ = 1 gives Monte-Carlo returns: R2 = 3, R1 = 2 + 0.9·3 = 4.7, R0 = 1 + 0.9·4.7 = 5.23
    _, ret1 = gae(REWARDS, VALUES, next_values, discounts, 1.0)
    close(ret1, [5.23, 4.7, 3.0])


def test_gae_three_steps_with_truncation():
    # Episode A = steps 0, 1, cut by a time limit at step 1 (not terminated); episode B starts at step 2.
    # The truncated step bootstraps from V(final obs of A) = 2.0, not from V(first obs of B) = 1.5,
    # and the recursion does not carry A_2 (episode B) into A_1.
    next_values = T([1.0, 2.0, 0.7])
    discounts = T([0.9, 0.9, 0.9])  # nothing terminated
    continues = T([1.0, 0.0, 1.0])  # episode ends (truncated) at t=1
    # δ0 = 1 + 0.9·1.0 − 0.5 = 1.4
    # δ1 = 2 + 0.9·2.0 − 1.0 = 2.8
    # δ2 = 3 + 0.9·0.7 − 1.5 = 2.13
    # A2 = 2.13;  A1 = δ1 = 2.8 (not linked to episode B);  A0 = 1.4 + 0.72·2.8 = 3.416
    adv, ret = gae(REWARDS, VALUES, next_values, discounts, LAM, continues=continues)
    close(adv, [3.416, 2.8, 2.13])
    close(ret, [3.916, 3.8, 3.63])

    # Treating truncation as termination (the common bug) would drop the bootstrap: δ1 = 2 − 1 = 1.0.
    wrong, _ = gae(REWARDS, VALUES, next_values, T([0.9, 0.0, 0.9]), LAM)
    assert wrong[1].item() == pytest.approx(1.0)
    # Without `continues` (default: continues = discounts > 0) A_1 would wrongly absorb A_2:
    # 2.8 + 0.72·2.13 = 4.3336
    linked, _ = gae(REWARDS, VALUES, next_values, discounts, LAM)
    assert linked[1].item() == pytest.approx(4.3336)


def test_gae_batch_dims_and_float_discount():
    # rows are independent; a float discount broadcasts over (B, T)
    rewards = torch.stack([REWARDS, 2 * REWARDS])
    values = torch.stack([VALUES, VALUES])
    next_values = torch.stack([T([1.0, 1.5, 0.0]), T([1.0, 1.5, 0.0])])
    adv, _ = gae(rewards, values, next_values, 0.9, LAM)
    for row in range(2):
        expected, _ = gae(rewards[row], values[row], next_values[row], T([0.9, 0.9, 0.9]), LAM)
        close(adv[row], expected)


@FAST
@given(t=st.integers(1, 12), gamma=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_gae_lambda_limits(t, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    rewards, values = (
        torch.randn(t, generator=g, dtype=torch.float64),
        torch.randn(t, generator=g, dtype=torch.float64),
    )
    # one consistent trajectory: s_{t+1} is the next step's state, bootstrap V after the last step
    next_values = torch.cat([values[1:], torch.randn(1, generator=g, dtype=torch.float64)])
    terminated = torch.rand(t, generator=g) < 0.3
    discounts = gamma * (~terminated).to(torch.float64)
    deltas = rewards + discounts * next_values - values
    # λ = 0: one-step TD errors
    adv0, _ = gae(rewards, values, next_values, discounts, 0.0)
    close(adv0, deltas)
    # λ = 1: returns are discounted reward sums, cut at terminations, bootstrapped after the last step:
    # G_t = r_t + discounts_t · G_{t+1},  G_T = next_values_{T-1}
    _, ret1 = gae(rewards, values, next_values, discounts, 1.0)
    expected = torch.empty(t, dtype=torch.float64)
    following = next_values[-1]
    for i in reversed(range(t)):
        following = rewards[i] + discounts[i] * following
        expected[i] = following
    close(ret1, expected)


# ---------------------------------------------------------------- token_gae


def test_token_gae_right_padded_gamma_lambda_one():
    # γ = λ = 1: returns are the reward-to-go inside each response; A = returns − V.
    rewards = T([[0.0, 0.0, 1.0], [0.5, 2.0, 99.0]])
    values = T([[0.2, 0.4, 0.6], [1.0, 3.0, 99.0]])
    mask = T([[True, True, True], [True, True, False]])
    adv, ret = token_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: returns (1, 1, 1); A = (0.8, 0.6, 0.4)
    # row 1: returns (2.5, 2, 0·pad); A = (1.5, −1, 0); the padded 99s are ignored
    close(ret, [[1.0, 1.0, 1.0], [2.5, 2.0, 0.0]])
    close(adv, [[0.8, 0.6, 0.4], [1.5, -1.0, 0.0]])


def test_token_gae_last_valid_token_is_terminal():
    rewards = T([[0.5, 2.0, 99.0]])
    values = T([[1.0, 3.0, 99.0]])
    mask = T([[True, True, False]])
    # γ = λ = 0.5. Last valid token t=1 is terminal: δ1 = 2 + 0 − 3 = −1;
    # δ0 = 0.5 + 0.5·3 − 1 = 1.0; A1 = −1; A0 = 1.0 + 0.25·(−1) = 0.75; returns (1.75, 2.0)
    adv, ret = token_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[0.75, -1.0, 0.0]])
    close(ret, [[1.75, 2.0, 0.0]])


def test_token_gae_matches_gae_on_unpadded_rows():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 3, 1]
    mask = torch.arange(6) < T(lengths).unsqueeze(-1)
    adv, _ = token_gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for row, n in enumerate(lengths):
        r, v = rewards[row, :n], values[row, :n]
        next_v = torch.cat([v[1:], T([0.0])])
        discounts = torch.cat([torch.full((n - 1,), 0.95), T([0.0])])
        expected, _ = gae(r, v, next_v, discounts, 0.9)
        close(adv[row, :n], expected)
        assert torch.all(adv[row, n:] == 0)


def test_token_gae_empty_row_and_left_padding():
    adv, ret = token_gae(torch.ones(1, 3), torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool), 1.0, 1.0)
    close(adv, [[0.0, 0.0, 0.0]])
    close(ret, [[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="right-padded"):
        token_gae(torch.ones(1, 3), torch.ones(1, 3), T([[False, True, True]]), 1.0, 1.0)


# ---------------------------------------------------------------- rloo


def test_rloo_hand_values():
    # group (1, 2, 3, 6): baselines (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2
    # A = (1 − 11/3, 2 − 10/3, 3 − 3, 6 − 2) = (−8/3, −4/3, 0, 4)
    close(rloo_advantages(T([1.0, 2.0, 3.0, 6.0]), 4), [-8 / 3, -4 / 3, 0.0, 4.0])


def test_rloo_groups_are_consecutive_rows():
    # prompt-major: (1, 3) is group 0, (10, 10) is group 1 -> (−2, 2, 0, 0)
    close(rloo_advantages(T([1.0, 3.0, 10.0, 10.0]), 2), [-2.0, 2.0, 0.0, 0.0])


def test_rloo_none_rewards_are_left_out():
    # NaN (a reward function returned None) at index 1: valid (1, 3, 5)
    # baselines: (3+5)/2 = 4, (1+5)/2 = 3, (1+3)/2 = 2 -> A = (−3, 0·invalid, 0, 3)
    close(rloo_advantages(T([1.0, NAN, 3.0, 5.0]), 4), [-3.0, 0.0, 0.0, 3.0])
    # the same through an explicit valid mask
    close(
        rloo_advantages(T([1.0, 123.0, 3.0, 5.0]), 4, valid=T([True, False, True, True])),
        [-3.0, 0.0, 0.0, 3.0],
    )
    # a lone valid sample has no baseline -> 0; an all-invalid group -> 0
    close(rloo_advantages(T([NAN, 2.0, NAN, NAN]), 2), [0.0, 0.0, 0.0, 0.0])


@FAST
@given(st.lists(st.floats(-100, 100), min_size=2, max_size=20).filter(lambda x: len(x) % 2 == 0))
def test_rloo_with_two_samples_is_plus_minus_difference(rewards):
    r = T(rewards, dtype=torch.float64)
    adv = rloo_advantages(r, 2).view(-1, 2)
    diff = r[0::2] - r[1::2]
    close(adv[:, 0], diff)
    close(adv[:, 1], -diff)


@FAST
@given(k=st.integers(2, 6), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_rloo_is_scaled_mean_centering(k, groups, seed):
    # A_i = r_i − (S − r_i)/(K−1) = K/(K−1)·(r_i − mean): zero-sum within each group
    r = torch.randn(groups * k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    adv = rloo_advantages(r, k).view(groups, k)
    grouped = r.view(groups, k)
    close(adv, k / (k - 1) * (grouped - grouped.mean(-1, keepdim=True)))


def test_rloo_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(torch.zeros(6), 4)


# ---------------------------------------------------------------- grpo


def test_grpo_hand_values():
    # group (1, 2, 3, 6): mean 3, deviations (−2, −1, 0, 3), unbiased var (4+1+0+9)/3 = 14/3
    std = math.sqrt(14 / 3)
    adv = grpo_advantages(T([1.0, 2.0, 3.0, 6.0]), 4)
    close(adv, [d / (std + 1e-4) for d in (-2.0, -1.0, 0.0, 3.0)])
    # scale=False (Dr. GRPO): deviations only
    close(grpo_advantages(T([1.0, 2.0, 3.0, 6.0]), 4, scale=False), [-2.0, -1.0, 0.0, 3.0])


def test_grpo_matches_trl_formula():
    # TRL GRPOTrainer: mean/std over view(-1, K) (torch.std: unbiased), A = (r − mean) / (std + 1e-4)
    torch.manual_seed(1)
    r = torch.randn(12)
    grouped = r.view(-1, 4)
    mean = grouped.mean(dim=1).repeat_interleave(4)
    std = grouped.std(dim=1).repeat_interleave(4)
    close(grpo_advantages(r, 4), (r - mean) / (std + 1e-4))


def test_grpo_ties_invalid_and_single_valid():
    # all equal rewards: no signal -> 0 (0 / (0 + eps))
    close(grpo_advantages(T([2.0, 2.0, 2.0]), 3), [0.0, 0.0, 0.0])
    # (1, NaN, 3): valid mean 2, deviations ±1, std sqrt(2/1)
    s = math.sqrt(2.0) + 1e-4
    close(grpo_advantages(T([1.0, NAN, 3.0]), 3), [-1 / s, 0.0, 1 / s])
    # one valid sample: deviation 0 -> 0
    close(grpo_advantages(T([NAN, 7.0]), 2), [0.0, 0.0])


# ---------------------------------------------------------------- reinforce baseline


def test_reinforce_advantages_and_ema_update():
    # A = r − b; the NaN reward gets 0
    close(reinforce_advantages(T([1.0, 2.0, NAN]), 1.5), [-0.5, 0.5, 0.0])
    close(reinforce_advantages(T([1.0, 2.0]), T([0.0, 1.0])), [1.0, 1.0])
    # b ← 0.9·1 + 0.1·mean(2, 4) = 0.9 + 0.3 = 1.2
    close(ema_update(1.0, T([2.0, 4.0]), 0.9), 1.2)
    # NaN rewards are skipped: mean(2) -> 0.9 + 0.2 = 1.1
    close(ema_update(T(1.0), T([2.0, NAN]), 0.9), 1.1)
    # nothing valid: unchanged
    close(ema_update(1.0, T([NAN, NAN]), 0.9), 1.0)
