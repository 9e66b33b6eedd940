"""DPO's and KTO's pair forward (:func:`heed.models.forward.pair_logps`) with each pair's prompt run
once gives the log-probs of the padded rows (each answer after its own copy of the prompt) within
1e-5 on several architectures, sliding windows shorter than the sequences included; Bloom (ALiBi)
cannot take a block mask and falls back to the padded rows, with the same result."""

from __future__ import annotations

import pytest
import torch

from archs import WINDOW, build_causal, micro_tokenizer
from heed.models.forward import can_share_prompt, collate_pairs, pair_logps

pytestmark = pytest.mark.usefixtures("one_thread")

# three pairs: prompts of 4, 10 and 6 tokens, chosen / rejected answers of different lengths
PROMPTS = [4, 10, 6]
ANSWERS = [(7, 12), (3, 9), (11, 2)]


def _pairs(vocab: int) -> tuple[list[tuple[list[int], list[bool]]], list[tuple[list[int], list[bool]]]]:
    gen = torch.Generator().manual_seed(5)
    chosen, rejected = [], []
    for p, (c, r) in zip(PROMPTS, ANSWERS, strict=True):
        prompt = torch.randint(3, vocab, (p,), generator=gen).tolist()
        for n, out in ((c, chosen), (r, rejected)):
            answer = torch.randint(3, vocab, (n,), generator=gen).tolist()
            out.append((prompt + answer, [False] * p + [True] * n))
    return chosen, rejected


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gpt2", "bloom"])
def test_shared_prompt_pairs_equal_padded_rows(name: str) -> None:
    tok = micro_tokenizer()
    model = build_causal(name, tok)
    assert can_share_prompt(model) == (name != "bloom")
    chosen, rejected = _pairs(len(tok))
    assert max(len(ids) for ids, _ in chosen + rejected) > WINDOW
    ids, att, mask = collate_pairs(chosen, rejected, tok.pad_token_id)
    shared = pair_logps(model, ids, att, mask, share=True)
    padded = pair_logps(model, ids, att, mask, share=False)
    torch.testing.assert_close(shared.token_logps, padded.token_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.logps, padded.logps, atol=1e-5, rtol=0)
    assert bool((padded.token_logps[mask] != 0).all()) and bool((shared.token_logps[~mask] == 0).all())
