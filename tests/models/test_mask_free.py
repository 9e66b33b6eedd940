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
