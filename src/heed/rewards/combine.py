"""A weighted sum of reward sources, each checked and logged separately."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heed.errors import HeedError, TrainingDivergedError

if TYPE_CHECKING:
    from heed.config.rl import RewardSpec
    from heed.rewards.sources import RewardFn


class RewardError(HeedError):
    """A reward source misbehaved: raised, returned the wrong length or a non-number."""


def _short(text: str, n: int = 120) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass
class RewardSource:
    name: str
    fn: RewardFn
    weight: float = 1.0
    step_delimiter: str | None = None  # process rewards: one score per step (a list) per answer

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        columns: dict[str, list[Any]],
        step: int | None = None,
    ) -> list[Any]:
        """Call the source and validate what it returns (length, numbers, finiteness): one float or None
        per completion, or with ``step_delimiter`` one list of floats (one per step) or None."""
        where = f"step {step}: " if step is not None else ""
        try:
            values = self.fn(list(prompts), list(completions), **columns)
        except HeedError:
            raise
        except Exception as exc:
            culprit = self._find_culprit(prompts, completions, columns)
            which = (
                f" on completion #{culprit}: {_short(completions[culprit])!r}" if culprit is not None else ""
            )
            raise RewardError(
                f"{where}reward '{self.name}' raised {type(exc).__name__}: {exc}{which}"
            ) from exc
        if hasattr(values, "tolist"):
            values = values.tolist()
        if not isinstance(values, list | tuple) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
            raise RewardError(
                f"{where}reward '{self.name}' returned {got} for {len(completions)} completions "
                "(expected a list of one float or None per completion)"
            )
        if self.step_delimiter is not None:
            return [self._steps(v, i, completions[i], where) for i, v in enumerate(values)]
        return [
            None if v is None else self._number(v, i, completions[i], where) for i, v in enumerate(values)
        ]

    def _number(self, v: Any, i: int, completion: str, where: str, what: str = "") -> float:
        if isinstance(v, bool) or not isinstance(v, Real):
            raise RewardError(
                f"{where}reward '{self.name}' returned {v!r} ({type(v).__name__}) {what}for completion "
                f"#{i}: {_short(completion)!r}; expected a float or None"
            )
        if not math.isfinite(float(v)):
            raise TrainingDivergedError(
                f"{where}reward '{self.name}' is {float(v)} {what}for completion #{i}: {_short(completion)!r}; "
                "stopping (the last checkpoint is intact)"
            )
        return float(v)

    def _steps(self, v: Any, i: int, completion: str, where: str) -> list[float] | None:
        """One score per step of the completion (split on ``step_delimiter``), or None."""
        from heed.rewards.steps import split_steps

        if v is None:
            return None
        n = len(split_steps(completion, self.step_delimiter or ""))
        if hasattr(v, "tolist"):
            v = v.tolist()
        if not isinstance(v, list | tuple) or len(v) != n:
            got = f"{len(v)} step scores" if isinstance(v, list | tuple) else repr(v)
            raise RewardError(
                f"{where}reward '{self.name}' returned {got} for completion #{i}, which has {n} steps "
                f"split on {self.step_delimiter!r}: {_short(completion)!r}; expected a list of {n} floats or None"
            )
        return [self._number(x, i, completion, where, f"at step {s} ") for s, x in enumerate(v)]

    def _find_culprit(
        self, prompts: Sequence[Any], completions: Sequence[str], columns: dict[str, list[Any]]
    ) -> int | None:
        """Call the source one completion at a time to find the first one it fails on."""
        for i in range(len(completions)):
            try:
                self.fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
            except Exception:
                return i
        return None


@dataclass
class RewardBatch:
    """Scores of one batch: the weighted total (None where any source gave None) and each source's values."""

    total: list[float | None]
    per_source: dict[str, list[float | None]]  # a process-reward source's value is the sum of its steps
    steps: dict[str, list[list[float] | None]] = field(default_factory=dict)  # process rewards, per step

    def means(self, prefix: str = "reward/") -> dict[str, float]:
        """Mean of each source over the answers it scored, keyed ``reward/<source>``."""
        out = {}
        for name, vals in self.per_source.items():
            ok = [v for v in vals if v is not None]
            out[f"{prefix}{name}"] = sum(ok) / len(ok) if ok else math.nan
        return out


class RewardSet:
    """The reward sources of a run; calling it scores a batch with each and sums them with their weights."""

    def __init__(self, sources: list[RewardSource]) -> None:
        if not sources:
            raise HeedError("rewards: at least one reward source is needed")
        self.sources = sources

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        columns: dict[str, list[Any]] | None = None,
        step: int | None = None,
    ) -> RewardBatch:
        columns = columns or {}
        raw = {s.name: s(prompts, completions, columns, step) for s in self.sources}
        steps = {s.name: raw[s.name] for s in self.sources if s.step_delimiter is not None}
        per_source: dict[str, list[float | None]] = {
            name: [None if v is None else float(sum(v)) if isinstance(v, list) else v for v in vals]
            for name, vals in raw.items()
        }
        total: list[float | None] = []
        for i in range(len(completions)):
            vals = [per_source[s.name][i] for s in self.sources]
            total.append(
                None
                if any(v is None for v in vals)
                else sum(s.weight * v for s, v in zip(self.sources, vals, strict=True))
            )  # type: ignore[operator]
        return RewardBatch(total, per_source, steps)


class NoneRewardWatch:
    """Stops a run whose total reward is None for every answer of ``limit`` updates in a row: such a
    run learns nothing (None answers are left out of baselines and the loss), yet would finish as if
    it had trained. ``limit`` 0 never stops."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streak: list[int] = []  # the steps of the current run of all-None batches

    def update(
        self, total: Sequence[float | None], per_source: dict[str, Sequence[float | None]], step: int
    ) -> None:
        """Record one update's rewards (``total`` and ``per_source`` over the whole batch)."""
        if not total or any(v is not None for v in total):
            self.streak = []
            return
        self.streak.append(step)
        if self.limit and len(self.streak) >= self.limit:
            silent = [name for name, vals in per_source.items() if all(v is None for v in vals)]
            who = (
                f"reward {', '.join(repr(n) for n in silent)} returned None for every answer"
                if silent
                else "every answer had a reward source returning None"
            )
            raise RewardError(
                f"steps {self.streak[0]}-{self.streak[-1]}: {who} of {len(self.streak)} updates in a row, so "
                "the run learns nothing; make the source score these prompts (check the columns it "
                "reads) or remove it (train.max_none_updates sets how many such updates stop the run)"
            )


def build_source(spec: RewardSpec, base_dir: str | Path | None = None) -> RewardSource:
    """One configured source. Folders and functions are real paths and ``module:function`` names
    (the command line resolves ``builtin:...`` names before a config gets here)."""
    from heed.rewards import sources

    if spec.function:
        fn = sources.function_source(spec.function, spec.args, base_dir)
    elif spec.model:
        fn = sources.reward_model_source(str(spec.model), spec.normalize, spec.batch_size)
    else:
        fn = sources.pipeline_source(str(spec.pipeline), spec.labels, spec.use_score, spec.batch_size)
    return RewardSource(spec.display_name, fn, spec.weight, spec.step_delimiter)


def build_rewards(specs: Sequence[RewardSpec], base_dir: str | Path | None = None) -> RewardSet:
    return RewardSet([build_source(s, base_dir) for s in specs])
