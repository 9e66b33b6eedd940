"""Reading record files: JSONL, JSON (a list of objects), Parquet, or a `datasets` folder.

Every record remembers where it came from (``file:line``, or ``file:row N`` for tables),
so validation errors can name the culprit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heed.errors import DataError


@dataclass(frozen=True)
class Located:
    """One raw record and where it was read from."""

    data: dict[str, Any]
    where: str


def read_records(path: str | Path) -> list[Located]:
    """Read every record of ``path``; the format follows the suffix (or a folder from ``save_to_disk``)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_datasets_folder(p)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet":
        return _read_parquet(p)
    raise DataError(
        f"{p}: unknown data format '{suffix}'; expected .jsonl, .json, .parquet or a datasets folder"
    )


def _read_jsonl(p: Path) -> list[Located]:
    out = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            out.append(Located(obj, f"{p}:{lineno}"))
    return out


def _read_json(p: Path) -> list[Located]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f'{p}: expected a JSON list of records (or {{"data": [...]}})')
    out = []
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise DataError(f"{p}: record {i}: expected a JSON object, got {type(rec).__name__}")
        out.append(Located(rec, f"{p}: record {i}"))
    return out


def _read_parquet(p: Path) -> list[Located]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover
        raise DataError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as exc:
        raise DataError(f"{p}: not a readable Parquet file ({exc})") from None
    return [Located(r, f"{p}: row {i}") for i, r in enumerate(rows)]


def _read_datasets_folder(p: Path) -> list[Located]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as exc:
        raise DataError(f"{p}: not a datasets folder written by save_to_disk ({exc})") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: a DatasetDict without a 'train' split (has {', '.join(ds)})")
        ds = ds["train"]
    assert isinstance(ds, Dataset)
    return [Located(dict(r), f"{p}: row {i}") for i, r in enumerate(ds)]


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write records atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
