"""Heed's GRPO stabilisers against TRL 1.16's own code on random inputs (within 1e-6).

Where TRL exposes a function (``trl.trainer.utils.nanstd``) it is called; where the logic sits inside a
``GRPOTrainer`` method, the exact TRL lines are reproduced below with the file and method named, and
compared with what Heed's trainer computes: reward scaling (``scale_rewards``), the GRPO / DAPO / BNPO
loss aggregation with clip-higher, GSPO's sequence-level ratio (``importance_sampling_level``), the
KL in the loss, TIS / MIS (``vllm_importance_sampling_correction``, ``token_truncate`` / ``token_mask``)
and ``mask_truncated_completions`` on a real generation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from heed import algos
from heed.config import config_from_dict
from heed.config.rl import RLConfig
from heed.rollout.batch import Rollout
from heed.train.rl import Learner, MinibatchPlan, micro_batch_loss, without_truncated

pytestmark = pytest.mark.usefixtures("one_thread")
trl_utils = pytest.importorskip("trl.trainer.utils")


def _trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    # trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions,
    # multi_objective_aggregation == "sum_then_normalize" (one reward function), lines as in TRL 1.16
    nanstd = trl_utils.nanstd
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_reward_scaling_matches_trl(scale: str) -> None:
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(24, generator=gen, dtype=torch.float64)
    rewards[[1, 9, 10]] = math.nan  # unscorable answers: left out of means and stds, advantage 0
    heed = algos.grpo_advantages(rewards, 4, scale=scale)  # type: ignore[arg-type]
    assert torch.allclose(heed, _trl_advantages(rewards, 4, scale), atol=1e-6, rtol=0)


def test_tis_and_mis_weights_match_trl() -> None:
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(5, 7, generator=gen, dtype=torch.float64) * 3
    sampling = old + torch.randn(5, 7, generator=gen, dtype=torch.float64) * 0.8
    mask = torch.rand(5, 7, generator=gen) > 0.2
    clip_max, clip_min = 2.0, None
    # trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions (use_vllm and
    # vllm_importance_sampling_correction), token_* modes:
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    ratio = torch.exp(per_token_logps_diff)
    truncate = torch.clamp(ratio, min=clip_min, max=clip_max)  # "token_truncate"
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    masked = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)  # "token_mask"
    # TRL's ratio is 1 off the mask (where the loss mask zeroes it anyway), Heed's 0: compare on the mask
    tis, _ = algos.engine_importance_weights(old, sampling, mask, cap=clip_max, mode="tis")
    mis, _ = algos.engine_importance_weights(old, sampling, mask, cap=clip_max, mode="mis")
    assert torch.allclose(tis, truncate * mask, atol=1e-6, rtol=0)
    assert torch.allclose(mis, masked * mask, atol=1e-6, rtol=0)
    assert float((truncate * mask - ratio * mask).abs().max()) > 0.1  # the cap was reached somewhere


def _trl_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    ref_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_ratio: torch.Tensor | None,
    importance_sampling_level: str,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
) -> torch.Tensor:
    # trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss (TRL 1.16), one process, one accumulation
    # step (current_gradient_accumulation_steps = steps_per_generation = 1, so num_items_in_batch is
    # the batch's mask sum), no delta, no entropy mask or bonus:
    mask = mask.to(per_token_logps.dtype)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    per_token_kl = (
        torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    )
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dapo":
        normalizer = mask.sum().clamp(min=1.0) / 1  # num_items_in_batch / num_processes
        return (per_token_loss * mask).sum() / normalizer
    raise AssertionError(loss_type)


HEED_AGGREGATION = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean"}


@pytest.mark.parametrize(
    "loss_type, level, correction",
    [
        ("grpo", "token", None),
        ("dapo", "token", "tis"),
        ("bnpo", "token", "mis"),
        ("grpo", "sequence", "tis"),
    ],
)
def test_trainer_loss_and_gradient_match_trl(loss_type: str, level: str, correction: str | None) -> None:
    """Heed's step-6 micro-batch loss on a real (tiny, random) model against TRL's ``_compute_loss`` fed
    the same per-token log-probs: the loss and the gradient of every weight agree."""
    from archs import build_causal, micro_tokenizer

    tok = micro_tokenizer()
    model = build_causal("llama", tok, seed=5).double()
    n, p, c = 6, 3, 5
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(10, 200, (n, p + c), generator=gen)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])
    response = torch.arange(c).unsqueeze(0) < lengths.unsqueeze(-1)
    target = torch.cat([torch.zeros((n, p), dtype=torch.bool), response], dim=1)
    att = torch.cat([torch.ones((n, p), dtype=torch.bool), response], dim=1)
    from heed.models.forward import policy_forward

    with torch.no_grad():
        now = policy_forward(model, ids, att, target).logprobs[:, p:]
    # small ratios for GSPO (its clip range is ~1e-3), larger ones for the token level
    spread = 2e-3 if level == "sequence" else 0.3
    old = (now + torch.randn(n, c, generator=gen, dtype=torch.float64) * spread) * response
    ref = (now + torch.randn(n, c, generator=gen, dtype=torch.float64) * 0.2) * response
    engine = (old + torch.randn(n, c, generator=gen, dtype=torch.float64) * 0.5) * response
    adv = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    eps_low, eps_high = (3e-4, 4e-4) if level == "sequence" else (0.2, 0.28)
    weights = None
    if correction is not None:
        weights, _ = algos.engine_importance_weights(old, engine, response, cap=1.5, mode=correction)  # type: ignore[arg-type]
    ro = Rollout(
        input_ids=ids,
        attention_mask=att,
        target_mask=target,
        response_mask=response,
        prompt_width=p,
        scores=torch.zeros(n),
        old_logprobs=old,
        ref_logprobs=ref,
        advantages=adv,
        loss_weights=weights,
    )
    cfg = config_from_dict(
        RLConfig,
        {
            "algorithm": "grpo",
            "model": {"path": "m"},
            "data": {"prompts": "p.jsonl"},
            "rewards": [{"function": "f"}],
            "rollout": {"prompts_per_step": 3, "k": 2},
            "update": {
                "clip_eps": eps_low,
                "clip_eps_high": eps_high,
                "ratio_level": level,
                "loss_aggregation": HEED_AGGREGATION[loss_type],
            },
            "kl": {"beta": 0.04, "estimator": "k3", "in_reward": False},
        },
        "test",
    )
    from heed.train.collective import Collective
    from heed.train.common import make_accelerator

    learner = Learner(model, model, model, tok, None, None, None, make_accelerator("no"), Collective())
    heed_loss = micro_batch_loss(cfg, learner, ro, MinibatchPlan(1, n, n, None), 0.04, lambda k, v: None)
    heed_loss.backward()
    heed_grads = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    logps = policy_forward(model, ids, att, target).logprobs[:, p:]
    trl_ratio = None
    if correction is not None:  # TRL's ratio, computed as in test_tis_and_mis_weights_match_trl
        r = torch.exp(torch.nan_to_num((old - engine) * response, nan=0.0))
        trl_ratio = r.clamp(max=1.5) if correction == "tis" else r.masked_fill(r > 1.5, 0.0)
    trl = _trl_loss(logps, old, ref, adv, response, trl_ratio, level, loss_type, eps_low, eps_high, 0.04)
    trl.backward()
    assert float(heed_loss.detach()) == pytest.approx(float(trl), abs=1e-6)
    worst = max(float((a - q.grad).abs().max()) for a, q in zip(heed_grads, model.parameters(), strict=True))
    assert worst < 1e-6, worst
    assert max(float(g.abs().max()) for g in heed_grads) > 1e-3  # a real gradient, not two zeros


def test_truncated_answers_leave_the_loss_as_in_trl(micro_sft_model: Path) -> None:
    """Overlong filtering on a real generation of the micro SFT model: the answers Heed's engine marks
    unfinished are those TRL's ``mask_truncated_completions`` masks (no EOS or pad as last token)."""
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.rollout.batch import rollout_from_generation
    from heed.rollout.engine import make_engine
    from heed.rollout.generate import SamplingParams, stop_ids
    from heed.rollout.sampler import row_keys

    tok = load_tokenizer(micro_sft_model, padding_side="left")
    model = load_causal_lm(micro_sft_model).eval()
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Tell me about chess.", "Hi", "Why rain?")]
    engine = make_engine("heed", 64)
    keys = row_keys(1, list(range(24)))  # fixed draws: 4 of the 24 answers end within 10 tokens
    gen = engine(model, tok, prompts, SamplingParams(max_new_tokens=10, temperature=1.0), 8, keys=keys)
    ro = rollout_from_generation(gen, torch.zeros(len(gen.texts)))
    heed_mask = without_truncated(ro, gen.finished).response_mask
    # trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions (mask_truncated_completions):
    completion_ids_list = [
        row[m].tolist() for row, m in zip(gen.completion_ids, gen.completion_mask, strict=True)
    ]
    completion_mask = gen.completion_mask.int()
    eos_and_pad = [*stop_ids(tok, model), tok.pad_token_id]
    is_truncated = torch.tensor([ids[-1] not in eos_and_pad for ids in completion_ids_list])
    completion_mask = completion_mask * (~is_truncated).unsqueeze(1).int()
    assert torch.equal(heed_mask, completion_mask.bool())
    assert 0 < int(is_truncated.sum()) < len(completion_ids_list)  # both kinds occurred
