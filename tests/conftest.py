"""Shared fixtures: the built-in models, built once per machine and cached in $HEED_CACHE."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def micro_sft_model() -> Path:
    """A very small SFT model (seconds to build): for tests that need a working pipeline, not quality."""
    from heed.demo.assets import MICRO, builtin_sft_model

    return builtin_sft_model(MICRO)


@pytest.fixture(scope="session")
def tiny_sft_model() -> Path:
    """The built-in tiny SFT model (the demo's default): for tests that must show learning."""
    from heed.demo.assets import builtin_sft_model

    return builtin_sft_model()


@pytest.fixture(scope="session")
def corpus_files(micro_sft_model: Path) -> dict[str, Path]:
    """Corpus files beside the micro model: text, chat, prompts_train, prompts_eval."""
    data = micro_sft_model.parent.parent / "data"
    return {p.stem: p for p in data.glob("*.jsonl")}
