"""Text-diversity figures over a batch of sampled answers: distinct-n, duplicate fraction, length.

Trainers log them every step (``diversity_metrics(completions)``) and the monitors use them to
spot mode collapse: a tuned policy that answers every prompt with the same few phrases.

Words are whitespace-separated tokens of the lower-cased text, so the figures do not depend
on the model's tokenizer and are comparable across runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def words(text: str) -> list[str]:
    """The lower-cased whitespace-separated words of ``text``."""
    return text.lower().split()


def ngram_counts(texts: Sequence[str], n: int) -> tuple[int, int]:
    """``(distinct, total)`` word n-grams over the whole batch (n-grams never cross answers)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        w = words(text)
        for i in range(len(w) - n + 1):
            seen.add(tuple(w[i : i + n]))
            total += 1
    return len(seen), total


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n of a batch: unique word n-grams / all word n-grams, pooled over the batch.

    ``distinct_n = |{n-grams}| / #n-grams`` (Li et al. 2016, https://arxiv.org/abs/1510.03055).
    1.0 means no n-gram repeats anywhere in the batch; it falls towards 0 as answers repeat
    themselves or each other. A batch without any n-gram (all answers shorter than n words)
    gives 0.0.
    """
    distinct, total = ngram_counts(texts, n)
    return distinct / total if total else 0.0


def _normalise(text: str) -> str:
    return " ".join(words(text))


def duplicate_fraction(texts: Sequence[str]) -> float:
    """Share of answers that repeat an earlier answer of the batch: ``(N - #unique) / N``.

    Answers are compared after lower-casing and collapsing whitespace. 0.0 for an empty batch.
    """
    if not texts:
        return 0.0
    unique = {_normalise(t) for t in texts}
    return (len(texts) - len(unique)) / len(texts)


def mean_words(texts: Sequence[str]) -> float:
    """Mean answer length in words (0.0 for an empty batch)."""
    if not texts:
        return 0.0
    return sum(len(words(t)) for t in texts) / len(texts)


def diversity_metrics(texts: Sequence[str]) -> dict[str, float]:
    """The figures trainers log for a batch of completions, under the report's key names.

    Returns ``diversity/distinct_1``, ``diversity/distinct_2``, ``diversity/duplicate_frac`` and
    ``length/words``.
    """
    return {
        "diversity/distinct_1": distinct_n(texts, 1),
        "diversity/distinct_2": distinct_n(texts, 2),
        "diversity/duplicate_frac": duplicate_fraction(texts),
        "length/words": mean_words(texts),
    }


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation of two equal-length sequences; None when either is constant or n < 2.

    ``r = sum((x - mx)(y - my)) / sqrt(sum((x - mx)^2) * sum((y - my)^2))``.
    """
    if len(xs) != len(ys):
        raise ValueError(f"pearson: lengths differ ({len(xs)} vs {len(ys)})")
    n = len(xs)
    if n < 2:
        return None
    mx = sum(xs) / n
    my = sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
