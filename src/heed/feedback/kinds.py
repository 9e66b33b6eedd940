"""Feedback kinds: what a project asks its annotators, and which records and exports go with it.

A project asks one or more kinds on each record (``--task ranking,critique``):

| kind | the annotator | record | stored label |
|---|---|---|---|
| ``pairwise`` | chooses A or B (tie, discard) | 2 answers | ``"0"`` / ``"1"`` / ``"tie"`` + ranks |
| ``ranking`` | ranks 2..9 answers (ties allowed) | 2-9 answers | ``"rank"`` + ranks |
| ``binary`` | thumbs up / down on the answer | 1 answer | ``"up"`` / ``"down"`` |
| ``rating`` | picks a point on the project's Likert scale | 1 answer | ``"rating"`` + ``rating`` |
| ``critique`` | writes what is wrong or right with the answer | 1 answer (or the best of several) | ``critique`` |
| ``edit`` | corrects the answer | 1 answer (or the best of several) | ``edit`` |

At most one of the first four (the *judgement*) per project; ``critique`` and ``edit`` may be added
to any of them, and then apply to the answer the judgement puts first (the chosen one, the one
ranked best; the first shown among equals). Without a comparison kind a record holds one answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from heed.errors import DataError

JUDGEMENTS = ("pairwise", "ranking", "binary", "rating")
ADDONS = ("critique", "edit")
KINDS = JUDGEMENTS + ADDONS
COMPARISONS = ("pairwise", "ranking")
THUMBS = ("up", "down")
MAX_SCALE_POINTS = 10  # digit keys 0..9 pick a point
DEFAULT_SCALE = (1, 5)


@dataclass(frozen=True)
class Kinds:
    """The kinds a project asks, in a fixed order (judgement first, then critique, then edit)."""

    kinds: tuple[str, ...]

    @property
    def judgement(self) -> str | None:
        """The one judgement kind (pairwise, ranking, binary, rating), or None."""
        return next((k for k in self.kinds if k in JUDGEMENTS), None)

    @property
    def primary(self) -> str:
        """The stored ``task``: the judgement, else the first add-on."""
        return self.judgement or self.kinds[0]

    @property
    def comparison(self) -> bool:
        """True when a record holds several answers to compare (pairwise, ranking)."""
        return self.judgement in COMPARISONS

    def has(self, kind: str) -> bool:
        return kind in self.kinds

    def response_counts(self) -> tuple[int, int]:
        """Fewest and most answers a record of this project holds."""
        if self.judgement == "pairwise":
            return 2, 2
        if self.judgement == "ranking":
            return 2, 9
        return 1, 1

    def __str__(self) -> str:
        return ",".join(self.kinds)


def parse_kinds(task: str | list[str] | tuple[str, ...], where: str = "task") -> Kinds:
    """``"ranking,critique"`` (or a list) -> :class:`Kinds`; one-line errors name ``where``."""
    parts = [p.strip() for p in (task.split(",") if isinstance(task, str) else list(task))]
    if not parts or any(not p for p in parts):
        raise DataError(f"{where} {task!r}: expected one or more of {', '.join(KINDS)}, joined by commas")
    for p in parts:
        if p not in KINDS:
            raise DataError(f"{where} {task!r}: {p!r} is not a feedback kind; expected {', '.join(KINDS)}")
    if len(set(parts)) < len(parts):
        raise DataError(f"{where} {task!r}: a kind is named twice")
    judgements = [p for p in parts if p in JUDGEMENTS]
    if len(judgements) > 1:
        raise DataError(
            f"{where} {task!r}: at most one of {', '.join(JUDGEMENTS)} per project "
            f"(critique and edit may be added to it)"
        )
    return Kinds(tuple(k for k in KINDS if k in parts))


_SCALE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_scale(scale: str | tuple[int, int] | list[int] | None, where: str = "scale") -> tuple[int, int]:
    """``"1-7"`` -> ``(1, 7)``: a Likert scale of 2 to 10 integer points between 0 and 9 (digit keys)."""
    if scale is None:
        return DEFAULT_SCALE
    if isinstance(scale, str):
        m = _SCALE.match(scale)
        if not m:
            raise DataError(f"{where} {scale!r}: expected LOW-HIGH, e.g. 1-7")
        lo, hi = int(m.group(1)), int(m.group(2))
    else:
        if len(scale) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in scale):
            raise DataError(f"{where} {scale!r}: expected two integers [low, high]")
        lo, hi = int(scale[0]), int(scale[1])
    if not 0 <= lo < hi <= 9:
        raise DataError(f"{where} {lo}-{hi}: expected 0 <= low < high <= 9 (each point has a digit key)")
    return lo, hi


def parse_scale_labels(labels: str | list[str] | None, where: str = "scale_labels") -> tuple[str, str] | None:
    """``"harmful,excellent"`` -> the names of the scale's low and high ends (or None)."""
    if labels is None or labels == "" or labels == []:
        return None
    parts = [p.strip() for p in (labels.split(",") if isinstance(labels, str) else list(labels))]
    if len(parts) != 2 or not all(isinstance(p, str) and p and len(p) <= 100 for p in parts):
        raise DataError(
            f"{where} {labels!r}: expected two names, the low end's and the high end's, e.g. 'bad,good'"
        )
    return parts[0], parts[1]


__all__ = [
    "ADDONS",
    "COMPARISONS",
    "JUDGEMENTS",
    "KINDS",
    "THUMBS",
    "Kinds",
    "parse_kinds",
    "parse_scale",
    "parse_scale_labels",
]
