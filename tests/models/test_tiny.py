"""The built-in tokenizer and model: Hugging Face format, chat template, exact reloads."""

from __future__ import annotations

from pathlib import Path

import torch

from heed.demo.corpus import make_corpus
from heed.models.tiny import build_model, tiny_llama_config, train_tokenizer


def test_tokenizer_and_model_round_trip_through_auto_classes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recs = make_corpus(300, seed=3)
    tok = train_tokenizer([f"{r.prompt} {r.response}" for r in recs], vocab_size=512)
    model = build_model(tiny_llama_config(tok, size="micro"), seed=1)
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)

    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    text = "Grüße 世界 🍌 — What do you think about tea?"
    ids = tok2(text, add_special_tokens=False)["input_ids"]
    assert tok2.decode(ids) == text  # byte-level BPE: any Unicode round-trips
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert (
        tok2.apply_chat_template(msgs, tokenize=False) == "<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"
    )
    assert tok2.eos_token == "<|end|>" and tok2.pad_token == "<|pad|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, model2(x).logits)
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 1_000_000


def test_tiny_size_has_a_few_million_parameters() -> None:
    recs = make_corpus(300, seed=3)
    tok = train_tokenizer([r.response for r in recs], vocab_size=512)
    model = build_model(tiny_llama_config(tok, size="tiny"))
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 10_000_000
