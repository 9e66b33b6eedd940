"""Inter-annotator agreement: pure functions over plain Python lists.

Each function takes labels as given by annotators and returns one float (or ``nan`` when the
statistic is undefined, e.g. a single category was ever used, or no item had two ratings).

- :func:`cohen_kappa`: two annotators, nominal labels.
- :func:`mean_pairwise_cohen_kappa`: Light's kappa, the mean of Cohen's kappa over annotator pairs.
- :func:`fleiss_kappa`: any number of annotators per item (counts table), nominal labels.
- :func:`krippendorff_alpha`: any annotators, missing values allowed; nominal, ordinal, interval, ratio.
- :func:`kendall_tau_b`: rank correlation of two rankings with ties.
- :func:`mean_kendall_tau`: mean tau-b over the annotator pairs of a record, then over records.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Literal

Level = Literal["nominal", "ordinal", "interval", "ratio"]


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two annotators who labelled the same items.

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed share of agreeing items and
    ``p_e = sum_k p_a(k) p_b(k)`` the agreement expected from each annotator's own label shares.
    Cohen (1960), https://doi.org/10.1177/001316446002000104.

    Args:
        labels_a, labels_b: one label per item, shape ``(N,)`` each, same item order.

    Returns:
        kappa in [-1, 1]; ``nan`` when N = 0 or ``p_e = 1`` (both always gave the same single label).
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(f"cohen_kappa: {len(labels_a)} labels vs {len(labels_b)}; need one per item each")
    n = len(labels_a)
    if n == 0:
        return math.nan
    p_o = sum(a == b for a, b in zip(labels_a, labels_b, strict=True)) / n
    count_a, count_b = Counter(labels_a), Counter(labels_b)
    p_e = sum(count_a[k] * count_b.get(k, 0) for k in count_a) / (n * n)
    if p_e >= 1.0:
        return math.nan
    return (p_o - p_e) / (1.0 - p_e)


def mean_pairwise_cohen_kappa(labels: dict[Hashable, dict[Hashable, Hashable]], min_shared: int = 2) -> float:
    """Light's kappa: Cohen's kappa for every pair of annotators on the items both labelled, averaged.

    Light (1971), https://doi.org/10.1037/h0031643. Pairs sharing fewer than ``min_shared`` items,
    and pairs whose kappa is undefined, are left out of the mean.

    Args:
        labels: ``{annotator: {item: label}}``.

    Returns:
        the mean kappa, or ``nan`` when no pair qualifies.
    """
    values = []
    for a, b in itertools.combinations(sorted(labels, key=str), 2):
        shared = sorted(set(labels[a]) & set(labels[b]), key=str)
        if len(shared) < min_shared:
            continue
        k = cohen_kappa([labels[a][i] for i in shared], [labels[b][i] for i in shared])
        if not math.isnan(k):
            values.append(k)
    return sum(values) / len(values) if values else math.nan


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from a table ``counts[i][j]`` = annotators who put item ``i`` in category ``j``.

    ``kappa = (P_bar - P_e) / (1 - P_e)``, where for item ``i`` with ``n_i`` ratings
    ``P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))``, ``P_bar`` is the mean of ``P_i``,
    ``p_j = sum_i n_ij / sum_i n_i`` and ``P_e = sum_j p_j^2``. Fleiss (1971),
    https://doi.org/10.1037/h0031619. Items may have different ``n_i`` (the usual generalisation);
    items with fewer than two ratings carry no agreement information and are skipped.

    Args:
        counts: shape ``(N items, C categories)`` of non-negative ints.

    Returns:
        kappa (<= 1), or ``nan`` when no item has two ratings or ``P_e = 1``.
    """
    rows = [list(r) for r in counts if sum(r) >= 2]
    if not rows:
        return math.nan
    total = sum(sum(r) for r in rows)
    n_cat = max(len(r) for r in rows)
    p_j = [sum(r[j] for r in rows if j < len(r)) / total for j in range(n_cat)]
    p_e = sum(p * p for p in p_j)
    p_bar = sum((sum(x * x for x in r) - sum(r)) / (sum(r) * (sum(r) - 1)) for r in rows) / len(rows)
    if p_e >= 1.0:
        return math.nan
    return (p_bar - p_e) / (1.0 - p_e)


def counts_table(items: Iterable[Sequence[Hashable]], categories: Sequence[Hashable]) -> list[list[int]]:
    """Turn per-item label lists into the ``(N, C)`` count table :func:`fleiss_kappa` takes."""
    index = {c: j for j, c in enumerate(categories)}
    table = []
    for labels in items:
        row = [0] * len(categories)
        for label in labels:
            row[index[label]] += 1
        table.append(row)
    return table


def _value_order(v: Any) -> tuple[int, float, str]:
    """Sort key: numbers by value (ints and floats mixed), any other value after them by its text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, f"{type(v).__name__}:{v}")


def krippendorff_alpha(units: Sequence[Sequence[float | None]], level: Level = "nominal") -> float:
    """Krippendorff's alpha from a units x coders table, ``None`` where a coder gave no value.

    ``alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_ck o_ck d2(c, k) / sum_ck n_c n_k d2(c, k)``, with
    ``o_ck`` the coincidence matrix (each unit ``u`` with ``m_u >= 2`` values adds
    ``1 / (m_u - 1)`` for every ordered pair of its values from different coders), ``n_c`` its
    margins and ``n = sum_c n_c``. Distances ``d2``: nominal ``[c != k]``; interval ``(c - k)^2``;
    ratio ``((c - k) / (c + k))^2``; ordinal ``(sum_{g=c..k} n_g - (n_c + n_k) / 2)^2`` over the
    sorted values. Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability",
    https://repository.upenn.edu/asc_papers/43/.

    Args:
        units: shape ``(U units, R coders)``; rows may differ in length; values are numbers
            (nominal accepts any hashable).
        level: the metric of the values.

    Returns:
        alpha (<= 1), or ``nan`` when fewer than two pairable values or only one distinct value.
    """
    # step 1: the coincidence matrix over the distinct values
    pairable = [[v for v in row if v is not None] for row in units]
    pairable = [vals for vals in pairable if len(vals) >= 2]
    values = sorted({v for vals in pairable for v in vals}, key=_value_order)
    if len(values) < 2:
        return math.nan
    index = {v: i for i, v in enumerate(values)}
    size = len(values)
    o = [[0.0] * size for _ in range(size)]
    for vals in pairable:
        m = len(vals)
        for i, j in itertools.permutations(range(m), 2):
            o[index[vals[i]]][index[vals[j]]] += 1.0 / (m - 1)
    n_c = [sum(row) for row in o]
    n = sum(n_c)

    # step 2: the squared distance between every two values
    def d2(c: int, k: int) -> float:
        if c == k:
            return 0.0
        if level == "nominal":
            return 1.0
        if level == "interval":
            return float(values[c] - values[k]) ** 2
        if level == "ratio":
            a, b = float(values[c]), float(values[k])
            return ((a - b) / (a + b)) ** 2 if a + b != 0 else 0.0
        if level == "ordinal":
            lo, hi = min(c, k), max(c, k)
            return (sum(n_c[lo : hi + 1]) - (n_c[lo] + n_c[hi]) / 2.0) ** 2
        raise ValueError(f"krippendorff_alpha: level must be nominal|ordinal|interval|ratio, got {level!r}")

    # step 3: observed vs expected disagreement
    observed = sum(o[c][k] * d2(c, k) for c in range(size) for k in range(size))
    expected = sum(n_c[c] * n_c[k] * d2(c, k) for c in range(size) for k in range(size))
    if expected == 0:
        return math.nan
    return 1.0 - (n - 1) * observed / expected


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two rankings of the same items, ties allowed.

    ``tau_b = (n_c - n_d) / sqrt((n_0 - n_x) (n_0 - n_y))`` where ``n_c`` / ``n_d`` count concordant /
    discordant item pairs, ``n_0 = N (N - 1) / 2``, and ``n_x`` / ``n_y`` count pairs tied in ``x`` / ``y``.
    Kendall (1945), https://doi.org/10.1093/biomet/33.3.239.

    Args:
        x, y: a rank (or score) per item, shape ``(N,)`` each.

    Returns:
        tau-b in [-1, 1], or ``nan`` when either ranking ties every item (or N < 2).
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: {len(x)} ranks vs {len(y)}")
    n_c = n_d = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0:
            tied_x += 1
        if dy == 0:
            tied_y += 1
        if dx * dy > 0:
            n_c += 1
        elif dx * dy < 0:
            n_d += 1
    n_0 = len(x) * (len(x) - 1) // 2
    denom = math.sqrt((n_0 - tied_x) * (n_0 - tied_y))
    return (n_c - n_d) / denom if denom > 0 else math.nan


def mean_kendall_tau(records: Iterable[Sequence[Sequence[float]]]) -> float:
    """Mean Kendall tau-b between annotators: per record over its annotator pairs, then over records.

    Args:
        records: for each record, the rankings its annotators gave, shape ``(A_r, K_r)``.

    Returns:
        the mean, or ``nan`` when no record has two annotators with a defined tau.
    """
    per_record = []
    for rankings in records:
        taus = [kendall_tau_b(a, b) for a, b in itertools.combinations(rankings, 2)]
        taus = [t for t in taus if not math.isnan(t)]
        if taus:
            per_record.append(sum(taus) / len(taus))
    return sum(per_record) / len(per_record) if per_record else math.nan


def fractional_ranks(ranks: Sequence[float]) -> list[float]:
    """Map any ranking (lower is better, equal values tie) to fractional ranks 1..K.

    Each item gets ``1 + #strictly better + (#tied others) / 2``, so ``[1, 2, 2, 3]`` becomes
    ``[1, 2.5, 2.5, 4]`` and ``[1, 2, 2, 4]`` maps to the same. Averaging fractional ranks is the
    mean-rank aggregation; ``K - fractional rank`` is the Borda score with half a point per tie.
    """
    return [1.0 + sum(o < r for o in ranks) + 0.5 * (sum(o == r for o in ranks) - 1) for r in ranks]


def dense_ranks(scores: Sequence[float], lower_is_better: bool = True) -> list[int]:
    """Rank 1..M with equal scores sharing a rank and no gaps: ``[0.5, 2.0, 2.0, 3.1] -> [1, 2, 2, 3]``."""
    distinct = sorted(set(scores), reverse=not lower_is_better)
    pos = {s: i + 1 for i, s in enumerate(distinct)}
    return [pos[s] for s in scores]


__all__ = [
    "cohen_kappa",
    "counts_table",
    "dense_ranks",
    "fleiss_kappa",
    "fractional_ranks",
    "kendall_tau_b",
    "krippendorff_alpha",
    "mean_kendall_tau",
    "mean_pairwise_cohen_kappa",
]
