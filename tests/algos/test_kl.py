"""heed.algos.kl: k1/k2/k3 estimators, KL-penalised token rewards, β controllers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heed.algos import AdaptiveKLController, FixedKLController, kl_estimate, kl_penalized_rewards

T = torch.tensor
FAST = settings(max_examples=30, deadline=None)


def close(actual: torch.Tensor, expected, **kw) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


def test_kl_estimators_hand_values():
    # π(x) = 0.5, π_ref(x) = 0.25: d = log(π_ref/π) = log 0.5 = −ln 2
    logprobs, ref = T([math.log(0.5)]), T([math.log(0.25)])
    ln2 = math.log(2.0)
    close(kl_estimate(logprobs, ref, "k1"), [ln2])  # −d
    close(kl_estimate(logprobs, ref, "k2"), [ln2**2 / 2])  # d²/2 = 0.2402
    close(kl_estimate(logprobs, ref, "k3"), [0.5 - 1 + ln2])  # e^d − 1 − d = 0.1931


def test_kl_estimators_are_zero_when_policies_agree():
    x = torch.randn(4, 5)
    for kind in ("k1", "k2", "k3"):
        close(kl_estimate(x, x, kind), torch.zeros(4, 5))


@FAST
@given(v=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_k1_and_k3_are_unbiased_k2_k3_nonnegative(v, seed):
    # Exact expectation under x ~ π: Σ_x π(x)·k(x) equals KL(π ‖ π_ref) for k1 and k3.
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), -1)
    p = logp.exp()
    true_kl = (p * (logp - ref)).sum()
    close((p * kl_estimate(logp, ref, "k1")).sum(), true_kl)
    close((p * kl_estimate(logp, ref, "k3")).sum(), true_kl)
    assert torch.all(kl_estimate(logp, ref, "k2") >= 0)
    assert torch.all(kl_estimate(logp, ref, "k3") >= 0)


def test_kl_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")  # type: ignore[arg-type]


def test_kl_penalized_rewards_hand_values():
    scores = T([1.0, 2.0, 5.0])
    logprobs = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, 50.0], [0.0, 0.0, 0.0]])
    ref_logprobs = T([[-1.5, -1.0, -3.0], [-2.0, -1.0, -7.0], [0.0, 0.0, 0.0]])
    mask = T([[True, True, True], [True, True, False], [False, False, False]])
    beta = 0.1
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta)
    # k1 = logprobs − ref: row 0 (0.5, −1, 0); row 1 (1, 0, pad); row 2 empty
    close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # rewards = −0.1·kl, plus the score on the last valid token (t=2 in row 0, t=1 in row 1);
    # row 2 has no token to carry its score
    close(rewards, [[-0.05, 0.1, 1.0], [-0.1, 2.0, 0.0], [0.0, 0.0, 0.0]])


def test_kl_penalized_rewards_k3_and_score_on_last_true_position():
    # k3 with d = ref − logp = −ln 2 on the single valid token -> 0.5 − 1 + ln 2
    logprobs = T([[0.0, math.log(0.5)]])
    ref = T([[0.0, math.log(0.25)]])
    mask = T([[False, True]])  # a left-padded row still gets its score on its last valid token
    rewards, kl = kl_penalized_rewards(T([3.0]), logprobs, ref, mask, beta=1.0, kind="k3")
    k3 = 0.5 - 1 + math.log(2.0)
    close(kl, [[0.0, k3]])
    close(rewards, [[0.0, 3.0 - k3]])


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_hand_values():
    # e = clip(KL/target − 1, ±0.2); β ← β·(1 + e·n/horizon), target 6, horizon 10000, n = 100
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=6.6, n_steps=100)  # e = 0.1 -> ×1.001
    assert ctl.value == pytest.approx(0.1 * 1.001)
    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    ctl.update(current_kl=60.0, n_steps=100)  # e = 9 clipped to 0.2 -> ×1.002
    assert ctl.value == pytest.approx(0.1002)
    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    ctl.update(current_kl=0.0, n_steps=100)  # e = −1 clipped to −0.2 -> ×0.998
    assert ctl.value == pytest.approx(0.0998)


def test_adaptive_kl_controller_steers_toward_target():
    # KL above target for many updates keeps raising β; KL at target leaves it alone
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    for _ in range(10):
        ctl.update(current_kl=3.0, n_steps=10)
    assert ctl.value == pytest.approx(0.1 * 1.02**10)
    before = ctl.value
    ctl.update(current_kl=1.0, n_steps=10)
    assert ctl.value == before
