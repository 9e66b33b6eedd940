"""Right-padded reward-model rows without their padding mask (:func:`heed.models.reward.mask_free`).

A causal decoder's real tokens never attend to the padding after them, so the scores (and their
gradients) must be those of the masked forward and of each sequence alone, on every decoder family
(sliding windows shorter than the rows, ALiBi, learned positions); encoders, and a decoder whose
forward reads the mask for more than attention, must keep the mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from archs import WINDOW, causal_model_dir, encoder_model_dir
from heed.models.reward import build_reward_model, forward_rewards, mask_free, pad_right

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mask-free")


def rows(vocab: int, pad: int) -> list[list[int]]:
    """Five rows of 3 to 14 tokens (longer than the 8-token windows); one ends in pad tokens, which are
    part of it (pad = EOS in many tokenizers) and scored before, as transformers does."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for n in (14, 3, 9, 12, 6):
        out.append(
            [t if t != pad else pad + 1 for t in torch.randint(2, vocab, (n,), generator=gen).tolist()]
        )
    out[2] = out[2] + [pad, pad]
    return out


def grads(model: Any) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2", "gpt2", "bloom", "opt"])
def test_unmasked_scores_and_gradients_equal_the_masked_forward(name: str, root: Path) -> None:
    model, tok, _ = build_reward_model(causal_model_dir(name, root))
    model.eval()
    seqs = rows(model.config.vocab_size, tok.pad_token_id)
    assert max(len(s) for s in seqs) > WINDOW
    ids, att = pad_right(seqs, tok.pad_token_id)
    assert mask_free(model)

    results = {}
    for unmasked in (True, False):
        model.zero_grad()
        scores = forward_rewards(model, ids, att, unmasked=unmasked)
        (scores * torch.arange(1.0, 6.0)).sum().backward()
        results[unmasked] = scores.detach(), grads(model)
    model.zero_grad()
    default = forward_rewards(model, ids, att).detach()
    alone = torch.stack(
        [model(input_ids=torch.tensor([s]), use_cache=False).logits[0, 0].float() for s in seqs]
    ).detach()
    assert torch.allclose(results[True][0], results[False][0], atol=TOL)
    assert torch.allclose(results[True][1], results[False][1], atol=TOL)
    assert torch.allclose(default, alone, atol=TOL)
    assert results[True][0].std() > 1e-3  # real, distinct scores


def test_encoders_keep_the_mask(root: Path) -> None:
    model, tok, _ = build_reward_model(encoder_model_dir("bert", root))
    assert not mask_free(model)
    seqs = rows(model.config.vocab_size, tok.pad_token_id)
    ids, att = pad_right(seqs, tok.pad_token_id)
    # the mask matters here: without it the padding changes the scores
    assert not torch.allclose(
        forward_rewards(model.eval(), ids, att, unmasked=True),
        forward_rewards(model, ids, att),
        rtol=0,
        atol=1e-6,
    )


def test_a_decoder_that_reads_the_mask_beyond_attention_keeps_it(root: Path) -> None:
    """A reward model that pools at the last position the mask marks (not at the last non-pad token):
    the probe sees its scores change without the mask and keeps it."""
    path = causal_model_dir("llama", root)
    base, tok, _ = build_reward_model(path)
    cls = type(base)

    class MaskPooled(cls):  # type: ignore[misc, valid-type]
        def forward(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            last = attention_mask.sum(-1) - 1
            out.logits = self.score(hidden[torch.arange(len(last)), last])
            return out

    model = MaskPooled(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    assert not mask_free(model)
    seqs = rows(model.config.vocab_size, tok.pad_token_id)
    ids, att = pad_right(seqs, tok.pad_token_id)
    assert torch.allclose(forward_rewards(model, ids, att), forward_rewards(model, ids, att, unmasked=False))


# --- the policy's forward: right-padded rows (SFT, KTO) without the padding mask --------------------


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "bloom", "opt", "qwen3_moe"])
def test_right_padded_log_probs_run_unmasked_and_equal_the_masked_forward(name: str) -> None:
    from archs import build_causal, micro_tokenizer
    from heed.models.lm import disable_dropout, forward_support, sequence_logprobs, trunk

    tok = micro_tokenizer()
    model = build_causal(name, tok).train()  # training mode, as the trainers run it, without dropout
    disable_dropout(model)
    assert forward_support(model).needs_mask is None
    seqs = rows(model.config.vocab_size, tok.pad_token_id)
    ids, att = pad_right(seqs, tok.pad_token_id)
    target = att.bool().clone()
    target[:, 0] = False
    seen: list[Any] = []
    hook = trunk(model).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    out = {}
    for free in (True, False):
        model.zero_grad()
        lp = (
            sequence_logprobs(model, ids, att, target)[0]
            if free
            else _masked_logprobs(model, ids, att, target)
        )
        (lp * torch.linspace(0.5, 1.5, lp.numel()).view_as(lp)).sum().backward()
        out[free] = lp.detach(), grads(model)
    hook.remove()
    assert seen[0] is None and seen[1] is not None  # the unmasked forward really ran without a mask
    assert torch.allclose(out[True][0], out[False][0], atol=TOL)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-4)
    assert (out[True][0] != 0).sum() == target.sum()


def _masked_logprobs(model: Any, ids: torch.Tensor, att: torch.Tensor, target: torch.Tensor) -> Any:
    from heed.models.lm import _features, logprobs_from_hidden, position_ids_from_mask

    hidden = _features(model, ids, att, position_ids_from_mask(att))
    return logprobs_from_hidden(model, hidden, ids, target, 1.0, False)[0]


def test_a_model_whose_tokens_see_later_ones_keeps_the_mask() -> None:
    """A causal-LM class whose forward, given no mask, lets each token read the whole row: the probe
    finds real tokens changed by the padding and keeps the mask; log-probs still match each row alone."""
    from transformers import LlamaForCausalLM

    from archs import build_causal, micro_tokenizer
    from heed.models.lm import forward_support, sequence_logprobs

    class Peeking(LlamaForCausalLM):
        def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if attention_mask is None:  # every position reads the mean id of the whole row
                out.logits = out.logits + 0.01 * input_ids.float().mean(-1)[:, None, None]
            return out

    tok = micro_tokenizer()
    base = build_causal("llama", tok)
    model = Peeking(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    assert "see the padding" in forward_support(model).needs_mask
    seqs = rows(model.config.vocab_size, tok.pad_token_id)
    ids, att = pad_right(seqs, tok.pad_token_id)
    target = att.bool().clone()
    target[:, 0] = False
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, ids, att, target)
        for r, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long))
            ref = alone.logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(s[1:])[:, None])[:, 0]
            assert torch.allclose(lp[r, 1 : len(s)], ref, atol=TOL)
