"""Preference pairs: ranked groups expanded into (chosen, rejected) pairs, and their token ids.

Every cut and drop on the way (ties, pairs a mode leaves out, answers cut at ``max_length``, pairs
left without an answer token or with identical answers) is counted in :class:`PairCounts` and
reported, never silent.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from heed.config.dpo import PairMode
from heed.data.collate import Encoded, truncate
from heed.data.records import PreferenceGroup, Prompt, SFTExample, check_ranked_group
from heed.data.templating import encode_sft


@dataclass(frozen=True)
class PreferencePair:
    """One (chosen, rejected) answer pair to a prompt; ``weight`` scales its loss."""

    prompt: Prompt
    chosen: str
    rejected: str
    weight: float = 1.0
    where: str = ""


@dataclass
class PairCounts:
    """What happened to the data on its way to training, reported instead of silently dropped."""

    groups: int = 0
    pairs: int = 0
    ties_skipped: int = 0  # tied (i, j) pairs inside ranked groups
    not_selected: int = 0  # untied pairs left out by `pairs: best_vs_rest | best_vs_worst`
    truncated: int = 0  # answers cut at max_length
    dropped_no_answer: int = 0  # pairs whose prompt fills max_length (no answer token left)
    dropped_identical: int = 0  # pairs whose answers are identical after truncation

    def as_dict(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/{k}": v for k, v in self.__dict__.items()}


def expand_pairs(
    groups: Sequence[PreferenceGroup], mode: PairMode = "all"
) -> tuple[list[PreferencePair], PairCounts]:
    """Turn preference groups (pairs are groups of two) into (chosen, rejected) pairs.

    ``all``: every pair of answers with different ranks (K·(K−1)/2 for a strict ranking);
    ``best_vs_rest``: each best-ranked answer against every worse one;
    ``best_vs_worst``: each best-ranked answer against each worst-ranked one.
    Ties are skipped and counted. A group that cannot teach anything is an error
    (:func:`heed.data.records.check_ranked_group`, the reward model's rule too).
    """
    out: list[PreferencePair] = []
    counts = PairCounts(groups=len(groups))
    for g in groups:
        check_ranked_group(g.responses, g.ranks, g.where)  # the reward model's rules too
        best, worst = min(g.ranks), max(g.ranks)
        k = len(g.responses)
        for i in range(k):
            for j in range(i + 1, k):
                if g.ranks[i] == g.ranks[j]:
                    counts.ties_skipped += 1
                    continue
                a, b = (i, j) if g.ranks[i] < g.ranks[j] else (j, i)  # a better than b
                keep = (
                    mode == "all"
                    or (mode == "best_vs_rest" and g.ranks[a] == best)
                    or (mode == "best_vs_worst" and g.ranks[a] == best and g.ranks[b] == worst)
                )
                if not keep:
                    counts.not_selected += 1
                    continue
                out.append(PreferencePair(g.prompt, g.responses[a], g.responses[b], g.weight, g.where))
    counts.pairs = len(out)
    return out, counts


@dataclass
class EncodedPairs:
    """Token ids of pairs: ``chosen[i]`` / ``rejected[i]`` are (ids, response_mask) of pair ``i``."""

    pairs: list[PreferencePair]
    chosen: list[Encoded]
    rejected: list[Encoded]
    weights: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def lengths(self) -> list[int]:
        return [max(len(c[0]), len(r[0])) for c, r in zip(self.chosen, self.rejected, strict=True)]


def encode_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], chat: bool, max_length: int, counts: PairCounts
) -> EncodedPairs:
    """Tokenize prompt + answer exactly as SFT does (so the policy sees its own format), with a
    response mask True on the answer tokens (and its EOS / end of turn). Sequences longer than
    ``max_length`` keep their start; pairs left without an answer token, or whose two answers
    became identical, are dropped. Every cut and drop is counted in ``counts``."""
    kept, chosen, rejected = [], [], []
    for p in pairs:
        c = encode_sft(tokenizer, SFTExample(prompt=p.prompt, completion=p.chosen, where=p.where), chat)
        r = encode_sft(tokenizer, SFTExample(prompt=p.prompt, completion=p.rejected, where=p.where), chat)
        (c, r), cut = truncate([c, r], max_length)
        counts.truncated += cut
        if not any(c[1][1:]) or not any(r[1][1:]):
            counts.dropped_no_answer += 1
            continue
        if c[0] == r[0]:
            counts.dropped_identical += 1
            continue
        kept.append(p)
        chosen.append(c)
        rejected.append(r)
    return EncodedPairs(kept, chosen, rejected, [p.weight for p in kept])


def warn_counts(source: str, counts: PairCounts, max_length: int) -> None:
    """One warning per kind of loss of data, with its count."""
    if counts.truncated:
        warnings.warn(
            f"{source}: {counts.truncated} answers were longer than data.max_length={max_length} "
            "tokens (with the prompt) and were cut",
            stacklevel=2,
        )
    if counts.dropped_no_answer:
        warnings.warn(
            f"{source}: {counts.dropped_no_answer} pairs dropped: the prompt fills data.max_length="
            f"{max_length}, leaving no answer token",
            stacklevel=2,
        )
    if counts.dropped_identical:
        warnings.warn(
            f"{source}: {counts.dropped_identical} pairs dropped: chosen and rejected are identical "
            f"within the first {max_length} tokens",
            stacklevel=2,
        )
