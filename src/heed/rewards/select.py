"""Turning a judge's scores into training data: a preference pair from two answers (online DPO), the
best of N answers (rejection sampling). Plain functions over score lists, with every skip counted.

Scores come prompt-major, as the rollout engine returns answers: row ``i*K + k`` is answer ``k`` of
prompt ``i``. A score of None means the judge did not score that answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SelectCounts:
    """What the selection left out, reported instead of silently dropped."""

    prompts: int = 0
    selected: int = 0
    ties: int = 0  # pairs whose two answers scored the same (nothing to prefer)
    unscored: int = 0  # prompts whose answers the judge left (partly, for a pair) unscored (None)

    def as_dict(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/{k}": v for k, v in self.__dict__.items()}

    def add(self, other: SelectCounts) -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class LabelledPairs:
    """Pairs labelled by a judge: ``prompts[j]`` is the prompt index of pair ``j``, ``chosen[j]`` /
    ``rejected[j]`` the rows of its better / worse answer, ``chosen_scores`` / ``rejected_scores``
    their scores."""

    prompts: list[int] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)
    counts: SelectCounts = field(default_factory=SelectCounts)

    def __len__(self) -> int:
        return len(self.chosen)


def label_pairs(scores: Sequence[float | None], k: int = 2) -> LabelledPairs:
    """``k`` answers per prompt (rows ``i*k .. i*k + k-1``) -> one (chosen, rejected) pair per prompt:
    its highest- and lowest-scored answers (the first of each on a tie).

    With ``k = 2`` this is the pair as sampled; with more answers it is the best-vs-worst pair of
    iterative-RLHF recipes (Xiong et al. 2024, https://arxiv.org/abs/2312.11456; Dong et al. 2024,
    https://arxiv.org/abs/2405.07863), whose wider score gap labels the pair more reliably.
    Unscored answers (None) are left out; a prompt with fewer than two scored answers is skipped
    and counted in ``unscored``, one whose best and worst scores are equal in ``ties``.
    """
    if k < 2:
        raise ValueError(f"label_pairs: a pair needs at least two answers per prompt, got k={k}")
    if len(scores) % k:
        raise ValueError(f"label_pairs: expected {k} scores per prompt, got {len(scores)} scores")
    out = LabelledPairs()
    out.counts.prompts = len(scores) // k
    for i in range(len(scores) // k):
        rows = [(s, i * k + j) for j, s in enumerate(scores[i * k : (i + 1) * k]) if s is not None]
        if len(rows) < 2:
            out.counts.unscored += 1
            continue
        best = max(rows, key=lambda t: t[0])  # max / min keep the first of equal scores
        worst = min(rows, key=lambda t: t[0])
        if best[0] == worst[0]:
            out.counts.ties += 1
            continue
        out.prompts.append(i)
        out.chosen.append(best[1])
        out.rejected.append(worst[1])
        out.chosen_scores.append(best[0])
        out.rejected_scores.append(worst[0])
    out.counts.selected = len(out.chosen)
    return out


def best_of_n(scores: Sequence[float | None], n: int) -> tuple[list[int | None], SelectCounts]:
    """Rows ``i*n .. i*n + n-1`` are the ``n`` answers of prompt ``i``; returns, per prompt, the row of
    its highest-scored answer (the first one on a tie), or None when the judge scored none of them
    (counted as ``unscored``). Unscored answers of a prompt never win."""
    if n < 1 or len(scores) % n:
        raise ValueError(f"best_of_n: {len(scores)} scores do not split into groups of {n}")
    counts = SelectCounts(prompts=len(scores) // n)
    best: list[int | None] = []
    for i in range(len(scores) // n):
        rows = [(s, i * n + k) for k, s in enumerate(scores[i * n : (i + 1) * n]) if s is not None]
        if not rows:
            counts.unscored += 1
            best.append(None)
            continue
        top = max(s for s, _ in rows)
        best.append(next(row for s, row in rows if s == top))
    counts.selected = sum(b is not None for b in best)
    return best, counts
