"""Reward-hacking monitors: live alarms for every RL / DPO run, replayed in the report.

A trainer makes one :class:`Monitor` from the ``monitor:`` section of its config and calls
``monitor.update(step, metrics, completions, rewards)`` after logging each step; it returns
the alarms that fired *now* (an alarm that stays on is reported once, and again only after
it has cleared and fired anew). ``append_alarms(run_dir, alarms)`` writes them to
``alarms.jsonl``.

Alarm kinds (``Alarm.kind``):

- ``kl_budget``: the KL to the reference policy (``kl_key``) is over ``kl_budget``.
- ``length_bias``: within one batch, reward and answer length (words) correlate with
  Pearson r >= ``length_corr_threshold`` -- the reward is paying for length.
- ``length_trend``: over the last ``window`` steps the mean reward and the mean length rise
  together (r >= ``length_corr_threshold``) and length grew by ``length_growth`` or more.
- ``low_distinct``: distinct-2 of the batch fell below ``min_distinct_2``.
- ``repeated_answers``: the share of answers repeating another one is above ``max_duplicate_frac``.
- ``entropy_collapse``: policy entropy fell below ``min_entropy_ratio`` x its first value.
- ``overoptimisation``: the gold metric (``gold_key``) fell ``gold_drop`` below its best while
  the proxy reward (``proxy_key``) kept rising past its value at that best -- reward-model
  over-optimisation (Gao et al. 2022, https://arxiv.org/abs/2210.10760).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from heed.config.monitor import MonitorConfig
from heed.report.diversity import distinct_n, duplicate_fraction, ngram_counts, pearson, words

ALARM_KINDS = (
    "kl_budget",
    "length_bias",
    "length_trend",
    "low_distinct",
    "repeated_answers",
    "entropy_collapse",
    "overoptimisation",
)


@dataclass(frozen=True)
class Alarm:
    """One monitor firing: what it saw (``value``), against what (``threshold``), at which step."""

    kind: str
    step: int
    message: str
    value: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Alarm:
        return cls(
            kind=str(row["kind"]),
            step=int(row["step"]),
            message=str(row.get("message", "")),
            value=float(row.get("value", math.nan)),
            threshold=float(row.get("threshold", math.nan)),
        )

    def __str__(self) -> str:
        return f"step {self.step}: {self.kind}: {self.message}"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        if hasattr(value, "item"):
            value = value.item()
        else:
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def _tail_mean(values: Sequence[float], k: int) -> float:
    tail = values[-k:]
    return sum(tail) / len(tail)


class Monitor:
    """Watches a run step by step and raises :class:`Alarm` s; see the module docstring for the kinds.

    >>> monitor = Monitor(MonitorConfig(kl_budget=5.0, smooth=1))
    >>> monitor.update(1, {"kl/k1": 2.0})
    []
    >>> [a.kind for a in monitor.update(2, {"kl/k1": 6.0})]
    ['kl_budget']
    >>> monitor.update(3, {"kl/k1": 7.0})  # still over: not repeated
    []
    """

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.alarms: list[Alarm] = []
        self._active: set[str] = set()

    # -- public -----------------------------------------------------------------------------
    def update(
        self,
        step: int,
        metrics: Mapping[str, Any],
        completions: Sequence[str] | None = None,
        rewards: Sequence[float] | None = None,
    ) -> list[Alarm]:
        """Record one step and return the alarms that fired at it (new ones only)."""
        if not self.config.enabled:
            return []
        step = int(step)
        for key, value in metrics.items():
            v = _finite(value)
            if v is not None:
                self.history.setdefault(key, []).append((step, v))
        checks: dict[str, tuple[float, float, str] | None] = {}
        checks["kl_budget"] = self._check_kl()
        checks["entropy_collapse"] = self._check_entropy()
        checks["overoptimisation"] = self._check_overoptimisation()
        checks["length_trend"] = self._check_length_trend()
        if completions is not None:
            checks.update(self._check_batch(completions, rewards))
        else:
            checks.update(self._check_logged_diversity())
        fired = []
        for kind, result in checks.items():
            if result is None:
                # An unmeasurable check (key missing this step) neither fires nor clears.
                continue
            value, threshold, message = result
            if message:
                if kind not in self._active:
                    self._active.add(kind)
                    fired.append(Alarm(kind, step, message, value, threshold))
            else:
                self._active.discard(kind)
        self.alarms.extend(fired)
        return fired

    @property
    def active(self) -> frozenset[str]:
        """The kinds whose condition held at the last step where they could be measured."""
        return frozenset(self._active)

    # -- checks: each returns None (cannot measure now) or (value, threshold, message or "") ---
    def _values(self, key: str | None) -> list[float]:
        return [v for _, v in self.history.get(key, [])] if key else []

    def _is_current(self, key: str) -> bool:
        """True when ``key`` was logged at the latest step seen (so a check runs once per new value)."""
        series = self.history.get(key)
        if not series:
            return False
        latest = max(s[-1][0] for s in self.history.values() if s)
        return series[-1][0] == latest

    def _check_kl(self) -> tuple[float, float, str] | None:
        cfg = self.config
        if cfg.kl_budget is None or not self._is_current(cfg.kl_key):
            return None
        kl = _tail_mean(self._values(cfg.kl_key), cfg.smooth)
        over = kl > cfg.kl_budget
        msg = (
            f"KL to the reference ({cfg.kl_key}, mean of last {cfg.smooth}) is {kl:.3g} nats, over the budget "
            f"of {cfg.kl_budget:.3g}: the policy is drifting far from where the reward is trustworthy"
        )
        return kl, cfg.kl_budget, msg if over else ""

    def _check_entropy(self) -> tuple[float, float, str] | None:
        cfg = self.config
        if cfg.min_entropy_ratio is None or not self._is_current(cfg.entropy_key):
            return None
        values = self._values(cfg.entropy_key)
        first = values[0]
        if first <= 0 or len(values) < 2:
            return None
        now = _tail_mean(values, cfg.smooth)
        ratio = now / first
        msg = (
            f"entropy fell to {now:.3g} from {first:.3g} at the start ({ratio:.0%} of it, floor "
            f"{cfg.min_entropy_ratio:.0%}): the policy is becoming deterministic"
        )
        return ratio, cfg.min_entropy_ratio, msg if ratio < cfg.min_entropy_ratio else ""

    def _check_overoptimisation(self) -> tuple[float, float, str] | None:
        cfg = self.config
        if cfg.gold_key is None or not self._is_current(cfg.gold_key):
            return None
        gold = self.history[cfg.gold_key]
        proxy = self.history.get(cfg.proxy_key, [])
        if not proxy:
            return None
        # Align: at each gold step, the latest proxy value logged at or before it.
        aligned_gold, aligned_proxy, steps = [], [], []
        j = 0
        last_proxy: float | None = None
        for step, g in gold:
            while j < len(proxy) and proxy[j][0] <= step:
                last_proxy = proxy[j][1]
                j += 1
            if last_proxy is not None:
                steps.append(step)
                aligned_gold.append(g)
                aligned_proxy.append(last_proxy)
        if len(steps) < 2:
            return None
        k = cfg.smooth
        g_s = [_tail_mean(aligned_gold[: i + 1], k) for i in range(len(steps))]
        p_s = [_tail_mean(aligned_proxy[: i + 1], k) for i in range(len(steps))]
        best = max(range(len(g_s)), key=lambda i: g_s[i])
        drop = g_s[best] - g_s[-1]
        rising = p_s[-1] > p_s[best]
        msg = (
            f"gold {cfg.gold_key} fell {drop:.3g} from its best {g_s[best]:.3g} (step {steps[best]}) to "
            f"{g_s[-1]:.3g} while the proxy {cfg.proxy_key} rose {p_s[best]:.3g} -> {p_s[-1]:.3g}: "
            f"the policy is exploiting the reward model"
        )
        return drop, cfg.gold_drop, msg if (drop >= cfg.gold_drop and rising) else ""

    def _check_length_trend(self) -> tuple[float, float, str] | None:
        cfg = self.config
        if cfg.length_corr_threshold is None or not self._is_current(cfg.length_key):
            return None
        proxy = dict(self.history.get(cfg.proxy_key, []))
        pairs = [(s, v, proxy[s]) for s, v in self.history[cfg.length_key] if s in proxy]
        if len(pairs) < cfg.window:
            return None
        pairs = pairs[-cfg.window :]
        lengths = [p[1] for p in pairs]
        rewards = [p[2] for p in pairs]
        r = pearson(lengths, rewards)
        if r is None:
            return None
        q = max(1, cfg.window // 4)
        start, end = sum(lengths[:q]) / q, sum(lengths[-q:]) / q
        growth = (end - start) / abs(start) if start else math.inf
        msg = (
            f"over the last {cfg.window} steps mean reward and mean length rose together (r={r:.2f}) and "
            f"length grew {growth:+.0%} ({start:.3g} -> {end:.3g}): reward may be bought with length"
        )
        fire = r >= cfg.length_corr_threshold and growth >= cfg.length_growth
        return r, cfg.length_corr_threshold, msg if fire else ""

    def _check_batch(
        self, completions: Sequence[str], rewards: Sequence[float] | None
    ) -> dict[str, tuple[float, float, str] | None]:
        cfg = self.config
        out: dict[str, tuple[float, float, str] | None] = {}
        n = len(completions)
        if n < cfg.min_batch:
            return out
        if cfg.min_distinct_2 is not None and ngram_counts(completions, 2)[1] > 0:
            d2 = distinct_n(completions, 2)
            msg = (
                f"distinct-2 of {n} answers is {d2:.3g}, under {cfg.min_distinct_2:.3g}: answers reuse the "
                f"same phrases (mode collapse)"
            )
            out["low_distinct"] = (d2, cfg.min_distinct_2, msg if d2 < cfg.min_distinct_2 else "")
        if cfg.max_duplicate_frac is not None:
            dup = duplicate_fraction(completions)
            top = Counter(completions).most_common(1)[0][0]
            msg = (
                f"{dup:.0%} of {n} answers repeat another answer (limit {cfg.max_duplicate_frac:.0%}); "
                f"most common: {top[:80]!r}"
            )
            out["repeated_answers"] = (
                dup,
                cfg.max_duplicate_frac,
                msg if dup > cfg.max_duplicate_frac else "",
            )
        if cfg.length_corr_threshold is not None and rewards is not None:
            if len(rewards) != n:
                raise ValueError(f"monitor: {n} completions but {len(rewards)} rewards")
            # A reward of None (TRL's "no score for this answer") is left out.
            pairs = [
                (float(len(words(c))), x)
                for c, r in zip(completions, rewards, strict=True)
                if (x := _finite(r)) is not None
            ]
            r = pearson([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= cfg.min_batch else None
            if r is not None:
                msg = (
                    f"reward and answer length correlate (r={r:.2f} over {len(pairs)} answers, threshold "
                    f"{cfg.length_corr_threshold:.2f}): the reward favours longer answers"
                )
                out["length_bias"] = (
                    r,
                    cfg.length_corr_threshold,
                    msg if r >= cfg.length_corr_threshold else "",
                )
        return out

    def _check_logged_diversity(self) -> dict[str, tuple[float, float, str] | None]:
        """Without the batch itself, use the logged ``diversity/*`` figures."""
        cfg = self.config
        out: dict[str, tuple[float, float, str] | None] = {}
        if cfg.min_distinct_2 is not None and self._is_current("diversity/distinct_2"):
            d2 = _tail_mean(self._values("diversity/distinct_2"), cfg.smooth)
            msg = f"distinct-2 is {d2:.3g}, under {cfg.min_distinct_2:.3g}: answers reuse the same phrases"
            out["low_distinct"] = (d2, cfg.min_distinct_2, msg if d2 < cfg.min_distinct_2 else "")
        if cfg.max_duplicate_frac is not None and self._is_current("diversity/duplicate_frac"):
            dup = _tail_mean(self._values("diversity/duplicate_frac"), cfg.smooth)
            msg = f"{dup:.0%} of answers repeat another answer (limit {cfg.max_duplicate_frac:.0%})"
            out["repeated_answers"] = (
                dup,
                cfg.max_duplicate_frac,
                msg if dup > cfg.max_duplicate_frac else "",
            )
        return out


# -- replay and files ------------------------------------------------------------------------


def replay(
    rows: Iterable[Mapping[str, Any]],
    config: MonitorConfig | None = None,
    samples: Iterable[Mapping[str, Any]] | None = None,
) -> list[Alarm]:
    """Run a :class:`Monitor` over a finished run's ``metrics.jsonl`` rows (and ``samples.jsonl``).

    Train rows drive the monitor step by step; the gold metric is also taken from eval rows.
    Samples (``{"step", "completion", "reward"}``) at a step feed the per-batch checks.
    """
    return _replayed(rows, config or MonitorConfig(), samples).alarms


def resume_monitor(rows: Iterable[Mapping[str, Any]], config: MonitorConfig | None = None) -> Monitor:
    """A monitor that has already seen a resumed run's ``metrics.jsonl`` rows: its baselines
    (first entropy, best gold) and on-going alarms carry over, so nothing fires twice."""
    return _replayed(rows, config or MonitorConfig(), None)


def _replayed(
    rows: Iterable[Mapping[str, Any]], cfg: MonitorConfig, samples: Iterable[Mapping[str, Any]] | None
) -> Monitor:
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        if "step" not in row:
            continue
        step = int(row["step"])
        merged = by_step.setdefault(step, {})
        if row.get("split", "train") == "train":
            merged.update({k: v for k, v in row.items() if k not in ("step", "split", "time")})
        elif cfg.gold_key and cfg.gold_key in row:
            merged.setdefault(cfg.gold_key, row[cfg.gold_key])
    batches: dict[int, list[Mapping[str, Any]]] = {}
    for s in samples or []:
        if "step" in s and isinstance(s.get("completion"), str):
            batches.setdefault(int(s["step"]), []).append(s)
    monitor = Monitor(cfg)
    for step in sorted(set(by_step) | set(batches)):
        batch = batches.get(step)
        completions = [b["completion"] for b in batch] if batch else None
        rewards = None
        if batch and all(_finite(b.get("reward")) is not None for b in batch):
            rewards = [float(b["reward"]) for b in batch]
        monitor.update(step, by_step.get(step, {}), completions, rewards)
    return monitor


def append_alarms(run_dir: str | Path, alarms: Iterable[Alarm]) -> Path:
    """Append alarms to ``RUN/alarms.jsonl`` (created even when empty: the report then knows
    the monitors ran and found nothing). Returns the file's path."""
    path = Path(run_dir) / "alarms.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for alarm in alarms:
            fh.write(json.dumps(alarm.to_dict(), ensure_ascii=False) + "\n")
    return path


def read_alarms(run_dir: str | Path) -> list[Alarm] | None:
    """The alarms in ``RUN/alarms.jsonl``; None when the file does not exist. Bad lines are skipped."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "alarms.jsonl"
    if not path.exists():
        return None
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(Alarm.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return out
