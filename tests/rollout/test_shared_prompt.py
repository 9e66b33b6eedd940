"""The shared-prompt forward (each prompt once per group of K answers, one packed sequence with a
block mask) gives the per-row forward's log-probs, entropies, values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heed.models.forward import can_share_prompt, policy_forward, shared_prompt_forward, shared_prompt_values
from heed.models.loading import load_causal_lm, load_tokenizer
from heed.models.value import ValueHead
from heed.rollout.batch import rollout_from_generation
from heed.rollout.generate import SamplingParams, encode_prompts, generate

# prompts of different lengths, so groups have different left padding
PROMPTS = ["Is tea worth my time?", "Tell me something about the ocean and the summer camps.", "Chess?"]


@pytest.fixture(scope="module")
def rollout(micro_sft_model: Path):
    torch.set_num_threads(1)
    tok = load_tokenizer(micro_sft_model, padding_side="left")
    model = load_causal_lm(micro_sft_model).eval()
    torch.manual_seed(3)
    gen = generate(
        model,
        tok,
        encode_prompts(tok, PROMPTS, chat=True),
        SamplingParams(max_new_tokens=14),
        num_samples=3,
        engine="heed",
    )
    return model, rollout_from_generation(gen, torch.zeros(len(gen.texts)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_the_per_row_forward(rollout, attn: str) -> None:
    model, ro = rollout
    model.set_attn_implementation(attn)
    assert can_share_prompt(model)
    assert len(set(ro.response_mask.sum(-1).tolist())) > 1  # answers of different lengths inside groups
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    args = (ro.input_ids, ro.attention_mask, ro.target_mask)
    ref = policy_forward(model, *args, temperature=0.8, value_head=head, with_entropy=True)
    shared = shared_prompt_forward(
        model, *args, prompt_width=ro.prompt_width, k=3, temperature=0.8, value_head=head, with_entropy=True
    )
    m = ro.target_mask
    for a, b in ((ref.logprobs, shared.logprobs), (ref.entropy, shared.entropy), (ref.values, shared.values)):
        assert a is not None and b is not None and a.shape == b.shape
        assert torch.allclose(a[m], b[m], atol=1e-5)
        assert (b[~m] == 0).all()
    # the same gradient: d/dθ of Σ log-probs through both paths
    model.zero_grad()
    ref.logprobs.sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared.logprobs.sum().backward()
    for a, p in zip(g_ref, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-4, rtol=1e-3)
    model.zero_grad()
    model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_values_alone_match_the_forward_with_log_probs(rollout) -> None:
    """PPO's old values without the LM head: shared (each prompt once) and row by row, the values of
    the full per-row forward, zero off the targets."""
    model, ro = rollout
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    args = (ro.input_ids, ro.attention_mask, ro.target_mask)
    ref = policy_forward(model, *args, value_head=head).values
    m = ro.target_mask
    for values in (
        shared_prompt_values(model, *args, head, prompt_width=ro.prompt_width, k=3),
        shared_prompt_values(model, *args, head),
    ):
        assert ref is not None and values.shape == ref.shape
        assert torch.allclose(values[m], ref[m], atol=1e-5) and (values[~m] == 0).all()
    with pytest.raises(ValueError, match="whole groups of 2"):
        shared_prompt_values(model, *args, head, prompt_width=ro.prompt_width, k=2)


def test_rows_must_be_whole_groups(rollout) -> None:
    model, ro = rollout
    with pytest.raises(ValueError, match="whole groups of 2"):
        shared_prompt_forward(model, ro.input_ids, ro.attention_mask, ro.target_mask, ro.prompt_width, k=2)
