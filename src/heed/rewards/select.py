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


def label_pairs(scores: Sequence[float | None]) -> LabelledPairs:
    """Two answers per prompt (rows ``2i``, ``2i+1``) -> (chosen, rejected) rows, the higher score chosen.

    A pair is skipped and counted when its scores are equal (``ties``; two identical answers land
    here for any deterministic judge) or when either score is None (``unscored``).
    """
    if len(scores) % 2:
        raise ValueError(f"label_pairs: expected two scores per prompt, got {len(scores)} scores")
    out = LabelledPairs()
    out.counts.prompts = len(scores) // 2
    for i in range(len(scores) // 2):
        a, b = scores[2 * i], scores[2 * i + 1]
        if a is None or b is None:
            out.counts.unscored += 1
            continue
        if a == b:
            out.counts.ties += 1
            continue
        c, r = (2 * i, 2 * i + 1) if a > b else (2 * i + 1, 2 * i)
        out.prompts.append(i)
        out.chosen.append(c)
        out.rejected.append(r)
        out.chosen_scores.append(max(a, b))
        out.rejected_scores.append(min(a, b))
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
