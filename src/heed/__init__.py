"""Heed: reinforcement learning from human feedback, end to end.

``import heed`` stays light: the heavy pieces (transformers, FastAPI, gymnasium) are
imported only where they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from heed.models.reward import RewardModel


def load_reward_model(path: str, **kwargs: Any) -> RewardModel:
    """Load a reward model folder written by ``heed rm train`` (or any
    ``AutoModelForSequenceClassification`` with one label)."""
    from heed.models.reward import load_reward_model as _load

    return _load(path, **kwargs)


def score(model: Any, tokenizer: Any, prompt: str, response: str) -> float:
    """Score one (prompt, response) pair with a loaded reward model and its tokenizer."""
    from heed.models.reward import score as _score

    return _score(model, tokenizer, prompt, response)


__all__ = ["__version__", "load_reward_model", "score"]
