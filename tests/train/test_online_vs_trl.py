"""Heed's online-DPO loss against TRL 1.16's ``OnlineDPOTrainer`` on random inputs (within 1e-6).

TRL computes the online-DPO loss inline in ``OnlineDPOTrainer.training_step``
(trl/experimental/online_dpo/online_dpo_trainer.py), so that method itself is called, unbound, on a
minimal stand-in for the trainer: its generation (``_generate``) and reward functions
(``_calculate_rewards_from_functions``) are replaced by fixed random prompts, answers and scores, and
its accelerator by a plain ``backward``; TRL's own ``_forward`` computes the log-probs of a real model
(the built-in micro SFT model, in float64). Everything from the log-probs to ``backward`` (pairing by
reward, masking, summing, the loss, its mean) is TRL's code.

Heed's side is the trainer's own path: :func:`heed.rewards.select.label_pairs` pairs the answers,
:func:`heed.train.reference.reference_table` gives the reference log-probs, and
:func:`heed.train.online_dpo.pair_losses` the per-pair loss (prompt shared with a block mask), averaged
over the pairs as the online step does. Loss and gradients must agree.

Scope: the sigmoid loss (DPO). TRL's online IPO takes summed log-ratios, Heed's IPO (online and
offline, as TRL's offline ``DPOTrainer``) length-averaged ones, so the two IPO losses differ by design
except on equal-length answers; the last test pins that formula relation instead.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from heed.config import config_from_dict
from heed.config.online import OnlineDPOConfig
from heed.data.pairs import EncodedPairs, PreferencePair
from heed.models.lm import disable_dropout
from heed.models.loading import load_causal_lm, load_tokenizer
from heed.rewards.select import label_pairs
from heed.train.online_dpo import pair_losses
from heed.train.reference import reference_table

pytestmark = pytest.mark.usefixtures("one_thread")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_online = pytest.importorskip("trl.experimental.online_dpo")


def _models(path: Path) -> tuple[Any, Any, Any]:
    """Reference (the micro SFT model) and a policy whose weights were moved, both float64, no dropout."""
    tok = load_tokenizer(path, padding_side="left")
    ref = load_causal_lm(path).double().eval()
    disable_dropout(ref)
    policy = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    ref.requires_grad_(False)
    return tok, policy, ref


def _random_batch(tok: Any, b: int, seed: int) -> dict[str, Any]:
    """``b`` prompts of one length (no left padding) and two right-padded answers each, TRL's layout:
    rows 0..b-1 answer 0 of every prompt, rows b..2b-1 answer 1; random rewards in the same order."""
    gen = torch.Generator().manual_seed(seed)
    low, high = 8, len(tok)  # ordinary tokens, away from the special ones
    prompt_len, max_len = 6, 9
    prompt_ids = torch.randint(low, high, (b, prompt_len), generator=gen)
    lengths = torch.randint(2, max_len + 1, (2 * b,), generator=gen)
    completion_ids = torch.full((2 * b, max_len), tok.pad_token_id)
    completion_mask = torch.zeros(2 * b, max_len, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        completion_ids[row, :n] = torch.randint(low, high, (n,), generator=gen)
        completion_mask[row, :n] = 1
    return {
        "prompt_ids": torch.cat([prompt_ids, prompt_ids]),
        "prompt_mask": torch.ones(2 * b, prompt_len, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "rewards": torch.randn(2 * b, generator=gen, dtype=torch.float64),
        "prompts": [f"prompt {i}" for i in range(b)],
    }


def _trl_loss(policy: Any, ref: Any, tok: Any, batch: dict[str, Any], beta: float) -> torch.Tensor:
    """TRL's ``OnlineDPOTrainer.training_step`` on ``batch`` (its backward fills ``policy``'s grads)."""
    trainer_cls = trl_online.OnlineDPOTrainer
    args = SimpleNamespace(
        use_vllm=False,
        missing_eos_penalty=None,
        loss_type="sigmoid",
        torch_empty_cache_steps=None,
        optim="adamw_torch",
        n_gpu=1,
        gradient_accumulation_steps=1,
    )
    trainer = SimpleNamespace(
        args=args,
        beta=beta,
        max_length=10_000,
        eos_token_ids=[tok.eos_token_id],
        ref_model=ref,
        processing_class=tok,
        reward_funcs=[None],  # rewards come from _calculate_rewards_from_functions below
        stats=defaultdict(list),
        state=SimpleNamespace(global_step=1),
        accelerator=SimpleNamespace(
            backward=lambda loss, **kw: loss.backward(), gather_for_metrics=lambda x: x
        ),
        _generate=lambda model, prompts, images=None: (
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"],
            batch["completion_mask"],
            None,
        ),
        _calculate_rewards_from_functions=lambda **kw: batch["rewards"].clone(),
    )
    trainer._forward = partial(trainer_cls._forward, trainer)
    loss = trainer_cls.training_step(trainer, policy, {"prompt": batch["prompts"]})
    policy.eval()  # training_step put it in train mode; dropout is off either way
    return loss


def _heed_loss(policy: Any, ref: Any, tok: Any, batch: dict[str, Any], beta: float) -> torch.Tensor:
    """Heed's online step on the same answers: best-vs-worst labels (k = 2), reference table, pair loss."""
    b = len(batch["prompts"])
    r = batch["rewards"].tolist()
    scores = [s for i in range(b) for s in (r[i], r[b + i])]  # prompt-major, as the engine returns them

    def sequence(trl_row: int) -> tuple[list[int], list[bool]]:
        p = batch["prompt_ids"][trl_row].tolist()
        n = int(batch["completion_mask"][trl_row].sum())
        c = batch["completion_ids"][trl_row, :n].tolist()
        return p + c, [False] * len(p) + [True] * n

    labels = label_pairs(scores)
    assert len(labels) == b  # random float rewards: no ties

    def trl_row(heed_row: int) -> int:
        i, j = divmod(heed_row, 2)
        return i + j * b

    chosen = [sequence(trl_row(c)) for c in labels.chosen]
    rejected = [sequence(trl_row(x)) for x in labels.rejected]
    pairs = [PreferencePair(batch["prompts"][i], "", "", 1.0, "") for i in labels.prompts]
    data = EncodedPairs(pairs, chosen, rejected, [1.0] * b)
    table = reference_table(ref, data, tok.pad_token_id, b).double()
    cfg = config_from_dict(
        OnlineDPOConfig,
        {
            "model": {"path": "unused"},
            "data": {"prompts": "unused.jsonl"},
            "rewards": [{"function": "unused:fn"}],
            "loss": {"type": "sigmoid", "beta": beta},
        },
    )
    losses, _ = pair_losses(policy, data, list(range(b)), table, cfg, tok.pad_token_id)
    loss = losses.sum() / b  # the online step: every pair counts equally
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(("beta", "seed"), [(0.1, 0), (0.5, 1)])
def test_online_dpo_loss_and_gradient_match_trl(micro_sft_model: Path, beta: float, seed: int) -> None:
    tok, policy, ref = _models(micro_sft_model)
    batch = _random_batch(tok, 6, seed)

    trl_loss = _trl_loss(policy, ref, tok, batch, beta)
    trl_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    heed_loss = _heed_loss(policy, ref, tok, batch, beta)
    heed_grads = [p.grad for p in policy.parameters()]

    assert abs(float(trl_loss) - float(torch.log(torch.tensor(2.0)))) > 1e-3  # policy ≠ reference
    assert torch.allclose(heed_loss, trl_loss, atol=1e-6, rtol=0)
    worst = max(float((h - t).abs().max()) for h, t in zip(heed_grads, trl_grads, strict=True))
    assert worst < 1e-6
    assert max(float(t.abs().max()) for t in trl_grads) > 1e-4  # the gradients compared are not all zero


def test_ipo_formula_matches_trl_online_on_summed_log_ratios() -> None:
    # TRL's online IPO: (logits - 1/(2β))² with logits = summed policy minus summed reference
    # log-ratios (training_step, loss_type "ipo"). Heed's dpo_loss(type="ipo") is that formula on
    # whatever log-probs it is given; Heed's trainers give it length-averaged ones.
    from heed.algos.losses import dpo_loss

    gen = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (torch.randn(16, generator=gen, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.2
    logits = (pc - pr) - (rc - rr)
    trl = (logits - 1 / (2 * beta)) ** 2
    heed = dpo_loss(pc, pr, rc, rr, beta, "ipo")[0]
    assert torch.allclose(heed, trl, atol=1e-6, rtol=0)
