"""Which records to show first: those a reward model is least sure about.

A reward model that scores two responses almost equally cannot tell them apart, so a human label
there teaches it the most (uncertainty sampling; cf. active preference collection in
https://arxiv.org/abs/2402.08114). The scorer is any ``score(prompts, responses) -> list[float]``,
e.g. ``heed.load_reward_model(path).score``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

Scorer = Callable[[list[Any], list[str]], list[float]]


def min_score_gap(score: Scorer, prompt: Any, responses: Sequence[str]) -> float:
    """``min_{i<j} |s_i - s_j|`` over the responses' scores (smaller = more uncertain)."""
    scores = [float(x) for x in score([prompt] * len(responses), list(responses))]
    if len(scores) != len(responses) or any(not math.isfinite(x) for x in scores):
        raise ValueError(f"scorer returned {scores!r} for {len(responses)} responses; expected finite floats")
    return min(abs(a - b) for a, b in itertools.combinations(scores, 2))


def most_uncertain_pair(scores: Sequence[float]) -> tuple[int, int]:
    """Indices ``(i, j)``, ``i < j``, of the two responses with the closest scores."""
    if len(scores) < 2:
        raise ValueError("need at least two scores")
    return min(
        itertools.combinations(range(len(scores)), 2), key=lambda ij: (abs(scores[ij[0]] - scores[ij[1]]), ij)
    )
