"""Score against KL: every tuned policy as a point, best-of-N of the reference as the frontier.

A policy's point is its final evaluation: x = KL(policy ‖ reference) per answer (``eval/kl`` as
``heed eval`` and ``heed rl`` write it, else ``kl/k1`` of the end-of-run samples of ``heed dpo``,
``heed online-dpo``, ``heed rs``), y = its score (the gold metric the runs share, else
``eval/reward``). A run folder that ``heed eval --best-of N --out DIR`` wrote (``eval/best_of`` in
its ``eval.json``) is a point of the reference curve instead: best-of-N of the reference policy, at
KL = log N − (N − 1)/N nats (Stiennon et al. 2020, https://arxiv.org/abs/2009.01325). A method
above the curve gets more score per nat of KL than simply sampling N answers and keeping the best.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise

from heed.report.runs import Collection, Run

KL_KEYS = ("eval/kl", "kl/k1")
BEST_OF_KEY = "eval/best_of"


@dataclass(frozen=True)
class Point:
    """One (KL, score) point: a run's final policy, or best-of-``n`` of the reference."""

    run: str
    method: str
    kl: float
    score: float
    n: int | None = None  # best-of-N points only


@dataclass
class ScoreVsKL:
    """What the report's score-vs-KL plot draws: ``points`` (tuned policies, in run order) and
    ``frontier`` (best-of-N points sorted by N, so KL increases along it)."""

    score_key: str
    points: list[Point] = field(default_factory=list)
    frontier: list[Point] = field(default_factory=list)

    def frontier_at(self, kl: float) -> float | None:
        """The frontier's score at ``kl``, linear between its neighbouring points; None outside it."""
        f = self.frontier
        for a, b in pairwise(f):
            if a.kl <= kl <= b.kl:
                w = (kl - a.kl) / (b.kl - a.kl) if b.kl > a.kl else 0.0
                return a.score + w * (b.score - a.score)
        if len(f) == 1 and abs(f[0].kl - kl) < 1e-12:
            return f[0].score
        return None


def best_of(run: Run) -> int | None:
    """N when the run folder holds a best-of-N evaluation (``eval/best_of``; :attr:`Run.is_best_of`), else None."""
    n = run.final(BEST_OF_KEY)
    return int(n) if n is not None else None


def run_kl(run: Run) -> float | None:
    """The run's final KL to its reference (the first of :data:`KL_KEYS` it has; the baseline: 0)."""
    for key in KL_KEYS:
        v = run.final(key)
        if v is not None:
            return v
    return 0.0 if run.is_baseline else None


def pick_score_key(runs: list[Run]) -> str | None:
    """The gold metric most runs report (``gold/<name>``, first by name on a tie), else ``eval/reward``."""
    golds: Counter[str] = Counter(
        k for r in runs for k in r.metric_keys() if k.startswith("gold/") and r.final(k) is not None
    )
    if golds:
        return sorted(golds.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    if any(r.final("eval/reward") is not None for r in runs):
        return "eval/reward"
    return None


def score_vs_kl(coll: Collection, score_key: str | None = None) -> ScoreVsKL | None:
    """The points and the best-of-N frontier of a folder of runs; None when no run has both a KL and
    a score (``score_key``: default :func:`pick_score_key`)."""
    key = score_key or pick_score_key(coll.runs)
    if key is None:
        return None
    out = ScoreVsKL(score_key=key)
    for run in coll.runs:
        score, n = run.final(key), best_of(run)
        kl = run.final("eval/kl") if n is not None else run_kl(run)
        if score is None or kl is None:
            continue
        if n is not None:
            out.frontier.append(Point(run.name, f"best-of-{n}", kl, score, n))
        else:
            out.points.append(Point(run.name, run.algo, kl, score))
    out.frontier.sort(key=lambda p: p.n or 0)
    if not out.points and not out.frontier:
        return None
    return out
