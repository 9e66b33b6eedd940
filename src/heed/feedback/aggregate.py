"""From individual judgements to one label per record, and the project's quality figures.

Pure functions over :class:`Judgement` lists (no database): majority vote for pairwise records,
mean fractional rank (equivalently Borda with half points for ties) for rankings, Dawid-Skene
(each annotator weighted by an estimated confusion matrix, :mod:`heed.feedback.reliability`) for
both, inter-annotator agreement, each annotator's agreement with the others' majority and
estimated reliability, and position bias.

Pairwise labels are in terms of the record's response indices: ``"0"`` (the first stored response
won), ``"1"``, ``"tie"`` or ``"discard"``. Rankings are per response index, lower is better.
Binary labels are ``"up"`` / ``"down"`` (majority of thumbs, or Dawid-Skene over the two classes);
ratings are points of the project's scale (their mean). Critiques and edits are not aggregated:
every one is kept (see :meth:`heed.feedback.service.Feedback.export`).
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
AGGREGATIONS = ("majority", "dawid-skene", "mean-rank", "mean")
ALLOWED_AGGREGATIONS = {
    "pairwise": ("majority", "dawid-skene"),
    "binary": ("majority", "dawid-skene"),
    "ranking": ("mean-rank", "dawid-skene"),
    "rating": ("mean",),
}
BINARY_LABELS = ("up", "down", "discard")


@dataclass(frozen=True)
class Judgement:
    """One stored annotation."""

    record_id: int
    user: str
    label: str  # pairwise: "0" | "1" | "tie"; ranking: "rank"; binary: "up" | "down"; rating: "rating"; "discard"
    ranks: tuple[float, ...] | None  # per response index (None for a discard)
    display_order: tuple[int, ...]  # display position -> response index
    rating: float | None = None  # rating projects: the point chosen
    suggestion_shown: bool | None = None  # a model's suggestion was on screen (None: there was none)


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
    mean_rating: float | None = None  # rating projects: the mean of the ratings


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


def aggregate_binary(record_id: int, judgements: Sequence[Judgement]) -> Aggregate:
    """Majority of thumbs: ``label`` ``"up"`` / ``"down"`` (or ``"discard"``) when more than half of
    the votes say so, else ``None``; ``weight`` = the winner's vote share."""
    labels = [j.label for j in judgements]
    votes = dict(Counter(labels))
    label = strict_majority(labels)
    return Aggregate(record_id, len(labels), label, None, votes[label] / len(labels) if label else 0.0, votes)


def aggregate_rating(record_id: int, judgements: Sequence[Judgement]) -> Aggregate:
    """Mean rating ``r̄ = Σ r_a / n`` over the annotators who rated (discards are votes: a strict
    majority of them discards the record). ``weight = 1 / (1 + σ)``, σ the ratings' population
    standard deviation: 1 when everyone gave the same point, smaller as they spread."""
    labels = [j.label for j in judgements]
    votes = dict(Counter(labels))
    ratings = [float(j.rating) for j in judgements if j.label == "rating" and j.rating is not None]
    if strict_majority(labels) == "discard" or not ratings:
        return Aggregate(record_id, len(labels), "discard" if labels else None, None, 0.0, votes)
    mean = sum(ratings) / len(ratings)
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratings) / len(ratings))
    return Aggregate(record_id, len(labels), "rating", None, 1.0 / (1.0 + sd), votes, mean_rating=mean)


def aggregate_binary_dawid_skene(judgements: Sequence[Judgement]) -> list[Aggregate]:
    """Thumbs weighted by each annotator's estimated confusion matrix (:func:`fit_reliability`):
    ``label`` = the most probable class, ``weight`` = its posterior; a strict majority of discards
    discards the record."""
    model = fit_reliability(judgements, "binary")
    out = []
    for rid, js in sorted(by_record(judgements).items()):
        labels = [j.label for j in js]
        votes = dict(Counter(labels))
        if strict_majority(labels) == "discard" or (rid,) not in model.posterior:
            out.append(Aggregate(rid, len(labels), "discard" if labels else None, None, 0.0, votes))
            continue
        posterior = dict(zip(model.classes, model.posterior[(rid,)], strict=True))
        label = model.label((rid,))
        out.append(Aggregate(rid, len(labels), label, None, posterior[label], votes, None, posterior))
    return out


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


def fit_reliability(
    judgements: Sequence[Judgement], task: str | None = None, **kwargs: Any
) -> rel.DawidSkene:
    """Dawid-Skene over the project's pairwise preferences (:func:`preference_items`), or, for a
    ``binary`` project, over its thumbs (items = records, classes ``"up"`` and ``"down"``).

    Classes are ``"0"``, ``"1"`` and, when any annotator ever gave a tie, ``"tie"`` (a class nobody
    reports cannot be estimated). Every annotator sees the responses in their own random order, so
    their errors cannot depend on which response is stored first: the confusion matrices are fitted
    symmetric under swapping ``"0"`` and ``"1"`` (``swap``), which halves the parameters to estimate.
    ``kwargs`` go to :func:`heed.feedback.reliability.dawid_skene`.
    """
    if task == "binary":
        thumbs: dict[tuple[int], dict[str, str]] = defaultdict(dict)
        for j in judgements:
            if j.label in ("up", "down"):
                thumbs[(j.record_id,)][j.user] = j.label
        return rel.dawid_skene(dict(thumbs), ("up", "down"), **kwargs)
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
    """``majority`` for pairwise and binary projects, ``mean-rank`` for rankings, ``mean`` for ratings."""
    return ALLOWED_AGGREGATIONS.get(task, ("majority",))[0]


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
    allowed = ALLOWED_AGGREGATIONS.get(task, ("majority",))
    if aggregate not in allowed:
        raise DataError(f"aggregate {aggregate!r}: a {task} project takes {' or '.join(allowed)}")
    groups = sorted(by_record(judgements).items())
    if task == "binary":
        if aggregate == "dawid-skene":
            return aggregate_binary_dawid_skene(judgements)
        return [aggregate_binary(rid, js) for rid, js in groups]
    if task == "rating":
        return [aggregate_rating(rid, js) for rid, js in groups]
    if task not in ("pairwise", "ranking"):  # critique / edit alone: every label is kept, none voted on
        return [aggregate_binary(rid, js) for rid, js in groups]
    if aggregate == "dawid-skene":
        return aggregate_dawid_skene(task, judgements)
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
    if task == "rating":
        return _rating_agreement(multi, users, per_annotator)
    if task not in ("pairwise", "ranking", "binary"):  # critique / edit alone: nothing to agree on
        return AgreementReport(task, len(multi), per_annotator=per_annotator)
    model = fit_reliability(judgements, task)
    for u in users:
        per_annotator[u].update(position_bias([j for j in judgements if j.user == u], task))
        per_annotator[u]["reliability"] = model.reliability.get(u, math.nan)
        per_annotator[u]["reliability_labels"] = float(model.shared.get(u, 0))
    bias = position_bias(judgements, task)
    if task in ("pairwise", "binary"):
        categories = PAIRWISE_LABELS if task == "pairwise" else BINARY_LABELS
        table = ag.counts_table([[j.label for j in js] for js in multi.values()], categories)
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


def _rating_agreement(
    multi: dict[int, list[Judgement]], users: list[str], per_annotator: dict[str, dict[str, float]]
) -> AgreementReport:
    """Ratings: Krippendorff's α (interval and ordinal) over units = records, values = ratings."""
    col = {u: i for i, u in enumerate(users)}
    units: list[list[float | None]] = []
    for js in multi.values():
        row: list[float | None] = [None] * len(users)
        for j in js:
            if j.label == "rating" and j.rating is not None:
                row[col[j.user]] = float(j.rating)
        units.append(row)
    return AgreementReport(
        "rating",
        len(multi),
        alpha_ordinal=ag.krippendorff_alpha(units, "ordinal"),
        alpha_interval=ag.krippendorff_alpha(units, "interval"),
        per_annotator=per_annotator,
    )


def with_majority(task: str, user: str, groups: dict[int, list[Judgement]]) -> dict[str, float]:
    """How often ``user`` agrees with the *other* annotators' consensus (leave-one-out).

    Pairwise and binary: share of their labels equal to the others' strict majority (records where
    the others have one). Ranking: mean Kendall tau-b between their ranking and the others' mean
    rank. Rating: mean absolute difference between their rating and the others' mean rating.
    """
    hits = compared = 0
    taus = []
    diffs = []
    for js in groups.values():
        mine = [j for j in js if j.user == user]
        others = [j for j in js if j.user != user]
        if not mine or not others:
            continue
        if task == "rating":
            rated = [j.rating for j in others if j.rating is not None]
            if mine[0].rating is not None and rated:
                diffs.append(abs(mine[0].rating - sum(rated) / len(rated)))
        elif task in ("pairwise", "binary"):
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
    if task == "rating":
        return {
            "mean_abs_diff_with_others": sum(diffs) / len(diffs) if diffs else math.nan,
            "compared": float(len(diffs)),
        }
    if task in ("pairwise", "binary"):
        return {"agree_with_majority": hits / compared if compared else math.nan, "compared": float(compared)}
    if task != "ranking":
        return {}
    return {"tau_with_others": sum(taus) / len(taus) if taus else math.nan, "compared": float(len(taus))}


def position_bias(judgements: Sequence[Judgement], task: str) -> dict[str, float]:
    """How often the response shown first wins.

    Pairwise: among judgements with a winner, the share whose winner was shown first (0.5 = no
    bias), with a z-score against 0.5. Ranking: the share where the first-shown response got the
    best rank (alone or tied), next to the share expected when position does not matter
    (mean over judgements of ``#best / K``). Single-answer kinds have no positions: ``{}``.
    """
    if task not in ("pairwise", "ranking"):
        return {}
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
        if task in ("pairwise", "binary"):
            agg = aggregate_pairwise(rid, js)
            if len(agg.votes) == 1:
                continue
            score = agg.weight
        elif task == "rating":
            ratings = [j.rating for j in js if j.rating is not None]
            if len({j.label for j in js}) == 1 and len(set(ratings)) <= 1:
                continue
            score = -(max(ratings) - min(ratings)) if ratings else -1.0
        elif task != "ranking":
            continue
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
                "labels": {j.user: _shown_label(task, j) for j in js},
            }
        )
    out.sort(key=lambda d: (d["agreement"], d["record_id"]))
    return out[:limit]


def _shown_label(task: str, j: Judgement) -> Any:
    if task == "rating":
        return j.rating if j.rating is not None else j.label
    if task == "ranking":
        return list(j.ranks) if j.ranks else j.label
    return j.label


def pairs_of(judgements: Sequence[Judgement], final: Sequence[int]) -> list[tuple[int, int, float]]:
    """(better, worse, agreement weight) for every pair the consensus ranking ``final`` orders."""
    out = []
    for i, j in itertools.combinations(range(len(final)), 2):
        if final[i] == final[j]:
            continue
        better, worse = (i, j) if final[i] < final[j] else (j, i)
        out.append((better, worse, pair_agreement(judgements, better, worse)))
    return out


SUGGESTION_MEASURES = {
    "pairwise": "share of decided labels choosing the answer the model scored higher",
    "ranking": "mean Kendall tau-b between the annotator's ranking and the model's scores",
    "binary": "share of thumbs equal to the model's suggested thumb",
    "rating": "Pearson correlation between the ratings and the model's scores",
}


def suggestion_agreement(
    task: str, judgements: Sequence[Judgement], suggestions: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """How closely labels follow a model's suggestion, apart for labels given with the suggestion on
    screen (``shown``) and without it (``hidden``): the difference is the suggestion's pull on annotators.

    ``suggestions[record_id]`` is the stored ``{"scores": [per response index], "label"?: ...}``.
    Per label (discards and labels of records without a suggestion left out), by ``task``:
    pairwise: 1 when the chosen answer has the higher score (ties either way left out);
    ranking: Kendall τ-b between the ranks and the scores; binary: 1 when the thumb equals the
    suggested one; rating: over all labels of the group, Pearson's r between rating and score.
    ``agreement`` is the mean (``nan`` without labels).
    """
    if task not in SUGGESTION_MEASURES:
        return {}
    out: dict[str, Any] = {"measure": SUGGESTION_MEASURES[task]}
    for name, shown in (("shown", True), ("hidden", False)):
        values: list[float] = []
        pairs: list[tuple[float, float]] = []
        for j in judgements:
            sugg = suggestions.get(j.record_id)
            if j.suggestion_shown is not shown or not sugg or j.label == "discard":
                continue
            scores = sugg["scores"]
            if task == "pairwise" and j.label in ("0", "1") and scores[0] != scores[1]:
                values.append(float(scores[int(j.label)] > scores[1 - int(j.label)]))
            elif task == "ranking" and j.ranks is not None:
                tau = ag.kendall_tau_b(list(j.ranks), [-x for x in scores])
                if not math.isnan(tau):
                    values.append(tau)
            elif task == "binary" and "label" in sugg and j.label in ("up", "down"):
                values.append(float(j.label == sugg["label"]))
            elif task == "rating" and j.rating is not None:
                pairs.append((float(j.rating), float(scores[0])))
        if task == "rating":
            out[name] = {"labels": len(pairs), "agreement": _pearson(pairs)}
        else:
            out[name] = {
                "labels": len(values),
                "agreement": sum(values) / len(values) if values else math.nan,
            }
    return out


def _pearson(pairs: Sequence[tuple[float, float]]) -> float:
    """Pearson's r of the pairs; ``nan`` with fewer than two or a constant side."""
    n = len(pairs)
    if n < 2:
        return math.nan
    mx = sum(x for x, _ in pairs) / n
    my = sum(y for _, y in pairs) / n
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
