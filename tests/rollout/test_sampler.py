"""Heed's sampling loop against transformers' generate, and the policy forward against full logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heed.models.loading import load_causal_lm, load_tokenizer
from heed.models.value import ValueHead
from heed.rollout.batch import rollout_from_generation
from heed.rollout.generate import SamplingParams, encode_prompts, generate
from heed.rollout.logprobs import policy_forward
from heed.rollout.sampler import sample_next

PROMPTS = ["What do you think about chess?", "Tell me something about the ocean.", "Is tea worth my time?"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine run many times faster on one intra-op thread
    (two busy processes spinning two OpenMP threads each mostly wait on each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro(micro_sft_model: Path):
    tok = load_tokenizer(micro_sft_model, padding_side="left")
    model = load_causal_lm(micro_sft_model).eval()
    return model, tok, encode_prompts(tok, PROMPTS, chat=True)


def test_greedy_matches_transformers_generate(micro) -> None:
    model, tok, ids = micro
    params = SamplingParams(max_new_tokens=20, do_sample=False)
    ours = generate(model, tok, ids, params, engine="heed")
    theirs = generate(model, tok, ids, params, engine="hf")
    assert ours.texts == theirs.texts
    assert torch.equal(ours.completion_mask, theirs.completion_mask)


def test_sampled_rows_stop_at_eos_and_keep_order(micro) -> None:
    model, tok, ids = micro
    torch.manual_seed(0)
    gen = generate(model, tok, ids, SamplingParams(max_new_tokens=16), num_samples=4, engine="heed")
    assert gen.completion_ids.shape[0] == 12
    eos = tok.eos_token_id
    for row, mask, fin in zip(gen.completion_ids, gen.completion_mask, gen.finished, strict=True):
        toks = row[mask].tolist()
        assert eos not in toks[:-1]  # nothing after the first EOS
        assert fin == (toks[-1] == eos)
    # prompt-major: rows 0-3 answer prompt 0, whose ids end the left-padded prompt block
    n0 = len(ids[0])
    assert gen.prompt_ids[0, -n0:].tolist() == ids[0] and gen.prompt_mask[0].sum() == n0


def test_top_k_and_top_p_filtering() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 2, 1.0, True) for _ in range(200)])
    assert set(draws.flatten().tolist()) <= {0, 1}  # top-2 only
    # top_p = 0.7: token 0 (mass before it 0) and token 1 (mass before it 0.5 < 0.7) stay; token 2 (0.8) goes
    draws = torch.stack([sample_next(logits, 1.0, 0, 0.7, True) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}
    assert sample_next(logits, 1.0, 0, 1.0, False).item() == 0


def test_policy_forward_matches_full_log_softmax(micro) -> None:
    model, tok, ids = micro
    torch.manual_seed(1)
    gen = generate(model, tok, ids, SamplingParams(max_new_tokens=12), num_samples=2, engine="heed")
    ro = rollout_from_generation(gen, torch.zeros(len(gen.texts)))
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    with torch.no_grad():
        out = policy_forward(model, ro.input_ids, ro.attention_mask, ro.target_mask, temperature=0.7,
                             value_head=head, with_entropy=True)
        from heed.models.lm import position_ids_from_mask

        full = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask.long(),
                     position_ids=position_ids_from_mask(ro.attention_mask)).logits / 0.7
        logp = full.log_softmax(-1)[:, :-1].gather(-1, ro.input_ids[:, 1:, None]).squeeze(-1)
        ent = -(full.softmax(-1) * full.log_softmax(-1)).sum(-1)[:, :-1]
    m = ro.target_mask[:, 1:]
    assert torch.allclose(out.logprobs[:, 1:][m], logp[m], atol=1e-4)
    assert torch.allclose(out.entropy[:, 1:][m], ent[m], atol=1e-4)
    assert (out.logprobs[:, 1:][~m] == 0).all() and out.values is not None and (out.values[:, 1:][~m] == 0).all()
    assert out.values[:, 1:][m].abs().sum() > 0
