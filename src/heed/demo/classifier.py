"""The optimism task's reward: a two-label tone classifier (NEGATIVE / POSITIVE) trained on the
built-in corpus's hidden tone labels, saved so ``transformers.pipeline("text-classification",
model=DIR)`` loads it (as the sentiment classifier of the classic RLHF sentiment example).

Labels: a response's ``tone`` is positive -> POSITIVE (1); negative or neutral -> NEGATIVE (0),
so POSITIVE means "upbeat" and the classifier's positive rate measures optimism. Built once and
cached like :func:`heed.demo.assets.builtin_sft_model`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from heed.control.bandit import TONES, LabelledTexts
from heed.demo.assets import cached_build, spec_key
from heed.demo.corpus import make_corpus

ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}


@dataclass(frozen=True)
class ClassifierSpec:
    """Settings of the built-in tone classifier."""

    size: str = "micro"
    n_records: int = 2000
    seed: int = 0
    vocab_size: int = 2048
    epochs: float = 1.0
    lr: float = 2e-3
    batch_size: int = 32
    max_length: int = 96

    def key(self) -> str:
        return spec_key(self)


def tone_examples(n: int, seed: int) -> list[tuple[str, int]]:
    """(response, label) pairs: 1 for a positive tone, 0 for neutral or negative."""
    return [(r.response, int(r.tone == "positive")) for r in make_corpus(n, seed=seed)]


def bandit_tone_data(num_texts: int, eval_fraction: float, seed: int) -> LabelledTexts:
    """Answers of the built-in corpus and their hidden tones, for ``heed control bandit``: the
    held-out share (``eval_fraction`` of ``num_texts``) answers the corpus's held-out prompts."""
    n_eval = max(1, int(num_texts * eval_fraction))
    train = make_corpus(num_texts - n_eval, seed=seed)
    held = make_corpus(n_eval, seed=seed, heldout=True)
    return LabelledTexts(
        [r.response for r in train],
        [TONES.index(r.tone) for r in train],
        [r.response for r in held],
        [TONES.index(r.tone) for r in held],
    )


def build_tone_classifier(out_dir: str | Path, spec: ClassifierSpec = ClassifierSpec()) -> dict[str, Any]:
    """Train the classifier into ``out_dir`` (model + tokenizer); returns held-out accuracy and paths."""
    import torch
    from transformers import BertForSequenceClassification

    from heed.models.loading import save_pretrained
    from heed.models.tiny import tiny_encoder_config, train_tokenizer

    torch.manual_seed(spec.seed)
    train = tone_examples(spec.n_records, spec.seed)
    held = tone_examples(400, spec.seed + 1)
    tok = train_tokenizer([t for t, _ in train], vocab_size=spec.vocab_size)
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.model_max_length = spec.max_length
    config = tiny_encoder_config(tok, size=spec.size, num_labels=2)
    config.id2label = dict(ID2LABEL)
    config.label2id = {v: k for k, v in ID2LABEL.items()}
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    rng = random.Random(spec.seed)
    steps = int(spec.epochs * len(train) / spec.batch_size)
    model.train()
    for step in range(steps):
        batch = rng.sample(train, spec.batch_size)
        enc = tok(
            [t for t, _ in batch],
            padding=True,
            truncation=True,
            max_length=spec.max_length,
            return_tensors="pt",
        )
        labels = torch.tensor([y for _, y in batch])
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:  # linear decay to 10%
            g["lr"] = spec.lr * (1 - 0.9 * step / max(1, steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(held), 100):
            part = held[s : s + 100]
            enc = tok(
                [t for t, _ in part],
                padding=True,
                truncation=True,
                max_length=spec.max_length,
                return_tensors="pt",
            )
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in part])).sum())
    out = Path(out_dir)
    save_pretrained(model, tok, out)
    info = {"accuracy": correct / len(held), "steps": steps, "spec": asdict(spec)}
    (out / "heed_classifier.json").write_text(json.dumps(info, indent=2))
    return {"path": out, **info}


def builtin_tone_classifier(spec: ClassifierSpec = ClassifierSpec(), root: str | Path | None = None) -> Path:
    """Folder of the built-in tone classifier, built once (about half a minute) and cached."""
    return cached_build(
        f"tone-classifier-{spec.key()}", "config.json", lambda tmp: build_tone_classifier(tmp, spec), root
    )
