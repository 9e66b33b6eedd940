"""Progress bars with ETA for every long loop (rich), quiet when disabled or not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StepProgress:
    """A progress bar over ``total`` steps that also shows a few live metrics.

    >>> with StepProgress("sft", total=100) as bar:
    ...     bar.advance(1, {"loss": 2.3})
    """

    def __init__(self, description: str, total: int, enabled: bool = True, start: int = 0) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
            disable=not enabled,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> StepProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def advance(self, n: int = 1, info: Mapping[str, float] | None = None) -> None:
        fields = {}
        if info:
            fields["info"] = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        self._progress.update(self._task, advance=n, **fields)

    def log(self, text: str) -> None:
        """Print a line above the bar."""
        if self.enabled:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr)


def _fmt(v: float) -> str:
    v = float(v)
    return f"{v:.4g}"
