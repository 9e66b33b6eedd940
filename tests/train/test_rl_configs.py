"""The shipped RL configs validate, and the optimism classifier loads as a transformers pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from heed.config import load_config
from heed.config.rl import RLConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["banana.yaml", "optimism.yaml", "rl_reward_model.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(RLConfig, CONFIGS / name)
    assert cfg.rewards and cfg.data.eval_prompts


def test_tone_classifier_is_a_pipeline(tmp_path: Path) -> None:
    from heed.demo.classifier import ClassifierSpec, build_tone_classifier
    from heed.rewards.sources import pipeline_source

    info = build_tone_classifier(tmp_path / "clf", ClassifierSpec(n_records=800, epochs=2.0))
    assert info["accuracy"] > 0.9  # positive vs neutral/negative sentences are easy to tell apart
    positive = pipeline_source(str(tmp_path / "clf"), {"POSITIVE": 1.0, "NEGATIVE": 0.0}, use_score=False)
    got = positive(["p"] * 2, ["Chess is wonderful and full of joy.", "Chess is boring and a waste of time."])
    assert got == [1.0, 0.0]
