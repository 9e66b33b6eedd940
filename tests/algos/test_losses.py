"""heed.algos.losses: ranking / Bradley-Terry, DPO family, PPO policy and value losses, LM NLL."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from heed.algos import (
    PolicyStats,
    aggregate,
    bradley_terry_loss,
    dpo_loss,
    lm_loss,
    policy_loss,
    ranking_loss,
    simpo_loss,
    value_loss,
)

T = torch.tensor
NAN = float("nan")
FAST = settings(max_examples=30, deadline=None)
finite = st.floats(-20, 20, allow_nan=False)


def close(actual: torch.Tensor, expected, **kw) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


def softplus(x: float) -> float:
    # −log σ(z) = log(1 + e^{−z}) = softplus(−z)
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- Bradley-Terry and ranking


def test_bradley_terry_hand_values():
    # −log σ(1 − 0) = log(1 + e^{−1}) = 0.31326; with margin 1: −log σ(0) = ln 2
    close(bradley_terry_loss(T([1.0]), T([0.0])), [softplus(-1.0)])
    close(bradley_terry_loss(T([1.0]), T([0.0]), margin=1.0), [math.log(2.0)])
    close(
        bradley_terry_loss(T([1.0, 1.0]), T([0.0, 0.0]), margin=T([1.0, 0.0])),
        [math.log(2.0), softplus(-1.0)],
    )


def test_ranking_loss_k3_hand_values():
    # rewards (2, 1, 0) ranked 1, 2, 3: pairs (0,1) d=1, (0,2) d=2, (1,2) d=1; 1/C(3,2) = 1/3
    # loss = (softplus(−1) + softplus(−2) + softplus(−1)) / 3 = (0.313262·2 + 0.126928) / 3 = 0.251151
    loss, stats = ranking_loss(T([[2.0, 1.0, 0.0]]), T([[1, 2, 3]]), T([[True, True, True]]))
    close(loss, [(2 * softplus(-1.0) + softplus(-2.0)) / 3])
    close(loss, [0.251151], atol=1e-6, rtol=0)
    assert stats.accuracy.item() == 1.0
    assert stats.num_pairs.item() == 3


def test_ranking_loss_ties_are_skipped():
    # ranks (1, 1, 2): only (0,2) and (1,2) are pairs; rewards (0, 3, 1): d = −1 and 2
    loss, stats = ranking_loss(T([[0.0, 3.0, 1.0]]), T([[1, 1, 2]]), T([[True, True, True]]))
    close(loss, [(softplus(1.0) + softplus(-2.0)) / 2])
    assert stats.num_pairs.item() == 2
    assert stats.accuracy.item() == 0.5  # (0 > 1) wrong, (3 > 1) right


def test_ranking_loss_masked_responses_are_skipped():
    # the third response is padding (NaN reward, best rank): only pair (0,1) remains -> BT(2, 1)
    rewards = T([[2.0, 1.0, NAN]], requires_grad=True)
    loss, stats = ranking_loss(rewards, T([[1, 2, 0]]), T([[True, True, False]]))
    close(loss, bradley_terry_loss(T([2.0]), T([1.0])))
    loss.sum().backward()
    # d/dr_0 −log σ(r_0 − r_1) = −σ(−1); d/dr_1 = +σ(−1); the padded reward gets exactly 0, not NaN
    s = 1 / (1 + math.e)
    close(rewards.grad, [[-s, s, 0.0]])
    assert stats.num_pairs.item() == 1


def test_ranking_loss_group_without_pairs():
    # all ties, or a single valid response: no pair -> loss 0 (+ centering only), no accuracy
    loss, stats = ranking_loss(
        T([[1.0, 2.0], [5.0, 0.0]]), T([[1, 1], [1, 2]]), T([[True, True], [True, False]])
    )
    close(loss, [0.0, 0.0])
    assert stats.num_pairs.item() == 0
    assert stats.accuracy.item() == 0.0


def test_ranking_loss_centering_weights_and_margin():
    rewards, ranks, mask = T([[1.0, -3.0]]), T([[1, 2]]), T([[True, True]])
    # d = 4: softplus(−4) plus centering 0.01 · mean(1², 3²) = 0.01 · 5 = 0.05
    loss, _ = ranking_loss(rewards, ranks, mask, centering_coef=0.01)
    close(loss, [softplus(-4.0) + 0.05])
    # weights scale the whole group loss
    loss, _ = ranking_loss(rewards, ranks, mask, weights=T([2.0]), centering_coef=0.01)
    close(loss, [2 * (softplus(-4.0) + 0.05)])
    # per-group margin: d − m = 4 − 4 = 0 -> ln 2
    loss, _ = ranking_loss(rewards, ranks, mask, margin=T([4.0]))
    close(loss, [math.log(2.0)])


@FAST
@given(st.lists(st.tuples(finite, finite, st.floats(0, 3), st.booleans()), min_size=1, max_size=8))
def test_ranking_loss_with_two_responses_is_bradley_terry(rows):
    a = T([r[0] for r in rows])
    b = T([r[1] for r in rows])
    margin = T([r[2] for r in rows])
    a_first = T([r[3] for r in rows])
    # ranks (1, 2) when a is preferred, (2, 1) otherwise
    ranks = torch.stack([torch.where(a_first, 1, 2), torch.where(a_first, 2, 1)], dim=-1)
    loss, stats = ranking_loss(
        torch.stack([a, b], -1), ranks, torch.ones(len(rows), 2, dtype=torch.bool), margin
    )
    chosen, rejected = torch.where(a_first, a, b), torch.where(a_first, b, a)
    assert torch.equal(loss, bradley_terry_loss(chosen, rejected, margin))  # exactly, not approximately
    assert stats.num_pairs.item() == len(rows)
    close(stats.accuracy, (chosen > rejected).float().mean())


@FAST
@given(k=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_ranking_loss_is_mean_of_bradley_terry_over_all_pairs(k, seed):
    # InstructGPT eq. 1: 1/C(K,2) · Σ over all C(K,2) pairs of −log σ(r_better − r_worse)
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(k, generator=g, dtype=torch.float64)
    ranks = torch.randperm(k, generator=g) + 1
    loss, _ = ranking_loss(rewards[None], ranks[None], torch.ones(1, k, dtype=torch.bool))
    pair_losses = []
    for i, j in itertools.combinations(range(k), 2):
        better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
        pair_losses.append(bradley_terry_loss(rewards[better : better + 1], rewards[worse : worse + 1]))
    close(loss, torch.cat(pair_losses).mean().reshape(1))


# ---------------------------------------------------------------- DPO family


def test_dpo_hand_values():
    # π_c = −1, π_r = −3, ref_c = ref_r = −2, β = 0.5: h = (−1 + 2) − (−3 + 2) = 2, βh = 1
    args = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), 0.5)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*args)
    close(losses, [softplus(-1.0)])  # −log σ(1) = 0.313262
    close(chosen_rewards, [0.5])  # β·(−1 + 2)
    close(rejected_rewards, [-0.5])  # β·(−3 + 2)
    # cDPO with ε = 0.1: 0.9·softplus(−1) + 0.1·softplus(1) = 0.281936 + 0.131326 = 0.413262
    close(dpo_loss(*args, label_smoothing=0.1)[0], [0.413262], atol=1e-6, rtol=0)
    # IPO: (h − 1/(2β))² = (2 − 1)² = 1; hinge: relu(1 − βh) = relu(0) = 0
    close(dpo_loss(*args, loss_type="ipo")[0], [1.0])
    close(dpo_loss(*args, loss_type="hinge")[0], [0.0])


def test_dpo_rewards_are_detached_and_loss_has_gradient():
    pc = T([-1.0, -2.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, T([-3.0, -1.0]), T([-2.0, -2.0]), T([-2.0, -2.0]), 0.1
    )
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    # d/dπ_c −log σ(βh) = −β·σ(−βh): negative, so a step raises the chosen log-prob
    assert torch.all(pc.grad < 0)


def test_dpo_sigmoid_matches_trl_dpo_trainer():
    # TRL 1.16 DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py), written out:
    #   chosen_logratios = chosen_logps - ref_chosen_logps
    #   rejected_logratios = rejected_logps - ref_rejected_logps
    #   delta_score = chosen_logratios - rejected_logratios            # f_divergence_type "reverse_kl"
    #   per_sequence_loss = -F.logsigmoid(self.beta * delta_score)     # loss_type "sigmoid"
    #   chosen_rewards = self.beta * chosen_logratios.detach()
    # and earlier TRL releases (0.x, DPOTrainer.dpo_loss), with label smoothing (cDPO):
    #   logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    #   losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-(torch.rand(64, generator=g, dtype=torch.float64) * 200) for _ in range(4))
    for beta in (0.01, 0.1, 0.5):
        chosen_logratios, rejected_logratios = pc - rc, pr - rr
        trl_loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta)
        close(losses, trl_loss, rtol=1e-12, atol=1e-12)
        close(chosen_rewards, beta * chosen_logratios)
        close(rejected_rewards, beta * rejected_logratios)
        for ls in (0.1, 0.3):
            logits = (pc - pr) - (rc - rr)
            trl_cdpo = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
            close(dpo_loss(pc, pr, rc, rr, beta, label_smoothing=ls)[0], trl_cdpo, rtol=1e-12, atol=1e-12)


def test_dpo_rejects_unknown_loss_type():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), 0.1, loss_type="kto")  # type: ignore[arg-type]


def test_simpo_hand_values_and_trl_cpo_formula():
    # avg_c = −1, avg_r = −2, β = 2, γ = 0.5: 2·(−1) − 2·(−2) − 0.5 = 1.5 -> −log σ(1.5) = 0.201413
    losses, chosen_rewards, rejected_rewards = simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma=0.5)
    close(losses, [softplus(-1.5)])
    close(chosen_rewards, [-2.0])
    close(rejected_rewards, [-4.0])
    # TRL CPOTrainer (loss_type "simpo"): logits = (c − r) − γ/β; loss = −logσ(β·logits)
    c, r = T([-0.3, -1.7, -0.9]), T([-0.5, -0.2, -0.9])
    trl = -F.logsigmoid(2.0 * ((c - r) - 0.5 / 2.0))
    close(simpo_loss(c, r, 2.0, 0.5)[0], trl)


# ---------------------------------------------------------------- PPO policy loss

# ratios 1.5, 0.5, 1.1, 1, 1.5, 0.5 against advantages 1, −1, 2, −3, −1, 1 with ε = 0.2:
RATIOS = T([1.5, 0.5, 1.1, 1.0, 1.5, 0.5])
ADV = T([1.0, -1.0, 2.0, -3.0, -1.0, 1.0])
OLD = T([-1.0, -2.0, -0.5, -3.0, -1.0, -2.0])


def test_policy_loss_hand_values():
    logprobs = (OLD + RATIOS.log()).requires_grad_(True)
    loss, stats = policy_loss(logprobs, OLD, ADV)
    # −min(rA, clip(r)A):
    #   1.5·1:   min(1.5, 1.2)   = 1.2  -> −1.2  clipped (ratio too high, A > 0)
    #   0.5·−1:  min(−0.5, −0.8) = −0.8 -> 0.8   clipped (ratio too low, A < 0)
    #   1.1·2:   inside the band        -> −2.2
    #   1·−3:                           -> 3
    #   1.5·−1:  min(−1.5, −1.2) = −1.5 -> 1.5   not clipped: the pessimistic term is unclipped
    #   0.5·1:   min(0.5, 0.8)   = 0.5  -> −0.5  not clipped
    close(loss, [-1.2, 0.8, -2.2, 3.0, 1.5, -0.5])
    close(stats.clipfrac, 2 / 6)
    close(stats.ratio_mean, 6.1 / 6)
    log_r = RATIOS.log()
    close(stats.approx_kl_k1, (-log_r).mean())  # KL(old ‖ new) ≈ mean log(old/new)
    close(stats.approx_kl_k3, ((RATIOS - 1) - log_r).mean())
    # gradient: 0 where clipped, else d(−rA)/d logπ = −rA
    loss.sum().backward()
    close(logprobs.grad, [0.0, 0.0, -2.2, 3.0, 1.5, -0.5])


def test_policy_loss_mask_stats_and_clip_higher():
    logprobs = OLD + RATIOS.log()
    mask = T([False, True, True, True, True, True])
    _, stats = policy_loss(logprobs, OLD, ADV, mask)
    close(stats.clipfrac, 1 / 5)  # only the 0.5·−1 entry among the 5 valid ones
    close(stats.ratio_mean, 4.6 / 5)
    # DAPO clip-higher: ratio 1.25 with A = 1 is clipped at 1.2 (ε = 0.2) but not at 1.28 (ε_high = 0.28)
    lp, old = T([math.log(1.25)]), T([0.0])
    close(policy_loss(lp, old, T([1.0]))[0], [-1.2])
    close(policy_loss(lp, old, T([1.0]), clip_eps_high=0.28)[0], [-1.25])
    # ... while the low side still uses ε: ratio 0.7 with A = −1 -> min(−0.7, −0.8) = −0.8
    close(policy_loss(T([math.log(0.7)]), old, T([-1.0]), clip_eps_high=0.28)[0], [0.8])


def test_policy_loss_dual_clip_bounds_negative_advantages():
    # ratios 4, 1.5, 4 with A = −1, −1, +1 and c = 3:
    #   4·−1:   −min(−4, −1.2) = 4    > −c·A = 3 -> 3, dual-clipped (gradient 0)
    #   1.5·−1: −min(−1.5, −1.2) = 1.5 < 3      -> 1.5, gradient −rA = 1.5
    #   4·+1:   −min(4, 1.2) = −1.2 (A > 0: dual clip never applies), clipped (gradient 0)
    ratios, adv = T([4.0, 1.5, 4.0]), T([-1.0, -1.0, 1.0])
    old = T([-2.0, -2.0, -2.0])
    logprobs = (old + ratios.log()).requires_grad_(True)
    loss, stats = policy_loss(logprobs, old, adv, dual_clip=3.0)
    close(loss, [3.0, 1.5, -1.2])
    close(stats.clipfrac, 2 / 3)
    loss.sum().backward()
    close(logprobs.grad, [0.0, 1.5, 0.0])
    # without dual clip the first loss is the unbounded 4
    close(policy_loss(old + ratios.log(), old, adv)[0], [4.0, 1.5, -1.2])
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logprobs, old, adv, dual_clip=1.0)


def test_policy_loss_is_finite_for_huge_log_ratios():
    # an fp32 log-ratio of 100 with A = −1: exp(100) overflows to inf; clamped at 20 the loss is
    # exp(20) ≈ 4.85e8, finite, and its gradient is 0 (the clamp is flat there)
    old = T([0.0, 0.0])
    logprobs = T([100.0, -100.0]).requires_grad_(True)
    loss, stats = policy_loss(logprobs, old, T([-1.0, 1.0]))
    assert torch.isfinite(loss).all() and torch.isfinite(stats.approx_kl_k3)
    close(loss[0], math.exp(20.0))
    loss.sum().backward()
    assert torch.isfinite(logprobs.grad).all()


def test_policy_loss_sequence_advantage_broadcasts_and_aggregates():
    # one advantage per sequence (B, 1) over (B, T); on-policy (ratio 1) loss = −A on every token
    logprobs = torch.randn(2, 3)
    loss, stats = policy_loss(logprobs, logprobs.clone(), T([[2.0], [-1.0]]))
    close(loss, [[-2.0] * 3, [1.0] * 3])
    assert isinstance(stats, PolicyStats)
    close(stats.clipfrac, 0.0)
    close(stats.approx_kl_k3, 0.0)
    mask = T([[True, True, False], [True, False, False]])
    # token mean: (−2 − 2 + 1)/3 = −1; sequence mean: (−2 + 1)/2 = −0.5
    close(aggregate(loss, mask, "token_mean"), -1.0)
    close(aggregate(loss, mask, "seq_mean_token_mean"), -0.5)
    assert stats.as_dict("policy/").keys() == {
        "policy/clipfrac",
        "policy/approx_kl_k1",
        "policy/approx_kl_k3",
        "policy/ratio_mean",
    }


# ---------------------------------------------------------------- value loss


def test_value_loss_hand_values():
    values = T([1.0, 1.0, 2.0], requires_grad=True)
    old_values = T([0.5, 0.5, 2.0])
    returns = T([0.0, 2.0, 3.0])
    # unclipped: 0.5·(v − R)² = 0.5·(1, 1, 1)
    loss, stats = value_loss(values, old_values, returns)
    close(loss, [0.5, 0.5, 0.5])
    close(stats.clipfrac, 0.0)
    # ε = 0.2: v_clip = old + clip(v − old, ±0.2) = (0.7, 0.7, 2.0)
    #   t0: max((1−0)², (0.7−0)²) = max(1, 0.49) = 1      -> 0.5
    #   t1: max((1−2)², (0.7−2)²) = max(1, 1.69) = 1.69   -> 0.845 (clipped term wins)
    #   t2: v = old: both 1                                -> 0.5
    loss, stats = value_loss(values, old_values, returns, clip_eps=0.2)
    close(loss, [0.5, 0.845, 0.5])
    close(stats.clipfrac, 1 / 3)
    loss.sum().backward()
    # gradient (v − R) where the unclipped term wins, 0 where the saturated clipped term wins
    close(values.grad, [1.0, 0.0, -1.0])
    _, stats = value_loss(values, old_values, returns, mask=T([True, False, True]), clip_eps=0.2)
    close(stats.clipfrac, 0.0)


# ---------------------------------------------------------------- LM loss


def test_lm_loss_hand_values_and_masked_labels():
    # logits (0, ln 3) -> p = (1/4, 3/4): NLL(label 1) = −ln 0.75, NLL(label 0) = ln 4; the −100 label is masked
    logits = T([[[0.0, math.log(3.0)]] * 3])  # (1, 3, 2)
    labels = T([[1, 0, -100]])
    mask = T([[True, True, False]])
    close(lm_loss(logits, labels, mask), [[-math.log(0.75), math.log(4.0), 0.0]])


def test_lm_loss_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    mask = torch.rand(3, 5) < 0.7
    mask[0, 0] = True
    nll = lm_loss(logits, labels, mask, chunk_size=4)
    expected = F.cross_entropy(
        logits.transpose(1, 2), labels.masked_fill(~mask, -100), ignore_index=-100, reduction="none"
    )
    close(nll, expected.detach(), rtol=1e-5, atol=1e-6)
    # token_mean aggregation is the usual SFT loss: F.cross_entropy with mean over non-ignored labels
    mean_ce = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, -100), ignore_index=-100)
    close(aggregate(nll, mask, "token_mean"), mean_ce.detach(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(aggregate(nll, mask, "token_mean"), logits)
    (expected_grad,) = torch.autograd.grad(mean_ce, logits)
    close(grad, expected_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- KTO


def test_kto_loss_hand_values():
    from heed.algos import kto_loss

    # r = policy − ref = [1, −0.5, 2, 0]; labels [good, good, bad, bad]; KL 0.5; β = 2; λ_D = 1, λ_U = 1.5
    #   good, r = 1:    1 − σ(2·(1 − 0.5))    = 1 − σ(1)    = 0.268941
    #   good, r = −0.5: 1 − σ(2·(−0.5 − 0.5)) = 1 − σ(−2)   = 0.880797
    #   bad,  r = 2:    1.5·(1 − σ(2·(0.5 − 2))) = 1.5·(1 − σ(−3)) = 1.5·0.952574 = 1.428861
    #   bad,  r = 0:    1.5·(1 − σ(2·0.5))    = 1.5·(1 − σ(1)) = 0.403412
    policy = T([1.0, -0.5, 2.0, 0.0]).requires_grad_(True)
    ref = T([0.0, 0.0, 0.0, 0.0])
    good = torch.tensor([True, True, False, False])
    losses, rewards = kto_loss(policy, ref, good, 0.5, beta=2.0, undesirable_weight=1.5)
    close(losses, [0.268941, 0.880797, 1.428861, 0.403412])
    close(rewards, [2.0, -1.0, 4.0, 0.0])
    # d/dr of 1 − σ(β(r − z)) = −β σ'(·); of λ(1 − σ(β(z − r))) = +λβ σ'(·), σ' = σ(1 − σ)
    losses.sum().backward()
    s = torch.sigmoid
    expected = [
        -2 * s(T(1.0)) * (1 - s(T(1.0))),
        -2 * s(T(-2.0)) * (1 - s(T(-2.0))),
        1.5 * 2 * s(T(-3.0)) * (1 - s(T(-3.0))),
        1.5 * 2 * s(T(1.0)) * (1 - s(T(1.0))),
    ]
    close(policy.grad, [float(e) for e in expected])
    # the reference point is clamped at 0 and carries no gradient
    kl = T(-3.0).requires_grad_(True)
    l0, _ = kto_loss(T([0.0]), T([0.0]), torch.tensor([True]), kl, beta=1.0)
    close(l0, [0.5])  # 1 − σ(0): z_0 = max(0, −3) = 0
    assert not l0.requires_grad
