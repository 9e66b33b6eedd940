"""A reward model scoring a group's responses with their shared prompt run once
(:func:`heed.models.reward.shared_prefix_rewards`) gives each sequence's own score, as a plain
``transformers`` forward of that sequence alone gives it, on several architectures (sliding windows
shorter than the sequences included), gradients included; Bloom (ALiBi) cannot take a block mask,
so the probe sends it down the padded path, with the same scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from archs import WINDOW, causal_model_dir
from heed.models.reward import build_reward_model, can_share_prefix, shared_prefix_rewards

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
# three groups: prompts of 5, 11 and 3 tokens, then K = 3, 2, 3 responses of 2 to 13 tokens
PROMPTS = [5, 11, 3]
ANSWERS = [[6, 13, 2], [9, 4], [12, 5, 8]]


def _groups(vocab: int, pad: int) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(3)

    def draw(n: int) -> list[int]:
        return [t if t != pad else pad + 1 for t in torch.randint(2, vocab, (n,), generator=gen).tolist()]

    out = []
    for p, lens in zip(PROMPTS, ANSWERS, strict=True):
        prompt = draw(p)
        out.append([prompt + draw(n) for n in lens])
    # a response ending in pad tokens (pad = EOS in many tokenizers): scored before them, as transformers does
    out[1][1] = out[1][1] + [pad, pad]
    return out


def _alone(model: Any, seq: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, 0].float()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-rm")


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gemma2", "gpt2", "bloom"])
def test_shared_prompt_scores_equal_each_sequence_alone(name: str, root: Path) -> None:
    model, tok, _ = build_reward_model(causal_model_dir(name, root))
    model.eval()
    groups = _groups(model.config.vocab_size, tok.pad_token_id)
    assert max(len(s) for g in groups for s in g) > WINDOW  # the sliding window matters
    assert can_share_prefix(model) == (name != "bloom")  # ALiBi: no block mask, padded rows instead
    shared = shared_prefix_rewards(model, groups, tok.pad_token_id, "cpu")
    alone = torch.stack([_alone(model, s) for g in groups for s in g])
    assert shared.shape == (8,)
    assert torch.allclose(shared, alone, atol=TOL, rtol=0), (shared - alone).abs().max()
    # the gradient of the scores' weighted sum is the same as the one of each sequence alone
    w = torch.linspace(-1.0, 2.0, 8)
    model.zero_grad()
    (w * shared_prefix_rewards(model, groups, tok.pad_token_id, "cpu")).sum().backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    (w * torch.stack([_alone(model, s) for g in groups for s in g])).sum().backward()
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    scale = max(float(g.abs().max()) for g in want)
    assert len(got) == len(want)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)) <= TOL * scale


def test_the_shared_path_packs_fewer_tokens_than_padding() -> None:
    """What the shared layout saves: a group of K responses costs prompt + sum of answers, padded
    rows K x (prompt + longest answer)."""
    from heed.models.reward import _common_prefix

    groups = _groups(500, 0)
    shared = max(_common_prefix(g) + sum(len(s) - _common_prefix(g) for s in g) for g in groups) * len(groups)
    padded = sum(len(g) for g in groups) * max(len(s) for g in groups for s in g)
    assert [_common_prefix(g) for g in groups] == PROMPTS
    assert shared < padded
