"""From individual judgements to one label per record, and the project's quality figures.

Pure functions over :class:`Judgement` lists (no database): majority vote for pairwise records,
mean fractional rank (equivalently Borda with half points for ties) for rankings, Dawid-Skene
(each annotator weighted by an estimated confusion matrix, :mod:`heed.feedback.reliability`) for
both, inter-annotator agreement, each annotator's agreement with the others' majority and
estimated reliability, and position bias.

Pairwise labels are in terms of the record's response indices: ``"0"`` (the first stored response
won), ``"1"``, ``"tie"`` or ``"discard"``. Rankings are per response index, lower is better.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from heed.errors import DataError
from heed.feedback import agreement as ag
from heed.feedback import reliability as rel

PAIRWISE_LABELS = ("0", "1", "tie", "discard")
PREFERENCE_CLASSES = ("0", "1", "tie")  # of a pair (i, j), i < j: i better, j better, equal
AGGREGATIONS = ("majority", "dawid-skene", "mean-rank")


@dataclass(frozen=True)
class Judgement:
    """One stored annotation."""

    record_id: int
    user: str
    label: str  # pairwise: "0" | "1" | "tie" | "discard"; ranking: "rank" | "discard"
    ranks: tuple[float, ...] | None  # per response index (None for a discard)
    display_order: tuple[int, ...]  # display position -> response index


@dataclass(frozen=True)
class Aggregate:
    """The consensus of one record.

    ``label`` is the pairwise majority (``None`` without a strict majority); ``ranks`` the
    consensus ranking per response index (dense, 1 = best; ``None`` when discarded or undecided);
    ``weight`` in [0, 1] says how much annotators agreed (Dawid-Skene: the posterior probability
    of the consensus). Dawid-Skene also fills ``posterior`` (pairwise: class -> probability) and
    ``pairs`` (every ``(better, worse, probability)`` the consensus orders).
    """

    record_id: int
    num_annotations: int
    label: str | None
    ranks: list[int] | None
    weight: float
    votes: dict[str, int] = field(default_factory=dict)
    mean_ranks: list[float] | None = None
    posterior: dict[str, float] | None = None
    pairs: list[tuple[int, int, float]] | None = None


def by_record(judgements: Sequence[Judgement]) -> dict[int, list[Judgement]]:
    out: dict[int, list[Judgement]] = defaultdict(list)
    for j in judgements:
        out[j.record_id].append(j)
    return dict(out)


def strict_majority(labels: Sequence[str]) -> str | None:
    """The label chosen by more than half of ``labels``, else ``None``."""
    if not labels:
        return None
    label, count = Counter(labels).most_common(1)[0]
    return label if 2 * count > len(labels) else None


def aggregate_pairwise(record_id: int, judgements: Sequence[Judgement]) -> Aggregate:
    """Majority vote; ties and discards are votes like any other. ``weight`` = winner's vote share."""
    labels = [j.label for j in judgements]
    votes = {k: v for k, v in Counter(labels).items()}
    label = strict_majority(labels)
    weight = votes[label] / len(labels) if label else 0.0
    ranks = {"0": [1, 2], "1": [2, 1], "tie": [1, 1]}.get(label or "")
    return Aggregate(record_id, len(labels), label, ranks, weight, votes)


def aggregate_ranking(
    record_id: int, judgements: Sequence[Judgement], method: Literal["mean_rank", "borda"] = "mean_rank"
) -> Aggregate:
    """Mean fractional rank per response (or Borda score ``K - fractional rank``), then dense ranks.

    Discards are votes: a strict majority of discards discards the record. ``weight`` is
    ``(1 + mean Kendall tau-b between annotators) / 2``, and 1 with a single ranking.
    """
    labels = [j.label for j in judgements]
    votes = dict(Counter(labels))
    rankings = [list(j.ranks) for j in judgements if j.label == "rank" and j.ranks is not None]
    if strict_majority(labels) == "discard" or not rankings:
        return Aggregate(record_id, len(labels), "discard" if rankings or labels else None, None, 0.0, votes)
    k = len(rankings[0])
    frac = [ag.fractional_ranks(r) for r in rankings]
    mean = [sum(f[i] for f in frac) / len(frac) for i in range(k)]
    if method == "borda":
        borda = [k - m for m in mean]
        final = ag.dense_ranks(borda, lower_is_better=False)
    else:
        final = ag.dense_ranks(mean)
    tau = ag.mean_kendall_tau([rankings])
    weight = 1.0 if len(rankings) < 2 else (0.5 * (1.0 + tau) if not math.isnan(tau) else 0.5)
    return Aggregate(record_id, len(labels), "rank", final, weight, votes, mean)


def preference_items(judgements: Sequence[Judgement]) -> dict[tuple[int, int, int], dict[str, str]]:
    """Every judgement as pairwise preferences: ``{(record_id, i, j): {user: "0" | "1" | "tie"}}``, ``i < j``.

    ``"0"`` says response ``i`` is better, ``"1"`` that ``j`` is, ``"tie"`` that they are equal. A
    pairwise judgement is the one pair ``(0, 1)``; a ranking of K responses gives its C(K, 2) pairs
    (``ranks[i] < ranks[j]`` -> ``"0"``). Discards say nothing about the order and are left out.
    """
    out: dict[tuple[int, int, int], dict[str, str]] = defaultdict(dict)
    for j in judgements:
        if j.label == "discard" or j.ranks is None:
            continue
        for a, b in itertools.combinations(range(len(j.ranks)), 2):
            ra, rb = j.ranks[a], j.ranks[b]
            out[(j.record_id, a, b)][j.user] = "0" if ra < rb else "1" if ra > rb else "tie"
    return dict(out)


def fit_reliability(judgements: Sequence[Judgement], **kwargs: Any) -> rel.DawidSkene:
    """Dawid-Skene over the project's pairwise preferences (:func:`preference_items`).

    Classes are ``"0"``, ``"1"`` and, when any annotator ever gave a tie, ``"tie"`` (a class nobody
    reports cannot be estimated). Every annotator sees the responses in their own random order, so
    their errors cannot depend on which response is stored first: the confusion matrices are fitted
    symmetric under swapping ``"0"`` and ``"1"`` (``swap``), which halves the parameters to estimate.
    ``kwargs`` go to :func:`heed.feedback.reliability.dawid_skene`.
    """
    items = preference_items(judgements)
    has_tie = any("tie" in votes.values() for votes in items.values())
    classes = PREFERENCE_CLASSES if has_tie else PREFERENCE_CLASSES[:2]
    kwargs.setdefault("swap", [1, 0, 2][: len(classes)])
    return rel.dawid_skene(items, classes, **kwargs)


def aggregate_dawid_skene(
    task: str, judgements: Sequence[Judgement], model: rel.DawidSkene | None = None
) -> list[Aggregate]:
    """Each record's consensus from the Dawid-Skene posteriors of its pairs (votes weighted by reliability).

    Pairwise: the most probable class of the pair; ``weight`` = its posterior probability.
    Ranking: each response's expected fractional rank under the posteriors,
    ``E[rank_i] = 1 + sum_{j != i} (P(j > i) + P(i = j) / 2)`` (the mean rank's counterpart), dense-ranked;
    ``pairs`` holds every pair the consensus orders with ``P(better > worse)``, and ``weight`` is the
    mean over pairs of the probability of the relation the consensus gives them. A strict majority
    of discards discards the record, as with the majority vote.
    """
    model = model if model is not None else fit_reliability(judgements)
    out = []
    for rid, js in sorted(by_record(judgements).items()):
        labels = [j.label for j in js]
        votes = dict(Counter(labels))
        ranked = [j for j in js if j.label != "discard" and j.ranks is not None]
        if strict_majority(labels) == "discard" or not ranked:
            out.append(Aggregate(rid, len(labels), "discard" if labels else None, None, 0.0, votes))
            continue
        k = len(ranked[0].ranks)  # type: ignore[arg-type]
        better = [[0.0] * k for _ in range(k)]  # better[i][j] = P(i is better than j)
        tie = [[0.0] * k for _ in range(k)]
        for i, j in itertools.combinations(range(k), 2):
            p = dict(zip(model.classes, model.posterior[(rid, i, j)], strict=True))
            better[i][j], better[j][i] = p["0"], p["1"]
            tie[i][j] = tie[j][i] = p.get("tie", 0.0)
        if task == "pairwise":
            label = model.label((rid, 0, 1))
            posterior = dict(zip(model.classes, model.posterior[(rid, 0, 1)], strict=True))
            ranks = {"0": [1, 2], "1": [2, 1], "tie": [1, 1]}[label]
            pairs = [(int(label), 1 - int(label), posterior[label])] if label != "tie" else []
            out.append(
                Aggregate(rid, len(labels), label, ranks, posterior[label], votes, None, posterior, pairs)
            )
            continue
        expected = [1.0 + sum(better[j][i] + 0.5 * tie[i][j] for j in range(k) if j != i) for i in range(k)]
        final = ag.dense_ranks([round(e, 9) for e in expected])  # rounding lets exact mirror images tie
        pairs, agree = [], []
        for i, j in itertools.combinations(range(k), 2):
            if final[i] == final[j]:
                agree.append(tie[i][j])
                continue
            b, w = (i, j) if final[i] < final[j] else (j, i)
            pairs.append((b, w, better[b][w]))
            agree.append(better[b][w])
        weight = sum(agree) / len(agree)
        out.append(Aggregate(rid, len(labels), "rank", final, weight, votes, expected, None, pairs))
    return out


def default_aggregation(task: str) -> str:
    """``majority`` for pairwise projects, ``mean-rank`` for rankings."""
    return "majority" if task == "pairwise" else "mean-rank"


def aggregate_records(
    task: str,
    judgements: Sequence[Judgement],
    aggregate: str | None = None,
    method: Literal["mean_rank", "borda"] = "mean_rank",
) -> list[Aggregate]:
    """The consensus of every record, by record id: ``majority`` (pairwise), ``mean-rank`` (rankings;
    ``method`` picks mean rank or Borda, the same order) or ``dawid-skene`` (both); ``None`` picks
    the task's default (:func:`default_aggregation`)."""
    aggregate = aggregate or default_aggregation(task)
    allowed = ("majority", "dawid-skene") if task == "pairwise" else ("mean-rank", "dawid-skene")
    if aggregate not in allowed:
        raise DataError(f"aggregate {aggregate!r}: a {task} project takes {' or '.join(allowed)}")
    if aggregate == "dawid-skene":
        return aggregate_dawid_skene(task, judgements)
    groups = sorted(by_record(judgements).items())
    if aggregate == "majority":
        return [aggregate_pairwise(rid, js) for rid, js in groups]
    return [aggregate_ranking(rid, js, method) for rid, js in groups]


def pair_agreement(judgements: Sequence[Judgement], better: int, worse: int) -> float:
    """Share of rankings that put ``better`` above ``worse`` (a tie counts half)."""
    rankings = [j.ranks for j in judgements if j.label == "rank" and j.ranks is not None]
    if not rankings:
        return 0.0
    score = sum(1.0 if r[better] < r[worse] else 0.5 if r[better] == r[worse] else 0.0 for r in rankings)
    return score / len(rankings)


@dataclass(frozen=True)
class AgreementReport:
    """The project's agreement figures (``nan`` where undefined), as shown on the admin page."""

    task: str
    records_multi: int  # records with two or more annotations
    fleiss_kappa: float = math.nan
    cohen_kappa: float = math.nan  # mean over annotator pairs (Light's kappa)
    alpha_nominal: float = math.nan
    alpha_ordinal: float = math.nan
    alpha_interval: float = math.nan
    mean_kendall_tau: float = math.nan
    per_annotator: dict[str, dict[str, float]] = field(default_factory=dict)
    position_bias: dict[str, float] = field(default_factory=dict)
    reliability: dict[str, Any] = field(default_factory=dict)  # DawidSkene.summary()


def agreement_report(task: str, judgements: Sequence[Judgement]) -> AgreementReport:
    """All agreement figures of a project from its judgements.

    ``per_annotator[user]`` holds the leave-one-out agreement, position bias, and the Dawid-Skene
    ``reliability`` (chance of reporting a pair's true preference) with ``reliability_labels`` (the
    shared pairwise labels it rests on); ``reliability`` holds the whole fit without posteriors.
    """
    groups = by_record(judgements)
    multi = {rid: js for rid, js in groups.items() if len(js) >= 2}
    users = sorted({j.user for j in judgements})
    col = {u: i for i, u in enumerate(users)}
    per_annotator = {u: with_majority(task, u, groups) for u in users}
    model = fit_reliability(judgements)
    for u in users:
        per_annotator[u].update(position_bias([j for j in judgements if j.user == u], task))
        per_annotator[u]["reliability"] = model.reliability.get(u, math.nan)
        per_annotator[u]["reliability_labels"] = float(model.shared.get(u, 0))
    bias = position_bias(judgements, task)
    if task == "pairwise":
        table = ag.counts_table([[j.label for j in js] for js in multi.values()], PAIRWISE_LABELS)
        by_user: dict[str, dict[int, str]] = defaultdict(dict)
        for j in judgements:
            by_user[j.user][j.record_id] = j.label
        units = []
        for js in multi.values():
            row: list[str | None] = [None] * len(users)
            for j in js:
                row[col[j.user]] = j.label
            units.append(row)
        return AgreementReport(
            task,
            len(multi),
            fleiss_kappa=ag.fleiss_kappa(table),
            cohen_kappa=ag.mean_pairwise_cohen_kappa(dict(by_user)),
            alpha_nominal=ag.krippendorff_alpha(units, "nominal"),
            per_annotator=per_annotator,
            position_bias=bias,
            reliability=model.summary(),
        )
    # ranking: units are (record, response); values are fractional ranks
    units_r: list[list[float | None]] = []
    rankings_per_record = []
    for js in multi.values():
        ranked = [j for j in js if j.label == "rank" and j.ranks is not None]
        if len(ranked) < 2:
            continue
        rankings_per_record.append([list(j.ranks) for j in ranked])  # type: ignore[arg-type]
        k = len(ranked[0].ranks)  # type: ignore[arg-type]
        fr = {j.user: ag.fractional_ranks(j.ranks) for j in ranked}  # type: ignore[arg-type]
        for i in range(k):
            row_r: list[float | None] = [None] * len(users)
            for u, f in fr.items():
                row_r[col[u]] = f[i]
            units_r.append(row_r)
    return AgreementReport(
        task,
        len(multi),
        alpha_ordinal=ag.krippendorff_alpha(units_r, "ordinal"),
        alpha_interval=ag.krippendorff_alpha(units_r, "interval"),
        mean_kendall_tau=ag.mean_kendall_tau(rankings_per_record),
        per_annotator=per_annotator,
        position_bias=bias,
        reliability=model.summary(),
    )


def with_majority(task: str, user: str, groups: dict[int, list[Judgement]]) -> dict[str, float]:
    """How often ``user`` agrees with the *other* annotators' consensus (leave-one-out).

    Pairwise: share of their labels equal to the others' strict majority (records where the others
    have one). Ranking: mean Kendall tau-b between their ranking and the others' mean rank.
    """
    hits = compared = 0
    taus = []
    for js in groups.values():
        mine = [j for j in js if j.user == user]
        others = [j for j in js if j.user != user]
        if not mine or not others:
            continue
        if task == "pairwise":
            maj = strict_majority([j.label for j in others])
            if maj is not None:
                compared += 1
                hits += mine[0].label == maj
        elif mine[0].ranks is not None:
            other_ranks = [ag.fractional_ranks(j.ranks) for j in others if j.ranks is not None]
            if other_ranks:
                mean = [sum(r[i] for r in other_ranks) / len(other_ranks) for i in range(len(other_ranks[0]))]
                t = ag.kendall_tau_b(mine[0].ranks, mean)
                if not math.isnan(t):
                    taus.append(t)
    if task == "pairwise":
        return {"agree_with_majority": hits / compared if compared else math.nan, "compared": float(compared)}
    return {"tau_with_others": sum(taus) / len(taus) if taus else math.nan, "compared": float(len(taus))}


def position_bias(judgements: Sequence[Judgement], task: str) -> dict[str, float]:
    """How often the response shown first wins.

    Pairwise: among judgements with a winner, the share whose winner was shown first (0.5 = no
    bias), with a z-score against 0.5. Ranking: the share where the first-shown response got the
    best rank (alone or tied), next to the share expected when position does not matter
    (mean over judgements of ``#best / K``).
    """
    if task == "pairwise":
        decided = [j for j in judgements if j.label in ("0", "1")]
        n = len(decided)
        first = sum(j.display_order[0] == int(j.label) for j in decided)
        rate = first / n if n else math.nan
        z = (first - 0.5 * n) / math.sqrt(0.25 * n) if n else math.nan
        return {"first_shown_wins": rate, "decided": float(n), "z": z}
    ranked = [j for j in judgements if j.label == "rank" and j.ranks is not None]
    n = len(ranked)
    top = expected = 0.0
    for j in ranked:
        best = min(j.ranks)  # type: ignore[type-var,arg-type]
        top += j.ranks[j.display_order[0]] == best  # type: ignore[index]
        expected += sum(r == best for r in j.ranks) / len(j.ranks)  # type: ignore[union-attr,arg-type]
    return {
        "first_shown_top": top / n if n else math.nan,
        "expected_if_unbiased": expected / n if n else math.nan,
        "decided": float(n),
    }


def disagreements(task: str, judgements: Sequence[Judgement], limit: int = 200) -> list[dict]:
    """Records whose annotators did not all agree, least agreement first."""
    out = []
    for rid, js in by_record(judgements).items():
        if len(js) < 2:
            continue
        if task == "pairwise":
            agg = aggregate_pairwise(rid, js)
            if len(agg.votes) == 1:
                continue
            score = agg.weight
        else:
            rankings = [list(j.ranks) for j in js if j.ranks is not None]
            if (
                len({tuple(ag.fractional_ranks(r)) for r in rankings}) <= 1
                and len({j.label for j in js}) == 1
            ):
                continue
            tau = ag.mean_kendall_tau([rankings])
            score = -1.0 if math.isnan(tau) else tau
        out.append(
            {
                "record_id": rid,
                "agreement": score,
                "labels": {
                    j.user: (j.label if task == "pairwise" else (list(j.ranks) if j.ranks else j.label))
                    for j in js
                },
            }
        )
    out.sort(key=lambda d: (d["agreement"], d["record_id"]))
    return out[:limit]


def pairs_of(judgements: Sequence[Judgement], final: Sequence[int]) -> list[tuple[int, int, float]]:
    """(better, worse, agreement weight) for every pair the consensus ranking ``final`` orders."""
    out = []
    for i, j in itertools.combinations(range(len(final)), 2):
        if final[i] == final[j]:
            continue
        better, worse = (i, j) if final[i] < final[j] else (j, i)
        out.append((better, worse, pair_agreement(judgements, better, worse)))
    return out
