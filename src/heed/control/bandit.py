"""A classifier as the policy: PPO on a text classifier from feedback on its predictions.

The sentiment-classifier example of RLHF write-ups, as a contextual bandit: the context is a text,
the action is a label drawn from the classifier ``pi(a|x) = softmax(f(x))``, and the reward is a
simulated annotator's approval of that label (+1 approve, -1 reject; the annotator approves
correct labels and rejects wrong ones, each verdict flipped with probability ``noise``). The
true label is never shown to the learner. A KL penalty to the starting classifier is folded into
the reward (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593):

    r(x, a) = approval(x, a) − β · (log pi(a|x) − log pi_ref(a|x))

and the classifier is updated with the same clipped surrogate as the LM and control trainers
(:func:`heed.algos.policy_loss`), on whitened rewards (a one-step episode: the advantage is the
reward minus the batch mean, scaled by the batch std).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from heed.algos import aggregate, kl_penalized_rewards, policy_loss, whiten
from heed.config import save_config
from heed.control.config import BanditConfig
from heed.report.metrics import MetricsLogger
from heed.report.progress import StepProgress

TONES = ("positive", "neutral", "negative")  # label ids (the built-in corpus names its tones so too)


@dataclass(frozen=True)
class SimulatedAnnotator:
    """Approves a predicted label when it is the true one, rejects it otherwise; each verdict is
    flipped with probability ``noise`` (a careless or disagreeing annotator)."""

    noise: float
    seed: int = 0

    def feedback(
        self, predictions: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """+1 (approve) / −1 (reject) per prediction: shape ``(B,)`` from ``(B,)`` and ``(B,)``."""
        correct = predictions == labels
        flip = torch.rand(predictions.shape, generator=generator) < self.noise
        return torch.where(correct ^ flip, 1.0, -1.0)


@dataclass
class Encoded:
    """Token ids and attention mask of a list of texts, ``(N, L)`` each, with labels ``(N,)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.attention_mask[idx], self.labels[idx]


def encode(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> Encoded:
    """Tokenise ``texts`` (padded to the longest, truncated to ``max_length``)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(batch["input_ids"], batch["attention_mask"], torch.tensor(labels, dtype=torch.long))


def build_classifier(cfg: BanditConfig, tokenizer: Any, num_labels: int) -> torch.nn.Module:
    """A tiny BERT-style ``AutoModelForSequenceClassification`` built from a config (no hub download)."""
    from transformers import AutoModelForSequenceClassification

    from heed.models.tiny import tiny_encoder_config

    config = tiny_encoder_config(
        tokenizer,
        size=cfg.model_size,
        num_labels=num_labels,
        id2label=dict(enumerate(TONES)),
        label2id={t: i for i, t in enumerate(TONES)},
    )
    return AutoModelForSequenceClassification.from_config(config)


def label_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """``log pi(. | x)``: ``(B, L)`` ids -> ``(B, num_labels)`` log-probabilities."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Encoded, batch_size: int = 256) -> float:
    """Share of texts whose most likely label is the true one."""
    model.eval()
    hits = 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        ids, mask, labels = data.take(idx)
        hits += int((label_logprobs(model, ids, mask).argmax(-1) == labels).sum())
    return hits / max(len(data), 1)


def warm_start(
    model: torch.nn.Module, data: Encoded, steps: int, lr: float, generator: torch.Generator
) -> None:
    """A weak supervised start: a few cross-entropy steps on a handful of labelled texts."""
    if steps == 0 or len(data) == 0:
        return
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(data), generator=generator)[: min(16, len(data))]
        ids, mask, labels = data.take(idx)
        logp = label_logprobs(model, ids, mask)
        loss = -logp.gather(-1, labels[:, None]).squeeze(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@dataclass(frozen=True)
class LabelledTexts:
    """Texts and their true labels (indices into :data:`TONES`): a train split and a held-out one.
    The command line passes the built-in corpus's answers and hidden tones (:mod:`heed.demo.classifier`)."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]


def train_bandit(cfg: BanditConfig, data: LabelledTexts) -> dict[str, Any]:
    """Tune a weak classifier with PPO from simulated approvals on ``data``'s labels; returns the
    summary (also ``summary.json``). Runs with ``cfg.threads`` torch threads and restores the
    caller's setting afterwards."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_bandit(cfg, data)
    finally:
        torch.set_num_threads(previous_threads)


def _train_bandit(cfg: BanditConfig, data: LabelledTexts) -> dict[str, Any]:
    # step 1. seeds, run folder, data split, tokenizer
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    train_texts, train_labels, eval_texts, eval_labels = (
        data.train_texts,
        data.train_labels,
        data.eval_texts,
        data.eval_labels,
    )
    from heed.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    train_set = encode(tokenizer, train_texts, train_labels, cfg.max_length)
    eval_set = encode(tokenizer, eval_texts, eval_labels, cfg.max_length)

    # step 2. the weak starting classifier, frozen copy as the KL reference
    model = build_classifier(cfg, tokenizer, num_labels=len(TONES))
    labelled = torch.arange(min(cfg.warm_start_examples, len(train_set)))
    warm_start(model, Encoded(*train_set.take(labelled)), cfg.warm_start_steps, cfg.warm_start_lr, gen)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    start_acc = accuracy(model, eval_set)

    annotator = SimulatedAnnotator(cfg.annotator_noise, cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
    logger = MetricsLogger(run_dir)
    logger.log(0, {"accuracy": start_acc}, split="eval")
    history = [(0, start_acc)]
    t0 = time.time()
    with StepProgress("bandit", total=cfg.steps, enabled=cfg.progress) as bar:
        for step in range(1, cfg.steps + 1):
            # step 3. the classifier labels a batch of texts (sampling its policy)
            idx = torch.randint(len(train_set), (cfg.batch_size,), generator=gen)
            ids, mask, true_labels = train_set.take(idx)
            model.eval()
            with torch.no_grad():
                logp_all = label_logprobs(model, ids, mask)  # (B, K)
                actions = torch.multinomial(logp_all.exp(), 1, generator=gen).squeeze(-1)  # (B,)
                old_logprobs = logp_all.gather(-1, actions[:, None])  # (B, 1): one "token" per episode
                ref_logprobs = label_logprobs(ref_model, ids, mask).gather(-1, actions[:, None])

            # step 4. feedback on the predictions, KL penalty to the start, advantages
            approvals = annotator.feedback(actions, true_labels, gen)  # (B,)
            one = torch.ones_like(old_logprobs, dtype=torch.bool)
            rewards, kl = kl_penalized_rewards(approvals, old_logprobs, ref_logprobs, one, cfg.kl_coef)
            advantages = whiten(rewards)  # (B, 1)

            # step 5. PPO epochs over minibatches
            model.train()
            pstats, ents = [], []
            for _ in range(cfg.update_epochs):
                for mb in torch.randperm(cfg.batch_size, generator=gen).chunk(cfg.num_minibatches):
                    logp_all_new = label_logprobs(model, ids[mb], mask[mb])  # (b, K)
                    logprobs = logp_all_new.gather(-1, actions[mb, None])  # (b, 1)
                    entropy = -(logp_all_new.exp() * logp_all_new).sum(-1, keepdim=True)  # (b, 1)
                    pg, stats = policy_loss(logprobs, old_logprobs[mb], advantages[mb], clip_eps=cfg.clip_eps)
                    ent = aggregate(entropy, None)
                    loss = aggregate(pg, None) - cfg.ent_coef * ent
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    pstats.append(stats)
                    ents.append(ent.item())

            # step 6. log; held-out accuracy now and then
            metrics = {
                "approval_rate": float((approvals > 0).float().mean()),
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                "kl_to_start": float(kl.mean()),
                "train_accuracy": float((actions == true_labels).float().mean()),
                "entropy": float(np.mean(ents)),
                "approx_kl": float(np.mean([float(s.approx_kl_k3) for s in pstats])),
                "approx_kl_k1": float(np.mean([float(s.approx_kl_k1) for s in pstats])),
                "clipfrac": float(np.mean([float(s.clipfrac) for s in pstats])),
            }
            logger.log(step, metrics)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                acc = accuracy(model, eval_set)
                history.append((step, acc))
                logger.log(step, {"accuracy": acc}, split="eval")
            bar.advance(1, {"acc": history[-1][1], "approve": metrics["approval_rate"]})

    # step 7. save the tuned classifier (plain transformers format) and the summary
    final = run_dir / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    end_acc = history[-1][1]
    summary = {
        "start_accuracy": start_acc,
        "final_accuracy": end_acc,
        "accuracy_gain": end_acc - start_acc,
        "eval_texts": len(eval_set),
        "train_texts": len(train_set),
        "annotator_noise": cfg.annotator_noise,
        "kl_to_start": metrics["kl_to_start"],
        "train_time_s": round(time.time() - t0, 2),
    }
    logger.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
