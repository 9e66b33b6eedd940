"""Reading run folders for the report: one run, or a folder of runs (``DEMO/runs/<name>/``).

A run folder holds any of ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``eval.json``,
``samples.jsonl``, ``alarms.jsonl``, ``agreement.json``. A folder of runs holds run folders
directly or under ``runs/``, plus optional ``agreement.json``, ``stages.json`` and ``samples.jsonl``
at its top. See ``docs/report.md`` for the formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heed.errors import DataError, HeedError
from heed.report.metrics import read_metrics
from heed.report.monitors import Alarm, MonitorConfig, read_alarms, replay

RUN_FILES = ("metrics.jsonl", "summary.json", "eval.json", "samples.jsonl", "alarms.jsonl")
BASELINE_NAMES = ("sft",)


@dataclass
class Run:
    """Everything the report knows about one run folder."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[Alarm] = field(default_factory=list)
    alarms_replayed: bool = False
    agreement: Any = None

    @property
    def algo(self) -> str:
        """``summary["algo"]``, else ``config["algo"]``, else the folder name."""
        for source in (self.summary, self.config):
            value = source.get("algo")
            if isinstance(value, str) and value:
                return value
        return self.name

    @property
    def is_baseline(self) -> bool:
        return self.name.lower() in BASELINE_NAMES or self.algo.lower() in BASELINE_NAMES

    @property
    def is_best_of(self) -> bool:
        """A best-of-N evaluation of the reference (``heed eval --best-of N``): not a tuned policy."""
        return self.final("eval/best_of") is not None

    def final(self, key: str) -> float | None:
        """The run's final value of ``key``: ``summary.json`` first, else the last logged value."""
        v = _number(self.summary.get(key))
        if v is not None:
            return v
        for row in reversed(self.rows):
            v = _number(row.get(key))
            if v is not None:
                return v
        return None

    def first(self, key: str) -> float | None:
        """The first logged value of ``key`` (train or eval rows)."""
        for row in self.rows:
            v = _number(row.get(key))
            if v is not None:
                return v
        return None

    def metric_keys(self) -> set[str]:
        """Every numeric key in the run's metrics and summary."""
        out = {k for r in self.rows for k, v in r.items() if _number(v) is not None}
        out |= {k for k, v in self.summary.items() if _number(v) is not None}
        return out - {"step", "time"}


@dataclass
class Collection:
    """What ``heed report DIR`` reads: the runs, plus folder-level extras."""

    root: Path
    runs: list[Run]
    agreement: Any = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # ROOT/samples.jsonl (rows name their policy)

    @property
    def baseline(self) -> Run | None:
        return next((r for r in self.runs if r.is_baseline), None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a run still writing) is skipped, others are errors."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                continue
            raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"eval": {"gold": 1}}`` -> ``{"eval/gold": 1}``."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def load_run(path: Path, name: str | None = None) -> Run:
    """Read one run folder; missing files are simply absent from the report."""
    run = Run(name=name or path.name, path=path)
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        import yaml

        try:
            loaded = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise DataError(f"{cfg_path}{where}: not valid YAML") from None
        run.config = loaded if isinstance(loaded, dict) else {}
    run.rows = read_metrics(path)
    if (path / "summary.json").is_file():
        run.summary = flatten(_read_json(path / "summary.json"))
    if (path / "eval.json").is_file():
        # eval.json adds to summary.json; its keys win only where the summary has none.
        for k, v in flatten(_read_json(path / "eval.json")).items():
            run.summary.setdefault(k, v)
    if (path / "samples.jsonl").is_file():
        run.samples = _read_jsonl(path / "samples.jsonl")
    if (path / "agreement.json").is_file():
        run.agreement = _read_json(path / "agreement.json")
    alarms = read_alarms(path)
    if alarms is None:
        run.alarms = replay(run.rows, _monitor_config(run), run.samples)
        run.alarms_replayed = True
    else:
        run.alarms = alarms
    return run


def _monitor_config(run: Run) -> MonitorConfig:
    """The run's ``monitor:`` config section when valid, else the defaults; the gold key
    defaults to the run's only ``gold/*`` metric when it has exactly one."""
    section = run.config.get("monitor")
    cfg = MonitorConfig()
    if isinstance(section, dict):
        try:
            cfg = MonitorConfig.model_validate(section)
        except ValueError:
            cfg = MonitorConfig()
    if cfg.gold_key is None:
        golds = sorted(k for k in run.metric_keys() if k.startswith("gold/"))
        if len(golds) == 1:
            cfg = cfg.model_copy(update={"gold_key": golds[0]})
    return cfg


def _stages(data: Any) -> list[dict[str, Any]]:
    """``stages.json`` as rows ``{"name", "seconds", ...}`` from either accepted form."""
    if isinstance(data, dict) and isinstance(data.get("stages"), list):
        data = data["stages"]
    if isinstance(data, dict):
        return [{"name": str(k), "seconds": v} for k, v in data.items()]
    if isinstance(data, list):
        return [dict(s) for s in data if isinstance(s, dict) and "name" in s]
    return []


def load_collection(root: str | Path) -> Collection:
    """Read a run folder, or a folder of run folders (``ROOT/runs/*`` or ``ROOT/*``)."""
    root = Path(root)
    if not root.exists():
        raise HeedError(f"{root}: no such folder")
    if not root.is_dir():
        raise HeedError(f"{root}: expected a run folder (or a folder of runs), got a file")
    stages = _stages(_read_json(root / "stages.json")) if (root / "stages.json").is_file() else []
    agreement = _read_json(root / "agreement.json") if (root / "agreement.json").is_file() else None
    collection = (root / "runs").is_dir() and any(is_run_dir(d) for d in (root / "runs").iterdir())
    if is_run_dir(root) and not collection:
        runs = [load_run(root)]
        agreement = runs[0].agreement
    else:
        parent = root / "runs" if (root / "runs").is_dir() else root
        dirs = [d for d in sorted(parent.iterdir()) if is_run_dir(d)]
        if not dirs:
            raise HeedError(
                f"{root}: no run found (a run folder holds metrics.jsonl or summary.json; "
                f"a folder of runs holds such folders directly or under runs/)"
            )
        order = [s["name"] for s in stages]
        dirs.sort(key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))
        runs = [load_run(d) for d in dirs]
        # The baseline (SFT) goes first in every table.
        runs.sort(key=lambda r: not r.is_baseline)
        if agreement is None:
            agreement = next((r.agreement for r in runs if r.agreement is not None), None)
    top_samples = root / "samples.jsonl"
    samples = (
        _read_jsonl(top_samples) if (collection or not is_run_dir(root)) and top_samples.is_file() else []
    )
    return Collection(root=root, runs=runs, agreement=agreement, stages=stages, samples=samples)
