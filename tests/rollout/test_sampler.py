"""Heed's sampling loop against transformers' generate, and the policy forward against full logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from heed.models.forward import policy_forward
from heed.models.loading import load_causal_lm, load_tokenizer
from heed.models.value import ValueHead
from heed.rollout.batch import rollout_from_generation
from heed.rollout.generate import SamplingParams, encode_prompts, generate
from heed.rollout.sampler import keyed_uniforms, row_keys, sample_next

PROMPTS = ["What do you think about chess?", "Tell me something about the ocean.", "Is tea worth my time?"]


pytestmark = pytest.mark.usefixtures("one_thread")


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
    draws = torch.stack([sample_next(logits, 1.0, 2, 1.0, True)[0] for _ in range(200)])
    assert set(draws.flatten().tolist()) <= {0, 1}  # top-2 only
    # top_p = 0.7: token 0 (mass before it 0) and token 1 (mass before it 0.5 < 0.7) stay; token 2 (0.8) goes
    draws = torch.stack([sample_next(logits, 1.0, 0, 0.7, True)[0] for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}
    assert sample_next(logits, 1.0, 0, 1.0, False)[0].item() == 0


def test_inverse_cdf_draw_and_log_prob() -> None:
    # p = (0.5, 0.3, 0.15, 0.05): CDF (0.5, 0.8, 0.95, 1.0); u falls in [0, .5) -> 0, [.5, .8) -> 1, ...
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4, 1)
    u = torch.tensor([0.1, 0.6, 0.85, 0.97], dtype=torch.float64)
    tok, lp = sample_next(logits, 1.0, 0, 1.0, True, u)
    assert tok.tolist() == [0, 1, 2, 3]
    assert torch.allclose(lp, torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), atol=1e-6)
    # top-k 2 renormalises to (0.625, 0.375): u = 0.6 -> token 0, u = 0.97 -> token 1; the log-prob stays
    # the untruncated policy's, log 0.3 for token 1
    tok, lp = sample_next(logits, 1.0, 2, 1.0, True, u)
    assert tok.tolist() == [0, 0, 1, 1]
    assert abs(lp[3].item() - math.log(0.3)) < 1e-6
    # temperature 2: log-probs of softmax(logits / 2) = sqrt(p) / sum sqrt(p)
    _, lp = sample_next(logits, 2.0, 0, 1.0, True, u)
    sq = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(lp, torch.log(sq / sq.sum()), atol=1e-6)


def test_keyed_uniforms_are_uniform_and_keyed() -> None:
    keys = row_keys(0, list(range(20000)))
    u = keyed_uniforms(keys, 0)
    assert ((u > 0) & (u < 1)).all()
    # 10 equal bins of 2000 expected; a chi-square with 9 d.o.f. above 30 has p < 0.001
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 30, chi2
    assert torch.equal(keyed_uniforms(keys[:5], 3), keyed_uniforms(keys, 3)[:5])  # a function of (key, step)
    assert not torch.equal(keyed_uniforms(keys[:5], 3), keyed_uniforms(keys[:5], 4))
    assert not torch.equal(row_keys(1, [0, 1]), row_keys(0, [0, 1]))


def test_keyed_sampling_does_not_depend_on_batching(micro) -> None:
    model, tok, ids = micro
    params = SamplingParams(max_new_tokens=16)
    keys = row_keys(7, list(range(12)))
    one = generate(model, tok, ids, params, num_samples=4, batch_size=12, engine="heed", keys=keys)
    torch.manual_seed(123)  # the global generator plays no part
    split = generate(model, tok, ids, params, num_samples=4, batch_size=5, engine="heed", keys=keys)
    assert one.texts == split.texts
    assert len(set(one.texts)) > 3  # it does sample
    # a shuffled subset: prompt 2's rows on their own get the same answers
    alone = generate(model, tok, ids[2:], params, num_samples=4, batch_size=3, engine="heed", keys=keys[8:])
    assert alone.texts == one.texts[8:]


def test_engine_log_probs_match_the_policy_forward(micro) -> None:
    model, tok, ids = micro
    for engine in ("heed", "hf"):
        torch.manual_seed(2)
        gen = generate(
            model, tok, ids, SamplingParams(max_new_tokens=12, temperature=0.7), num_samples=2, engine=engine
        )
        ro = rollout_from_generation(gen, torch.zeros(len(gen.texts)))
        with torch.no_grad():
            out = policy_forward(model, ro.input_ids, ro.attention_mask, ro.target_mask, temperature=0.7)
        m = ro.response_mask
        assert gen.logprobs is not None and (gen.logprobs[~m] == 0).all()
        assert torch.allclose(gen.logprobs[m], ro.response(out.logprobs)[m], atol=1e-4), engine


def test_policy_forward_matches_full_log_softmax(micro) -> None:
    model, tok, ids = micro
    torch.manual_seed(1)
    gen = generate(model, tok, ids, SamplingParams(max_new_tokens=12), num_samples=2, engine="heed")
    ro = rollout_from_generation(gen, torch.zeros(len(gen.texts)))
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    with torch.no_grad():
        out = policy_forward(
            model,
            ro.input_ids,
            ro.attention_mask,
            ro.target_mask,
            temperature=0.7,
            value_head=head,
            with_entropy=True,
        )
        from heed.models.lm import position_ids_from_mask

        full = (
            model(
                input_ids=ro.input_ids,
                attention_mask=ro.attention_mask.long(),
                position_ids=position_ids_from_mask(ro.attention_mask),
            ).logits
            / 0.7
        )
        logp = full.log_softmax(-1)[:, :-1].gather(-1, ro.input_ids[:, 1:, None]).squeeze(-1)
        ent = -(full.softmax(-1) * full.log_softmax(-1)).sum(-1)[:, :-1]
    m = ro.target_mask[:, 1:]
    assert torch.allclose(out.logprobs[:, 1:][m], logp[m], atol=1e-4)
    assert torch.allclose(out.entropy[:, 1:][m], ent[m], atol=1e-4)
    assert (
        (out.logprobs[:, 1:][~m] == 0).all() and out.values is not None and (out.values[:, 1:][~m] == 0).all()
    )
    assert out.values[:, 1:][m].abs().sum() > 0


def test_sliding_window_model_greedy_matches_transformers(micro) -> None:
    """A model with sliding-window attention keeps transformers' own cache for its layers: greedy
    answers equal generate's even past the window."""
    from transformers import MistralConfig, MistralForCausalLM

    _, tok, ids = micro
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    params = SamplingParams(max_new_tokens=12, do_sample=False)
    ours = generate(model, tok, ids, params, engine="heed")
    theirs = generate(model, tok, ids, params, engine="hf")
    assert ours.texts == theirs.texts
