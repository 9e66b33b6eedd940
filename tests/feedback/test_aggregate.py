"""Aggregation (majority vote, mean rank / Borda), leave-one-out agreement and position bias."""

from __future__ import annotations

import math

import pytest

from heed.errors import DataError
from heed.feedback.aggregate import (
    Judgement,
    aggregate_pairwise,
    aggregate_ranking,
    aggregate_records,
    agreement_report,
    disagreements,
    pairs_of,
    position_bias,
)


def pw(rid: int, user: str, label: str, order=(0, 1)) -> Judgement:  # type: ignore[no-untyped-def]
    ranks = {"0": (1.0, 2.0), "1": (2.0, 1.0), "tie": (1.0, 1.0)}.get(label)
    return Judgement(rid, user, label, ranks, tuple(order))


def rk(rid: int, user: str, ranks, order=None) -> Judgement:  # type: ignore[no-untyped-def]
    return Judgement(rid, user, "rank", tuple(float(r) for r in ranks), tuple(order or range(len(ranks))))


def test_majority_vote_counts_ties_and_discards() -> None:
    a = aggregate_pairwise(1, [pw(1, "a", "0"), pw(1, "b", "0"), pw(1, "c", "1")])
    assert (a.label, a.ranks, a.weight) == ("0", [1, 2], pytest.approx(2 / 3))
    # 2 ties of 3 votes: a tie majority
    assert aggregate_pairwise(2, [pw(2, "a", "tie"), pw(2, "b", "tie"), pw(2, "c", "1")]).ranks == [1, 1]
    # 0 / 1 / discard: no strict majority
    none = aggregate_pairwise(3, [pw(3, "a", "0"), pw(3, "b", "1"), pw(3, "c", "discard")])
    assert none.label is None and none.ranks is None and none.votes == {"0": 1, "1": 1, "discard": 1}
    # 2 of 4 is not more than half
    assert (
        aggregate_pairwise(
            4, [pw(4, u, lab) for u, lab in zip("abcd", ["0", "0", "1", "tie"], strict=True)]
        ).label
        is None
    )


def test_mean_rank_and_borda() -> None:
    # Three annotators rank responses (x, y, z):
    #   a: [1, 2, 3]; b: [1, 3, 2]; c: [2, 1, 3]
    # fractional ranks are the ranks themselves (no ties); means: x 4/3, y 2, z 8/3 -> [1, 2, 3]
    js = [rk(1, "a", [1, 2, 3]), rk(1, "b", [1, 3, 2]), rk(1, "c", [2, 1, 3])]
    a = aggregate_ranking(1, js)
    assert a.mean_ranks == pytest.approx([4 / 3, 2.0, 8 / 3])
    assert a.ranks == [1, 2, 3]
    assert aggregate_ranking(1, js, "borda").ranks == [1, 2, 3]
    # weight = (1 + mean tau) / 2; taus: (a,b) 1/3, (a,c) 1/3, (b,c) -1/3 -> mean 1/9
    assert a.weight == pytest.approx((1 + 1 / 9) / 2)
    # ties: [1, 1, 2] and [1, 2, 2] -> fractional [1.5, 1.5, 3] and [1, 2.5, 2.5] -> means [1.25, 2, 2.75]
    b = aggregate_ranking(2, [rk(2, "a", [1, 1, 2]), rk(2, "b", [1, 2, 2])])
    assert b.mean_ranks == pytest.approx([1.25, 2.0, 2.75]) and b.ranks == [1, 2, 3]
    # equal means tie in the consensus
    assert aggregate_ranking(3, [rk(3, "a", [1, 2]), rk(3, "b", [2, 1])]).ranks == [1, 1]


def test_ranking_discard_majority_and_pairs() -> None:
    d = Judgement(1, "b", "discard", None, (0, 1, 2))
    e = Judgement(1, "c", "discard", None, (0, 1, 2))
    assert aggregate_ranking(1, [rk(1, "a", [1, 2, 3]), d, e]).ranks is None
    js = [rk(1, "a", [1, 2, 3]), rk(1, "b", [1, 3, 2])]
    # consensus [1, 2, 2]... means x 1, y 2.5, z 2.5 -> dense [1, 2, 2]: pairs (x>y), (x>z); y~z skipped
    final = aggregate_ranking(1, js).ranks
    assert final == [1, 2, 2]
    assert pairs_of(js, final) == [(0, 1, 1.0), (0, 2, 1.0)]


def test_position_bias_pairwise() -> None:
    # winners shown first in 3 of 4 decided judgements: order (0,1) & label "0" -> first won;
    # order (1,0) & label "1" -> first won; order (0,1) & "0"; order (1,0) & "0" -> second won. Tie ignored.
    js = [
        pw(1, "a", "0", (0, 1)),
        pw(2, "a", "1", (1, 0)),
        pw(3, "a", "0", (0, 1)),
        pw(4, "a", "0", (1, 0)),
        pw(5, "a", "tie", (0, 1)),
    ]
    b = position_bias(js, "pairwise")
    assert b["first_shown_wins"] == pytest.approx(0.75) and b["decided"] == 4
    assert b["z"] == pytest.approx((3 - 2) / 1.0)  # (first - n/2) / sqrt(n/4)


def test_biased_annotator_stands_out() -> None:
    # a, b, d agree on every record; c always says the opposite. Leave-one-out: for a the others are
    # (b, d, c) whose majority (2 of 3) is the truth -> 1.0; for c the others all say the truth -> 0.0.
    js = []
    for rid in range(6):
        truth = "0" if rid % 2 else "1"
        js += [
            pw(rid, "a", truth),
            pw(rid, "b", truth),
            pw(rid, "d", truth),
            pw(rid, "c", "1" if truth == "0" else "0"),
        ]
    rep = agreement_report("pairwise", js)
    assert rep.per_annotator["a"]["agree_with_majority"] == pytest.approx(1.0)
    assert rep.per_annotator["c"]["agree_with_majority"] == pytest.approx(0.0)
    assert rep.records_multi == 6
    assert rep.fleiss_kappa < 0.2 and not math.isnan(rep.cohen_kappa)
    assert [d["record_id"] for d in disagreements("pairwise", js)] == list(range(6))


def test_aggregate_records_defaults_and_reliability_in_report() -> None:
    pairwise = [pw(1, "a", "0"), pw(1, "b", "0"), pw(1, "c", "1"), pw(2, "a", "1"), pw(2, "b", "1")]
    assert aggregate_records("pairwise", pairwise) == [
        aggregate_pairwise(1, pairwise[:3]),
        aggregate_pairwise(2, pairwise[3:]),
    ]
    ranked = [rk(1, "a", [1, 2, 3]), rk(1, "b", [1, 3, 2])]
    assert aggregate_records("ranking", ranked, None, "borda") == [aggregate_ranking(1, ranked, "borda")]
    with pytest.raises(DataError, match="a ranking project takes mean-rank or dawid-skene"):
        aggregate_records("ranking", ranked, "majority")
    # agreement_report carries the Dawid-Skene reliability per annotator: c disagrees on record 1
    # (its one label), a and b agree on both records -> c comes out least reliable
    rep = agreement_report("pairwise", pairwise)
    rel = {u: v["reliability"] for u, v in rep.per_annotator.items()}
    assert rel["c"] < min(rel["a"], rel["b"]) and rep.per_annotator["c"]["reliability_labels"] == 1
    assert rep.reliability["method"] == "dawid-skene" and set(rep.reliability["confusion"]) == {"a", "b", "c"}
