"""Dawid-Skene annotator reliability: one EM step by hand, recovery of known confusion matrices,
the ordering of the demo's simulated annotators through the real store, and `annotate watch`."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heed.cli import main
from heed.feedback.aggregate import (
    Judgement,
    aggregate_dawid_skene,
    aggregate_records,
    fit_reliability,
    preference_items,
)
from heed.feedback.reliability import DawidSkene, dawid_skene, e_step, m_step, vote_shares


def test_one_em_step_by_hand() -> None:
    # Three items, classes {0, 1}, annotators a, b, c:
    #   item 1: a=0 b=0 c=1;  item 2: a=1 b=1 c=1;  item 3: a=0 b=1 c=0
    labels = np.array([[0, 1, 0], [0, 1, 1], [1, 1, 0]])  # (A, N)
    # initial posterior = vote shares: [2/3, 1/3], [0, 1], [2/3, 1/3]
    t = vote_shares(labels, 2)
    assert t == pytest.approx(np.array([[2 / 3, 1 / 3], [0, 1], [2 / 3, 1 / 3]]))
    # M-step (s = 0): pi = column means = [4/9, 5/9].
    # a, true 0: items 1, 3 said 0 with mass 2/3 each -> [4/3, 0] / (4/3) = [1, 0];
    #    true 1: said 0 on items 1, 3 (1/3 each), 1 on item 2 (1) -> [2/3, 1] / (5/3) = [2/5, 3/5].
    # b, true 0: 0 on item 1 (2/3), 1 on item 3 (2/3) -> [1/2, 1/2]; true 1: [1/3, 1/3 + 1] / (5/3) = [1/5, 4/5].
    # c (0 on item 3, 1 on items 1, 2) gets the same matrix as b.
    prior, confusion = m_step(t, labels, smoothing=0.0)
    assert prior.tolist() == pytest.approx([4 / 9, 5 / 9])
    assert confusion[0] == pytest.approx(np.array([[1, 0], [2 / 5, 3 / 5]]))
    assert confusion[1] == pytest.approx(np.array([[1 / 2, 1 / 2], [1 / 5, 4 / 5]]))
    assert confusion[2] == pytest.approx(confusion[1])
    # E-step, item 1 (a=0, b=0, c=1): class 0: 4/9 * 1 * 1/2 * 1/2 = 1/9;
    #   class 1: 5/9 * 2/5 * 1/5 * 4/5 = 8/225 -> P(0) = (25/225) / (33/225) = 25/33.
    # item 2 (all 1): a never says 1 when the truth is 0 -> P(0) = 0.
    # item 3 (a=0, b=1, c=0): class 0: 4/9 * 1 * 1/2 * 1/2 = 1/9; class 1: 5/9 * 2/5 * 4/5 * 1/5 = 8/225 -> 25/33.
    # log-likelihood: 2 log(33/225) + log(5/9 * 3/5 * 4/5 * 4/5 = 16/75).
    posterior, loglik = e_step(prior, confusion, labels)
    assert posterior[:, 0].tolist() == pytest.approx([25 / 33, 0.0, 25 / 33])
    assert loglik == pytest.approx(2 * math.log(33 / 225) + math.log(16 / 75))


def test_swap_pools_counts_and_smoothing() -> None:
    # One annotator, two items certainly of class 0 (both said 0) and one certainly 1 (said 0).
    # Soft counts n[true, said] = [[2, 0], [1, 0]]. Swap-pooled: n[c, l] <- (n[c, l] + n[1-c, 1-l]) / 2
    #   = [[(2+0)/2, (0+1)/2], [(1+0)/2, (0+2)/2]] = [[1, .5], [.5, 1]] -> rows [2/3, 1/3], [1/3, 2/3].
    # With s = 1 on top: [[2, 1.5], [1.5, 2]] / 3.5.  Prior with s = 1: (2 + 1, 1 + 1) / (3 + 2).
    t = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([[0, 0, 0]])
    _, conf = m_step(t, labels, 0.0, swap=[1, 0])
    assert conf[0] == pytest.approx(np.array([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    prior, conf = m_step(t, labels, 1.0, swap=[1, 0])
    assert conf[0] == pytest.approx(np.array([[2 / 3.5, 1.5 / 3.5], [1.5 / 3.5, 2 / 3.5]]))
    assert prior.tolist() == pytest.approx([3 / 5, 2 / 5])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_classes=st.sampled_from([2, 3]))
def test_recovers_known_confusion_matrices(seed: int, n_classes: int) -> None:
    # Five annotators with known confusion matrices (diagonal 0.7-0.95, the rest of each row spread
    # at random) label 1,000 items; each item is seen by four of them. EM from the vote shares
    # must find the matrices, the class shares and the true classes again.
    rng = np.random.default_rng(seed)
    true_conf = np.empty((5, n_classes, n_classes))
    for a in range(5):
        diag = rng.uniform(0.7, 0.95, n_classes)
        off = rng.dirichlet(np.ones(n_classes - 1), n_classes) * (1 - diag)[:, None]  # (C, C-1)
        for c in range(n_classes):
            true_conf[a, c] = np.insert(off[c], c, diag[c])
    classes = [str(c) for c in range(n_classes)]
    truth = rng.choice(n_classes, size=1000, p=rng.dirichlet(np.full(n_classes, 5.0)))
    labels = np.full((5, truth.size), -1)  # (A, N), -1 = not labelled
    for n, z in enumerate(truth):
        for a in rng.choice(5, size=4, replace=False):
            labels[a, n] = rng.choice(n_classes, p=true_conf[a, z])
    items = {
        n: {f"a{a}": classes[labels[a, n]] for a in range(5) if labels[a, n] >= 0} for n in range(truth.size)
    }
    fit = dawid_skene(items, classes)
    shares = np.bincount(truth, minlength=n_classes) / truth.size
    assert fit.converged
    # EM climbs at least as high as the likelihood of the parameters that made the data
    oracle, oracle_loglik = e_step(shares, true_conf, labels)
    assert fit.log_likelihood >= oracle_loglik
    # Estimates within a few standard errors (worst over 300 seeds: 0.04 prior, 0.14 confusion entry,
    # 0.05 reliability; 200 labels per annotator and true class is not a lot). Weaker annotators
    # (diagonal ~0.6) leave the class prior barely identified: errors of 0.1 and more.
    assert np.allclose(fit.prior, shares, atol=0.08)
    for a in range(5):
        assert np.allclose(fit.confusion[f"a{a}"], true_conf[a], atol=0.2), a
        assert fit.reliability[f"a{a}"] == pytest.approx(float(shares @ np.diag(true_conf[a])), abs=0.1)
    # and its labels are about as right as those of the posterior under the true parameters
    accuracy = np.mean([fit.label(n) == classes[z] for n, z in enumerate(truth)])
    assert accuracy >= np.mean(oracle.argmax(axis=1) == truth) - 0.03


def test_edges() -> None:
    # no item has two labels: nothing to fit, reliability unknown, posterior = the votes
    fit = dawid_skene({1: {"a": "0"}, 2: {"b": "1"}}, ["0", "1"])
    assert math.isnan(fit.reliability["a"]) and fit.confusion == {}
    assert fit.posterior[2] == [0.0, 1.0]
    with pytest.raises(ValueError, match="label 'x'"):
        dawid_skene({1: {"a": "x"}}, ["0", "1"])
    with pytest.raises(ValueError, match="permutation"):
        dawid_skene({1: {"a": "0"}}, ["0", "1"], swap=[0, 0])
    # an annotator who never shares an item is judged by the others' mean matrix, reliability nan
    items = {n: {"a": str(n % 2), "b": str(n % 2)} for n in range(6)} | {9: {"c": "1"}}
    fit = dawid_skene(items, ["0", "1"])
    assert math.isnan(fit.reliability["c"]) and fit.shared["c"] == 0 and fit.label(9) == "1"


def pw(rid: int, user: str, label: str) -> Judgement:
    ranks = {"0": (1.0, 2.0), "1": (2.0, 1.0), "tie": (1.0, 1.0)}.get(label)
    return Judgement(rid, user, label, ranks, (0, 1))


def test_dawid_skene_outvotes_unreliable_majority() -> None:
    # Records 0-29: a, b, c always give the truth (alternating 0 / 1); d and e give the truth on
    # even records and the opposite on odd ones, i.e. chance. Record 99: a says 0, d and e say 1.
    # The majority says 1; Dawid-Skene trusts a (reliability ~1) over two coin flips.
    js = []
    for rid in range(30):
        truth = str(rid % 2)
        js += [pw(rid, u, truth) for u in "abc"]
        js += [pw(rid, u, truth if rid % 4 < 2 else str(1 - int(truth))) for u in "de"]
    js += [pw(99, "a", "0"), pw(99, "d", "1"), pw(99, "e", "1")]
    assert aggregate_records("pairwise", js, "majority")[-1].label == "1"
    last = aggregate_records("pairwise", js, "dawid-skene")[-1]
    assert (last.label, last.ranks, last.pairs) == ("0", [1, 2], [(0, 1, last.weight)])
    assert last.weight > 0.9 and last.posterior is not None
    fit = fit_reliability(js)
    assert fit.reliability["a"] > 0.95 and abs(fit.reliability["d"] - 0.5) < 0.1
    with pytest.raises(Exception, match="a pairwise project takes majority or dawid-skene"):
        aggregate_records("pairwise", js, "mean-rank")


def test_ranking_reduces_to_pairs_and_expected_ranks() -> None:
    # A ranking [1, 2, 2] gives pairs (0,1): "0", (0,2): "0", (1,2): "tie"; discards give nothing.
    js = [
        Judgement(7, "a", "rank", (1.0, 2.0, 2.0), (0, 1, 2)),
        Judgement(7, "b", "discard", None, (0, 1, 2)),
    ]
    assert preference_items(js) == {(7, 0, 1): {"a": "0"}, (7, 0, 2): {"a": "0"}, (7, 1, 2): {"a": "tie"}}
    # Hand-set posteriors over ("0", "1", "tie") for the three pairs of record 7:
    #   (0,1): [.8, .2, 0]   (0,2): [.6, .3, .1]   (1,2): [.3, .3, .4]
    # E[rank_i] = 1 + sum_j (P(j > i) + P(tie)/2):
    #   0: 1 + .2 + (.3 + .05) = 1.55;  1: 1 + .8 + (.3 + .2) = 2.3;  2: 1 + (.6 + .05) + (.3 + .2) = 2.15
    # -> dense ranks [1, 3, 2]; pairs 0>1 (.8), 0>2 (.6), 2>1 (P(2 > 1) = .3); weight = mean = 17/30.
    model = DawidSkene(
        ("0", "1", "tie"),
        [1 / 3] * 3,
        {},
        {},
        {},
        {(7, 0, 1): [0.8, 0.2, 0.0], (7, 0, 2): [0.6, 0.3, 0.1], (7, 1, 2): [0.3, 0.3, 0.4]},
        1,
        True,
        0.0,
    )
    (a,) = aggregate_dawid_skene("ranking", js[:1], model)
    assert a.mean_ranks == pytest.approx([1.55, 2.3, 2.15])
    assert a.ranks == [1, 3, 2]
    assert a.pairs == [(0, 1, pytest.approx(0.8)), (0, 2, pytest.approx(0.6)), (2, 1, pytest.approx(0.3))]
    assert a.weight == pytest.approx(17 / 30)


def test_simulated_annotators_ordered_by_noise(tmp_path: Path, capsys, hasher) -> None:  # type: ignore[no-untyped-def]
    """The demo's three annotators (noise 0.08 < 0.15 + length bias < 0.35 + position bias) rank
    100 records of 8 answers each, every one labelling every record, through the SQLite store;
    the Dawid-Skene reliabilities must put them in that order."""
    from heed.demo.annotators import DEFAULT_ANNOTATORS, annotate_project
    from heed.demo.preferences import hidden_utility, make_ranked_groups
    from heed.feedback.service import Feedback

    db = tmp_path / "sim.db"
    fb = Feedback(f"sqlite:///{db}", hasher=hasher, seed=0)
    fb.create_project("sim", task="ranking", overlap=3)
    groups = make_ranked_groups(100, k=8, seed=0)
    fb.import_records("sim", [{"prompt": g["prompt"], "responses": g["responses"]} for g in groups])
    counts = annotate_project(fb, "sim", DEFAULT_ANNOTATORS, seed=0)
    assert counts == {a.name: 100 for a in DEFAULT_ANNOTATORS}

    fit = fb.reliability("sim")
    by_noise = [a.name for a in DEFAULT_ANNOTATORS]  # careful, verbose, hasty
    assert sorted(fit.reliability, key=lambda u: -fit.reliability[u]) == by_noise, fit.reliability
    assert all(0.5 < r < 1.0 for r in fit.reliability.values())

    # each annotator's true accuracy on gold pairs (hidden utility), for comparison
    judgements = fb.judgements("sim")
    records = [fb.record("sim", rid) for rid in sorted({j.record_id for j in judgements})]
    utilities = {r["record_id"]: [hidden_utility(x) for x in r["responses"]] for r in records}
    true_acc = {}
    for u in by_noise:
        hits = [
            (j.ranks[i] < j.ranks[k]) == (utilities[j.record_id][i] > utilities[j.record_id][k])
            for j in judgements
            if j.user == u
            for i, k in itertools.combinations(range(8), 2)
            if utilities[j.record_id][i] != utilities[j.record_id][k]
        ]
        true_acc[u] = sum(hits) / len(hits)
    assert sorted(true_acc, key=lambda u: -true_acc[u]) == by_noise

    # the consensus: Dawid-Skene orders at least as many gold pairs right as the mean rank
    def consensus_accuracy(aggregate: str) -> float:
        right = total = 0
        for a in fb.aggregate("sim", aggregate=aggregate):
            u = utilities[a.record_id]
            for i, k in itertools.combinations(range(8), 2):
                if u[i] != u[k]:
                    total += 1
                    right += a.ranks[i] != a.ranks[k] and (a.ranks[i] < a.ranks[k]) == (u[i] > u[k])
        return right / total

    assert consensus_accuracy("dawid-skene") >= consensus_accuracy("mean-rank")
    fb.close()

    # `heed annotate stats` shows the reliability next to the agreement; export takes --aggregate
    main(["annotate", "stats", "--project", "sim", "--db", str(db)])
    stats = json.loads(capsys.readouterr().out)
    per = stats["agreement"]["per_annotator"]
    assert {u: per[u]["reliability"] for u in by_noise} == pytest.approx(fit.reliability)
    assert all("tau_with_others" in per[u] for u in by_noise)
    assert stats["agreement"]["reliability"]["method"] == "dawid-skene"
    out = tmp_path / "ds.jsonl"
    main(
        [
            "annotate",
            "export",
            "-p",
            "sim",
            "--format",
            "pairs",
            "--aggregate",
            "dawid-skene",
            "--out",
            str(out),
            "--db",
            str(db),
        ]
    )
    assert "wrote" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows and all(0.0 <= r["weight"] <= 1.0 for r in rows)
    with pytest.raises(SystemExit) as exc:
        main(
            ["annotate", "export", "-p", "sim", "--aggregate", "majority", "--out", str(out), "--db", str(db)]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: aggregate 'majority': a ranking project takes mean-rank or dawid-skene"
