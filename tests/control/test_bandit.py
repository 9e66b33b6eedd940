"""The bandit classifier: the annotator's verdicts, and accuracy rising from feedback alone."""

from __future__ import annotations

import json

import torch

from heed.control.bandit import SimulatedAnnotator, train_bandit
from heed.control.config import BanditConfig
from heed.demo.classifier import bandit_tone_data
from heed.report.metrics import read_metrics


def test_annotator_approves_correct_labels_and_flips_at_the_noise_rate() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(20_000, dtype=torch.long)
    preds = torch.cat([torch.zeros(10_000, dtype=torch.long), torch.ones(10_000, dtype=torch.long)])
    assert SimulatedAnnotator(0.0).feedback(preds, labels, gen).tolist() == [1.0] * 10_000 + [-1.0] * 10_000
    verdicts = SimulatedAnnotator(0.2).feedback(preds, labels, gen)
    # correct labels are approved 80% of the time, wrong ones 20% of the time
    assert abs((verdicts[:10_000] > 0).float().mean().item() - 0.8) < 0.02
    assert abs((verdicts[10_000:] > 0).float().mean().item() - 0.2) < 0.02


def test_bandit_classifier_accuracy_rises_from_a_weak_start(tmp_path) -> None:
    cfg = BanditConfig(
        out=str(tmp_path / "b"),
        num_texts=400,
        vocab_size=320,
        max_length=32,
        steps=20,
        batch_size=32,
        eval_every=10,
        progress=False,
        threads=1,
    )
    summary = train_bandit(cfg, bandit_tone_data(cfg.num_texts, cfg.eval_fraction, cfg.seed))
    # The weak start is well below the tuned classifier; 20 rounds of noisy approvals lift
    # held-out accuracy (three tones, chance is 1/3) by a wide margin.
    assert summary["start_accuracy"] < 0.75
    assert summary["accuracy_gain"] >= 0.15, summary
    rows = read_metrics(tmp_path / "b")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 20
    for key in ("approval_rate", "kl_to_start", "approx_kl", "clipfrac", "entropy", "reward_mean"):
        assert key in train_rows[0]
    assert (tmp_path / "b" / "final" / "config.json").is_file()
    assert (
        json.loads((tmp_path / "b" / "summary.json").read_text())["final_accuracy"]
        == summary["final_accuracy"]
    )
