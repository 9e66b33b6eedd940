"""The run's metrics log: ``metrics.jsonl`` always, TensorBoard events when asked.

Each line is one flat JSON object: ``{"step": 12, "split": "train", "time": 3.4, "loss": 2.1, ...}``.
``split`` is ``train`` or ``eval``; keys with a slash group related figures (``reward/banana``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class MetricsLogger:
    """Appends metrics to ``RUN/metrics.jsonl`` (and TensorBoard if ``tensorboard=True``).

    Only the main process should create one; others pass ``enabled=False``.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._t0 = time.time()
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - optional dependency
                import warnings

                warnings.warn(
                    "log.tensorboard is on but `tensorboard` is not installed; writing JSONL only",
                    stacklevel=2,
                )
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict[str, Any]:
        """Write one line; returns the plain dict written."""
        row: dict[str, Any] = {"step": int(step), "split": split, "time": round(time.time() - self._t0, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "split", "time") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
        return row

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run rewrites them)."""
        if self.enabled:
            truncate_jsonl(self.path, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` (a folder or the file itself); a torn last line is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    rows = []
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def repair_jsonl(path: str | Path) -> bool:
    """Cut a torn last line (a process killed mid-write) from a JSONL file, keeping every full line.

    A last line without its newline that still parses as JSON is kept (its newline is added).
    Returns True when the file was changed. A missing file is left alone.
    """
    p = Path(path)
    if not p.is_file():
        return False
    data = p.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1  # 0 when the only line is torn
    tail = data[cut:]
    try:
        json.loads(tail)
        complete = bool(tail.strip())
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        complete = False
    with p.open("r+b") as fh:
        if complete:
            fh.seek(0, 2)
            fh.write(b"\n")
        else:
            fh.truncate(cut)
    return True


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Rewrite a JSONL log keeping only rows with ``step <= step`` (atomically); lines that are not
    JSON objects (torn by a kill) are dropped."""
    p = Path(path)
    if not p.exists():
        return
    kept = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, p)


def series(rows: list[dict[str, Any]], key: str, split: str = "train") -> Iterator[tuple[int, float]]:
    """``(step, value)`` pairs of one metric in one split."""
    for r in rows:
        if r.get("split", "train") == split and r.get(key) is not None:
            yield r["step"], r[key]
