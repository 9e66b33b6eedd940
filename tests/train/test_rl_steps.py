"""The steps of one RL update on hand-made rollouts: advantages of every algorithm with hand-derived
values, and the update's micro-batch weighting (any micro-batching gives the one-batch gradient)."""

from __future__ import annotations

import math

import pytest
import torch

from heed.config import config_from_dict
from heed.config.rl import RLConfig
from heed.rollout.batch import Rollout
from heed.train.rl import (
    Learner,
    MinibatchPlan,
    compute_advantages,
    update_policy,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(algorithm: str, **over: object) -> RLConfig:
    raw: dict[str, object] = {
        "algorithm": algorithm,
        "model": {"path": "m"},
        "data": {"prompts": "p.jsonl"},
        "rewards": [{"function": "f"}],
        "rollout": {"prompts_per_step": 2, "k": 2},
        "kl": {"estimator": "k1"},
        **over,
    }
    return config_from_dict(RLConfig, raw, "test")


def rollout(scores: list[float], old: list[list[float]], ref: list[list[float]], values=None) -> Rollout:
    """Two prompts x K = 2 answers of 2 tokens each (every token counts); only the per-token tensors matter."""
    n, c = len(scores), len(old[0])
    ids = torch.zeros((n, 1 + c), dtype=torch.long)
    return Rollout(
        input_ids=ids,
        attention_mask=torch.ones_like(ids, dtype=torch.bool),
        target_mask=torch.ones_like(ids, dtype=torch.bool),
        response_mask=torch.ones((n, c), dtype=torch.bool),
        prompt_width=1,
        scores=torch.tensor(scores),
        old_logprobs=torch.tensor(old),
        ref_logprobs=torch.tensor(ref),
        old_values=None if values is None else torch.tensor(values),
    )


# Row 0 has k1 = old − ref = [0.5, 0] on its tokens; the others have none. With β = 0.5 its sequence
# return is 1 − 0.5·0.5 = 0.75, so the returns are [0.75, 0, 2, 2].
OLD = [[-1.0, -1.0], [-1.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]]
REF = [[-1.5, -1.0], [-1.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]]
SCORES = [1.0, 0.0, 2.0, 2.0]


def test_rloo_advantages_leave_one_out_of_the_kl_penalised_return() -> None:
    adv = compute_advantages(cfg_for("rloo"), rollout(SCORES, OLD, REF), 0.5, None)
    # group 1: 0.75 − 0 and 0 − 0.75; group 2 ties
    assert torch.allclose(adv.advantages, torch.tensor([[0.75], [-0.75], [0.0], [0.0]]))
    assert adv.returns is None and adv.baseline is None


def test_grpo_advantages_without_scaling() -> None:
    cfg = cfg_for("grpo", advantages={"scale_rewards": "none"})
    adv = compute_advantages(cfg, rollout(SCORES, OLD, REF), 0.5, None)
    # group means 0.375 and 2
    assert torch.allclose(adv.advantages, torch.tensor([[0.375], [-0.375], [0.0], [0.0]]))


def test_reinforce_baseline_is_returned_not_stored() -> None:
    cfg = cfg_for("reinforce")  # decay 0.9
    ro = rollout(SCORES, OLD, REF)
    # no baseline yet: the batch mean (0.75 + 0 + 2 + 2) / 4 = 1.1875 is used, and stays after the update
    first = compute_advantages(cfg, ro, 0.5, None)
    assert torch.allclose(first.advantages.squeeze(-1), torch.tensor([0.75, 0, 2, 2]) - 1.1875)
    assert first.baseline == pytest.approx(1.1875)
    # baseline 1: advantages r − 1, then b ← 0.9·1 + 0.1·1.1875 = 1.01875
    second = compute_advantages(cfg, ro, 0.5, 1.0)
    assert torch.allclose(second.advantages.squeeze(-1), torch.tensor([-0.25, -1.0, 1.0, 1.0]))
    assert second.baseline == pytest.approx(1.01875)
    assert second.stats == {"baseline": pytest.approx(1.01875)}


def test_ppo_gae_with_gamma_and_lambda_one() -> None:
    cfg = cfg_for("ppo", advantages={"gamma": 1.0, "lam": 1.0, "whiten": False})
    values = [[0.5, 0.2], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    adv = compute_advantages(cfg, rollout(SCORES, OLD, REF, values), 0.5, None)
    # row 0: token rewards [−0.5·0.5, 1] = [−0.25, 1]; returns-to-go [0.75, 1]; A = G − V = [0.25, 0.8]
    # row 2: rewards [0, 2], V [1, 1]: G [2, 2], A [1, 1]
    assert torch.allclose(adv.advantages[0], torch.tensor([0.25, 0.8]))
    assert torch.allclose(adv.advantages[2], torch.tensor([1.0, 1.0]))
    assert torch.allclose(adv.returns[0], torch.tensor([0.75, 1.0]))  # value targets: A + V


def test_a_none_reward_gets_no_advantage() -> None:
    scores = [math.nan, 0.0, 2.0, 1.0]
    adv = compute_advantages(cfg_for("rloo"), rollout(scores, OLD, REF), 0.5, None)
    # row 0 is left out, so row 1 has no other valid answer in its group: no baseline, advantage 0
    assert torch.allclose(adv.advantages.squeeze(-1), torch.tensor([0.0, 0.0, 1.0, -1.0]))


# ------------------------------------------------------------------ the update's micro-batch weighting


def _learner(model: torch.nn.Module) -> Learner:
    from heed.train.collective import Collective
    from heed.train.common import make_accelerator

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tok = type("Tok", (), {"pad_token_id": 0})()
    return Learner(model, model, model, tok, opt, sched, None, make_accelerator("no"), Collective())


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_any_micro_batching_gives_the_one_batch_update(mode: str) -> None:
    from archs import build_causal, micro_tokenizer

    tok = micro_tokenizer()
    torch.manual_seed(0)
    n, p, c = 6, 3, 5
    ids = torch.randint(10, 200, (n, p + c))
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])  # answers of different lengths: the weights matter
    response = torch.arange(c).unsqueeze(0) < lengths.unsqueeze(-1)
    att = torch.cat([torch.ones((n, p), dtype=torch.bool), response], dim=1)
    ro = Rollout(
        input_ids=ids,
        attention_mask=att,
        target_mask=torch.cat([torch.zeros((n, p), dtype=torch.bool), response], dim=1),
        response_mask=response,
        prompt_width=p,
        scores=torch.zeros(n),
        old_logprobs=torch.full((n, c), -6.0) * response,
        ref_logprobs=torch.full((n, c), -6.0) * response,
        advantages=torch.tensor([[1.0], [-2.0], [0.5], [1.5], [-1.0], [0.3]]),
    )
    cfg = cfg_for("rloo", update={"loss_aggregation": mode}, optim={"max_grad_norm": None})

    def weights_after(micro: int) -> list[torch.Tensor]:
        model = build_causal("llama", tok, seed=3).float()
        update_policy(cfg, ro, _learner(model), MinibatchPlan(1, n, micro, None), 0.0, [], 1)
        return [q.detach().clone() for q in model.parameters()]

    one, split = weights_after(n), weights_after(1)
    diff = max(float((a - b).abs().max()) for a, b in zip(one, split, strict=True))
    assert diff < 1e-5, diff
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(one, build_causal("llama", tok, seed=3).parameters(), strict=True)
    )
    assert moved > 1e-3  # the step did change the weights


def test_ppo_process_rewards_sit_on_their_step_ends() -> None:
    cfg = cfg_for("ppo", advantages={"gamma": 1.0, "lam": 1.0, "whiten": False})
    values = [[0.5, 0.2], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    # row 0's score 1 holds two steps scored 0.25 (ending on token 0) and 0.5 (token 1); the other 0.25
    # of the score is an outcome reward on the last token. Token rewards: [−0.25 + 0.25, 0.5 + 0.25]
    # = [0, 0.75]; returns-to-go [0.75, 0.75]; A = G − V = [0.25, 0.55] (without steps: [0.25, 0.8])
    steps = torch.tensor([[0.25, 0.5], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    adv = compute_advantages(cfg, rollout(SCORES, OLD, REF, values), 0.5, None, step_rewards=steps)
    assert torch.allclose(adv.advantages[0], torch.tensor([0.25, 0.55]))
    assert torch.allclose(adv.returns[0], torch.tensor([0.75, 0.75]))
    assert torch.allclose(adv.advantages[2], torch.tensor([1.0, 1.0]))  # rows without steps: unchanged
    # RLOO uses the whole score per answer: step rewards change nothing
    rloo = compute_advantages(cfg_for("rloo"), rollout(SCORES, OLD, REF), 0.5, None, step_rewards=steps)
    assert torch.allclose(rloo.advantages, torch.tensor([[0.75], [-0.75], [0.0], [0.0]]))
