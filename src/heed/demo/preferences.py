"""Hidden preferences of the built-in world, and preference data built from them.

The demo's simulated annotators and the reward-model / DPO benchmarks share one hidden
utility: people prefer positive answers, and concise ones. Because it is known, a learned
reward model's accuracy can be measured exactly.
"""

from __future__ import annotations

import math
import random
from typing import Any

from heed.demo.corpus import TONES, make_prompt, make_response, tone_of

CONCISENESS = 0.15  # utility lost per extra sentence


def count_sentences(text: str) -> int:
    return max(1, sum(text.count(c) for c in ".!?"))


def hidden_utility(text: str) -> float:
    """u(y) = positivity(y) − 0.15 · (sentences(y) − 1), positivity in [−1, 1] from the corpus banks."""
    return tone_of(text) - CONCISENESS * (count_sentences(text) - 1)


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks, 1 = best; equal scores share a rank (ties)."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) + 1 for s in scores]


def gumbel(rng: random.Random) -> float:
    """A standard Gumbel sample, −log(−log U): adding scale·Gumbel noise to utilities and sorting
    draws a Plackett-Luce ranking (the K-wise Bradley-Terry model)."""
    return -math.log(-math.log(max(rng.random(), 1e-12)))


def bradley_terry_prefers(u_a: float, u_b: float, rng: random.Random, temperature: float) -> bool:
    """Sample "a beats b" with probability σ((u_a − u_b) / temperature); temperature 0 is noise-free."""
    if temperature <= 0:
        return u_a > u_b
    return rng.random() < 1.0 / (1.0 + math.exp(-(u_a - u_b) / temperature))


def make_ranked_groups(
    n: int, k: int = 4, seed: int = 0, heldout: bool = False, noise: float = 0.0
) -> list[dict[str, Any]]:
    """``n`` ranked groups ``{"prompt", "responses", "ranks"}`` of ``k`` answers each.

    Answers to one prompt differ in tone and length. Ranks follow the hidden utility; with
    ``noise > 0`` each utility gets Gumbel noise of that scale before ranking (a Plackett-Luce
    sample, the K-wise form of Bradley-Terry). Groups whose answers are all tied are redrawn.
    """
    rng = random.Random(f"heed-groups-{seed}-{heldout}-{k}")
    out = []
    while len(out) < n:
        prompt, topic = make_prompt(rng, heldout)
        responses = []
        while len(responses) < k:
            r = make_response(rng, topic, rng.choice(TONES), rng.choice((1, 2, 3)))
            if r not in responses:
                responses.append(r)
        utils = [hidden_utility(r) for r in responses]
        if noise > 0:
            utils = [u + noise * gumbel(rng) for u in utils]
        ranks = ranks_from_scores([round(u, 6) for u in utils])
        if len(set(ranks)) == 1:
            continue
        out.append({"prompt": prompt, "responses": responses, "ranks": ranks, "topic": topic})
    return out


def make_pairs(n: int, seed: int = 0, heldout: bool = False, noise: float = 0.0) -> list[dict[str, Any]]:
    """``n`` TRL-style pairs ``{"prompt", "chosen", "rejected"}`` (the better answer by hidden utility)."""
    pairs = []
    for g in make_ranked_groups(n, k=2, seed=seed, heldout=heldout, noise=noise):
        (a, b), (ra, rb) = g["responses"], g["ranks"]
        chosen, rejected = (a, b) if ra < rb else (b, a)
        pairs.append({"prompt": g["prompt"], "chosen": chosen, "rejected": rejected, "topic": g["topic"]})
    return pairs
