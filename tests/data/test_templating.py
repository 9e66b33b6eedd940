"""Chat templating and loss masks: the loss falls on assistant turns only."""

from __future__ import annotations

from pathlib import Path

from heed.data.records import SFTExample
from heed.data.templating import encode_chat, encode_sft, render_prompt
from heed.models.loading import load_tokenizer


def test_multi_turn_mask_covers_assistant_turns_only(micro_sft_model: Path) -> None:
    tok = load_tokenizer(micro_sft_model)
    msgs = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Tell me about tea."},
        {"role": "assistant", "content": "Tea is lovely."},
        {"role": "user", "content": "And coffee?"},
        {"role": "assistant", "content": "Coffee is fine."},
    ]
    ids, mask = encode_chat(tok, msgs, "x")
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    # each assistant turn's content and its end-of-turn marker, nothing from the user or system
    assert trained == "Tea is lovely.<|end|>\nCoffee is fine.<|end|>\n"


def test_prompt_completion_with_and_without_chat(micro_sft_model: Path) -> None:
    tok = load_tokenizer(micro_sft_model)
    ex = SFTExample(prompt="Q?", completion="A.")
    ids, mask = encode_sft(tok, ex, chat=False)
    assert tok.decode(ids) == "Q?A.<|end|>"
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "A.<|end|>"
    ids, mask = encode_sft(tok, ex, chat=True)
    assert tok.decode(ids) == "<|user|>\nQ?<|end|>\n<|assistant|>\nA.<|end|>\n"
    assert render_prompt(tok, "Q?", chat=True) == "<|user|>\nQ?<|end|>\n<|assistant|>\n"
    assert render_prompt(tok, "Q?", chat=False) == "Q?"
